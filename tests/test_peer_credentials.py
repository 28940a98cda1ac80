"""Who may connect: peers of other uids are refused (and may be let in by --allow-uid), and
silent or refused connections are bounded, so strangers cannot use up the daemon's descriptors
or crowd out the mappers that may attach."""

from __future__ import annotations

import contextlib
import os
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
from reliability.test_faults import record
from test_hostile_peers import baseline_fds, fd_count, fd_socket, settle, still_serving

import membacking
from membacking.protocol import messages as m
from membacking.protocol.fdpass import recv_message, send_message

from conftest import RunningManager


def test_foreign_uid_is_refused(manager: RunningManager) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to connect as another uid")
    pid = os.fork()
    if pid == 0:  # child: become uid 65534 and try to register
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            sock.settimeout(5)
            # the 0700 directory already stops an unprivileged uid from reaching the socket
            try:
                sock.connect(str(manager.runtime_dir / "fd.sock"))
            except PermissionError:
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert Path(manager.runtime_dir).stat().st_mode & 0o777 == 0o700


def _as_uid(uid: int, work: Callable[[], str]) -> str:
    """Fork, become `uid` in the child, run `work` there; what it returned, or what it raised
    (the child may not load a module: the interpreter's files are not that user's)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)
        answer = "nothing"
        try:
            os.setgid(uid)
            os.setuid(uid)
            answer = work()
        except BaseException as exc:  # report whatever happened to the parent
            answer = f"{type(exc).__name__} {exc}"
        finally:
            os.write(write_end, answer.encode())
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as pipe:
        return pipe.read().decode()


def _hello_as(uid: int, path: Path) -> str:
    """As `uid`, say Hello on the fd socket; the reply's type (or the error)."""

    def hello() -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.settimeout(5)
            sock.connect(str(path))
            with contextlib.suppress(BrokenPipeError):  # refused at once: read why
                send_message(sock, m.Hello("stranger"))
            reply, _ = recv_message(sock)
            return type(reply).__name__ + (f" {reply.code}" if isinstance(reply, m.Error) else "")

    return _as_uid(uid, hello)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another uid")
def test_peer_credentials_are_checked(start_manager: Callable[..., RunningManager]) -> None:
    refusing = start_manager("--region", "ram=0:1M")
    # an operator who widens the modes by hand still has SO_PEERCRED between strangers and memory
    os.chmod(refusing.runtime_dir, 0o755)
    os.chmod(refusing.runtime_dir / "fd.sock", 0o666)
    assert _hello_as(65534, refusing.runtime_dir / "fd.sock") == "Error forbidden"
    assert refusing.client().stats()["rejected"]["uid"] == 1


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another uid")
def test_allowed_uid_attaches_as_shipped(start_manager: Callable[..., RunningManager]) -> None:
    """--allow-uid opens exactly what the other user needs, nothing more."""
    running = start_manager("--region", "ram=0:1M", "--allow-uid", "65534")
    modes = {p.name: p.stat().st_mode & 0o777 for p in running.runtime_dir.iterdir()}
    assert running.runtime_dir.stat().st_mode & 0o777 == 0o711
    assert modes == {
        "fd.sock": 0o666,
        "mapper.ipc": 0o666,
        "control.ipc": 0o600,
        "manager.lock": 0o600,
        "state-dir": 0o600,
    }
    import membacking.mapper

    pid = os.fork()
    if pid == 0:  # child: a whole mapper, as uid 65534
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            with membacking.attach(running.runtime_dir, name="nobody") as memory:
                memory.write_at(0, b"from nobody")
                code = 0
        except BaseException:
            traceback.print_exc()  # shows in the test's captured stderr
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with membacking.attach(running.runtime_dir) as memory:
        assert memory.read_at(0, 11) == b"from nobody"


