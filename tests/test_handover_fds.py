"""A daemon whose memory lives in no file hands over too: with --no-state, its state and every
memfd travel on the handover channel (SCM_RIGHTS, at most 253 fds per message) to a new daemon
started with --no-state --takeover; every byte is kept and a mapper rides through keeping its
mappings. A daemon of handover version 1 is still taken over (as one)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable

import pytest
from test_handover import python_cli

import membacking

from conftest import RunningManager, cli_env, run_cli, short_tmpdir

Start = Callable[..., RunningManager]
KiB, MiB = 1 << 10, 1 << 20
BASE, SIZE, COUNT = 1 << 32, 64 * KiB, 300  # more regions than fds fit in one message


def _digest(memory: membacking.GuestMemory) -> list[str]:
    return [
        hashlib.sha256(memory.read_at(BASE + i * SIZE, SIZE)).hexdigest() for i in range(COUNT)
    ] + [hashlib.sha256(memory.read_at(0, 8 * MiB)).hexdigest()]


def test_a_no_state_daemon_hands_over_its_memfds(start_manager: Start) -> None:
    first = start_manager("--no-state", "--region", "ram0=0:8M")
    client = first.client()
    for i in range(COUNT):
        client.add_region(f"r{i}", BASE + i * SIZE, SIZE)
    with membacking.attach(first.runtime_dir, reconnect_timeout=30.0) as rider:
        rider.write_at(0, os.urandom(8 * MiB))
        for i in range(COUNT):
            rider.write_at(BASE + i * SIZE, os.urandom(SIZE))
        before = _digest(rider)
        second = start_manager(
            "--no-state", "--region", "ram0=0:8M", "--takeover", runtime_dir=first.runtime_dir
        )
        assert f"took-over-from={first.pid}" in second.ready_line, second.ready_line
        assert first.proc.wait(10) == 0
        # it kept its mappings (the same memory: same state id): the new daemon took every one
        # it reported, before it touched any again
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            mappers = second.client().mappers()
            if mappers and mappers[0]["ranges"] == COUNT + 1:
                break
            time.sleep(0.05)
        assert [m["ranges"] for m in mappers] == [COUNT + 1]
        assert _digest(rider) == before  # the rider, through the handover
        assert second.client().stats()["regions"] == COUNT + 1
    with membacking.attach(second.runtime_dir) as fresh:
        assert _digest(fresh) == before  # a new mapper, from the new daemon's memfds


def test_a_no_state_takeover_that_does_not_fit_is_refused_before_the_ask(
    start_manager: Start,
) -> None:
    """Without a state directory the new daemon cannot read the state before it asks: it
    checks its --region against the running daemon's listing, so a mismatch is refused while
    the running daemon still serves (once that one has handed over, nobody else would)."""
    first = start_manager("--no-state", "--region", "ram0=0:8M")
    with membacking.attach(first.runtime_dir) as memory:
        memory.write_at(0x1000, b"kept")
    done = run_cli(
        "manager",
        "run",
        "--no-state",
        "--region",
        "ram0=0:4M",
        "--takeover",
        runtime_dir=first.runtime_dir,
    )
    assert done.returncode == 1, done.stderr
    assert "region 'ram0' of the running manager is 8 MiB" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert first.proc.poll() is None and "handing over" not in first.log()
    with membacking.attach(first.runtime_dir) as memory:
        assert memory.read_at(0x1000, 4) == b"kept"


#: a daemon of handover version 1 that words its refusal of a version-2 ask otherwise than
#: this release's: the asker goes by the refusal's code (PROTOCOL.md §14.1), not its words
_REWORDED = (
    "import membacking.manager.handover as h; from membacking.manager.errors import Refused; "
    "agree = h._agree\n"
    "def _agree(daemon, args):\n"
    "    if args.get('version') == 2: raise Refused({code!r}, {message!r})\n"
    "    return agree(daemon, args)\n"
    "h._agree = _agree"
)


@pytest.mark.parametrize(
    "patch",
    [
        "import membacking.manager.handover as h; h.HANDOVER_VERSION = 1; "
        "h.HANDOVER_VERSIONS = (1,)",
        _REWORDED.format(code="version-mismatch", message="handover version 1 only"),
        _REWORDED.format(code="bad-request", message="unknown argument features"),
    ],
    ids=["this-release", "reworded-version-mismatch", "reworded-bad-request"],
)
def test_a_daemon_of_handover_version_1_is_taken_over_as_one(
    start_manager: Start, patch: str
) -> None:
    runtime = short_tmpdir()
    older = subprocess.Popen(
        python_cli(
            "manager",
            "run",
            "--runtime-dir",
            str(runtime),
            "--region",
            "ram0=0:8M",
            patch=patch,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=cli_env(),
    )
    try:
        assert older.stdout is not None and b"ready" in older.stdout.readline()
        with membacking.attach(runtime) as memory:
            memory.write_at(0x1000, b"older")
        second = start_manager("--region", "ram0=0:8M", "--takeover", runtime_dir=runtime)
        assert f"took-over-from={older.pid}" in second.ready_line
        assert older.wait(10) == 0
        with membacking.attach(runtime) as memory:
            assert memory.read_at(0x1000, 5) == b"older"
    finally:
        if older.poll() is None:
            older.kill()
            older.wait(10)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_the_handover_channel_refuses_bad_input_without_leaking_fds() -> None:
    """What comes on handover.sock is checked: a malformed message, fds that do not match
    their ids, or an end whose count is wrong make the receiver fail with a clear error and
    close every fd it got; a whole exchange in several batches arrives complete."""
    import socket as socketlib

    import msgpack

    from membacking.manager import handchannel
    from membacking.protocol.fdpass import send_raw
    from membacking.runtime import RuntimePaths

    runtime = short_tmpdir()
    paths = RuntimePaths.resolve(runtime)
    bad = [
        [(b"not msgpack \xc1", [])],
        [(msgpack.packb(["fds", [1, 2]]), [0])],  # two ids, one fd
        [(msgpack.packb(["fds", [1]]), [0]), (msgpack.packb(["end", 2]), [])],
        [(msgpack.packb(["state", b"x"]), [0])],  # state with an fd
    ]
    try:
        for messages in bad:
            before = _open_fds()
            receiver = handchannel.Receiver(paths)
            with socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_SEQPACKET) as sender:
                sender.connect(str(handchannel.channel_path(paths)))
                for data, fds in messages:
                    copies = [os.dup(2) for _ in fds]
                    send_raw(sender, data, copies)
                    for fd in copies:  # the sender's own: in flight, the receiver has its own
                        os.close(fd)
                try:
                    receiver.receive(5.0)
                    raise AssertionError(f"{messages!r} was taken")
                except handchannel.ChannelError as exc:
                    assert "malformed" in str(exc)
            receiver.close()
            assert _open_fds() == before  # every fd it got was closed
        receiver = handchannel.Receiver(paths)
        fds = {i: os.memfd_create(f"m{i}") for i in range(600)}  # three batches
        sent = threading.Thread(target=handchannel.send, args=(paths, b"s" * 100_000, fds, 5.0))
        sent.start()
        state, got = receiver.receive(5.0)
        sent.join()
        receiver.close()
        assert state == b"s" * 100_000 and sorted(got) == sorted(fds)
        for i, fd in got.items():
            assert os.fstat(fd).st_ino == os.fstat(fds[i]).st_ino
            os.close(fd)
            os.close(fds[i])
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


def test_a_refusal_of_both_versions_is_told_by_the_first(start_manager: Start) -> None:
    """A daemon that refuses the version-2 ask and then the version-1 one (asked in case it was
    of an earlier release) is reported by its first refusal: the second was only a guess."""
    runtime = short_tmpdir()
    patch = (
        "import membacking.manager.handover as h; from membacking.manager.errors import Refused\n"
        "def _agree(daemon, args):\n"
        "    if args.get('version') == 2: raise Refused('bad-request', 'the real reason')\n"
        "    raise Refused('version-mismatch', 'a guess refused')\n"
        "h._agree = _agree"
    )
    older = subprocess.Popen(
        python_cli(
            "manager", "run", "--runtime-dir", str(runtime), "--region", "ram0=0:8M", patch=patch
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=cli_env(),
    )
    try:
        assert older.stdout is not None and b"ready" in older.stdout.readline()
        done = run_cli("manager", "run", "--region", "ram0=0:8M", "--takeover", runtime_dir=runtime)
        assert done.returncode == 1, done.stderr
        assert "refuses to hand over: the real reason" in done.stderr, done.stderr
        assert older.poll() is None
    finally:
        older.terminate()
        older.wait(15)