def test_silent_connections_are_bounded_and_timed_out(manager: RunningManager) -> None:
    from membacking.manager.fdserver import HELLO_TIMEOUT, MAX_UNREGISTERED

    baseline = baseline_fds(manager)
    silent = [fd_socket(manager) for _ in range(MAX_UNREGISTERED)]
    deadline = time.monotonic() + 5
    while fd_count(manager.pid) < baseline + MAX_UNREGISTERED and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fd_count(manager.pid) == baseline + MAX_UNREGISTERED
    # one more is closed at once, without a word
    with fd_socket(manager) as extra:
        assert extra.recv(64) == b""
    assert manager.client().stats()["rejected"]["busy"] == 1
    # after the timeout every one of them is closed, and the daemon serves as before
    for sock in silent:
        sock.settimeout(HELLO_TIMEOUT + 5)
        assert sock.recv(64) == b""
        sock.close()
    assert manager.client().stats()["rejected"]["timeout"] == MAX_UNREGISTERED
    after = settle(manager, baseline)
    assert after == baseline
    still_serving(manager)
    record(
        "fd-socket connections that never say Hello",
        MAX_UNREGISTERED + 1,
        f"{MAX_UNREGISTERED} wait, the next is closed at once; the rest after {HELLO_TIMEOUT:g} s",
        "nothing",
        (baseline, 0),
        (after, 0),
    )


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another uid")
def test_strangers_cannot_crowd_out_allowed_mappers(
    start_manager: Callable[..., RunningManager],
) -> None:
    """With the socket open to other users, a user who is not allowed opens many silent
    connections: they wait in a queue of their own, so allowed mappers still get in."""
    from membacking.manager.fdserver import MAX_REFUSED_WAITING, MAX_UNREGISTERED

    running = start_manager("--region", "ram=0:1M", "--allow-uid", "65534")
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a stranger, uid 65533
        try:
            os.setgid(65533)
            os.setuid(65533)
            held = []
            for _ in range(MAX_UNREGISTERED + 10):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                sock.connect(str(running.runtime_dir / "fd.sock"))
                held.append(sock)
            os.write(ready_w, b"x")
            os.read(done_r, 1)
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"x"
        time.sleep(0.3)  # the daemon has accepted what it will
        with membacking.attach(running.runtime_dir, name="allowed") as memory:
            memory.write_at(0, b"in")
        rejected = running.client().stats()["rejected"]
        assert rejected["uid"] >= MAX_REFUSED_WAITING and rejected.get("busy", 0) == 0
    finally:
        os.write(done_w, b"x")
        os.waitpid(pid, 0)
        for fd in (ready_r, ready_w, done_r, done_w):
            os.close(fd)


def _control_as(uid: int, runtime_dir: Path) -> tuple[str, float]:
    """As `uid`, ask the manager's status; what was raised, and how long it took."""

    def ask() -> str:
        start = time.monotonic()
        try:
            membacking.ControlClient(runtime_dir, timeout=5).status()
            said = "no error"
        except Exception as exc:
            said = f"{type(exc).__name__}: {exc}"
        return f"{time.monotonic() - start:.3f} {said}"

    took, _, said = _as_uid(uid, ask).partition(" ")
    return said, float(took)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another uid")
def test_control_by_another_user_is_refused_at_once_saying_why(
    start_manager: Callable[..., RunningManager],
) -> None:
    """A user other than the manager's asks it something: the private runtime directory, or
    (with --allow-uid) the private control socket, is named at once, where a traceback was
    printed, or the client waited its whole timeout and blamed a stuck manager."""
    private = start_manager("--region", "ram=0:1M")
    said, took = _control_as(65534, private.runtime_dir)
    assert said.startswith("ManagerUnavailableError: permission denied: "), said
    assert str(private.runtime_dir) in said and "control commands are for the user" in said
    allowed = start_manager("--region", "ram=0:1M", "--allow-uid", "65534")
    said, took = _control_as(65534, allowed.runtime_dir)
    assert said.startswith("ManagerUnavailableError: permission denied: "), said
    assert f"{allowed.runtime_dir / 'control.ipc'} (uid 65534)" in said and "uid 0" in said
    assert "--allow-uid lets other users map guest memory" in said
    assert took < 2  # not the 5 s timeout


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another uid")
def test_an_allowed_user_may_name_the_runtime_directory(
    start_manager: Callable[..., RunningManager],
) -> None:
    """--allow-uid opens the runtime directory for search (0711), not for listing: naming it
    with --runtime-dir is taken as the environment variable is (click refused it as not
    readable, exit 2, so an allowed user could not name it)."""
    import click

    from membacking.cli.common import runtime_dir_param

    @click.command()
    @runtime_dir_param
    def named(runtime_dir: Path) -> None:
        click.echo(f"named {runtime_dir}")

    allowed = start_manager("--region", "ram=0:1M", "--allow-uid", "65534")

    def name_it() -> str:
        named.main(["--runtime-dir", str(allowed.runtime_dir)], standalone_mode=False)
        return "taken"

    assert _as_uid(65534, name_it) == "taken"
