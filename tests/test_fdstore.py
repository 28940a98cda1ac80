"""The systemd fd store keeps memfd memory across a crash: a real Unix datagram socket plays the
service manager (it keeps what FDSTORE=1 datagrams carry, drops what FDSTOREREMOVE=1 names),
the daemon is SIGKILLed, and a second daemon gets the stored fds as systemd passes them
(LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES, fds from 3 on) and serves every byte again."""

from __future__ import annotations

import fcntl
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import membacking
from membacking.manager.backing import MemfdStore
from membacking.manager.fdstore import LISTEN_FDS_START, FdStore, inherited_fds
from membacking.manager.state import ManagerState

from conftest import READY_TIMEOUT, cli_env, short_tmpdir

MiB = 1 << 20
# bash, not sh: dash's redirections take fd numbers up to 9 only
WRAPPER = ("bash", "-c")
DAEMON = (sys.executable, "-m", "membacking", "manager", "run")
REGIONS = ("--no-state", "--region", "ram0=0:8M", "--region", "rom=0xfff00000:1M:ro")


def pattern(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


class ServiceManager:
    """The fd-store half of systemd's notify socket: a real AF_UNIX datagram socket."""

    def __init__(self, where: Path) -> None:
        self.path = where / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.stored: list[tuple[str, int]] = []
        self.messages: list[str] = []
        # it reads all the time, as systemd does (a full queue would block the daemon's sends)
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.done.is_set():
            if select.select([self.sock], [], [], 0.05)[0]:
                self.pump()

    def pump(self) -> None:
        """Take every datagram waiting, as systemd would."""
        with self.lock:
            self._pump()

    def _pump(self) -> None:
        while select.select([self.sock], [], [], 0)[0]:
            data, fds, _, _ = socket.recv_fds(self.sock, 65536, 253)
            text = data.decode()
            self.messages.append(text)
            fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
            name = fields.get("FDNAME", "stored")
            if fields.get("FDSTORE") == "1":
                self.stored.extend((name, fd) for fd in fds)
                continue
            for fd in fds:
                os.close(fd)
            if fields.get("FDSTOREREMOVE") == "1":
                for kept, fd in [e for e in self.stored if e[0] == name]:
                    os.close(fd)
                    self.stored.remove((kept, fd))

    def names(self) -> list[str]:
        self.pump()
        return sorted(name for name, _ in self.stored)

    def close(self) -> None:
        self.done.set()
        self.thread.join()
        for _, fd in self.stored:
            os.close(fd)
        self.sock.close()


@pytest.fixture
def service() -> Iterator[ServiceManager]:
    where = short_tmpdir("mbsd-")
    manager = ServiceManager(where)
    yield manager
    manager.close()
    shutil.rmtree(where, ignore_errors=True)


def launch(
    runtime_dir: Path, service: ServiceManager, *args: str, pass_store: bool = True
) -> subprocess.Popen[bytes]:
    """Start the daemon as systemd would: NOTIFY_SOCKET, and the stored fds at 3, 4, ... with
    LISTEN_FDS/LISTEN_FDNAMES and LISTEN_PID set by a wrapper to its own pid before exec."""
    with service.lock:
        service._pump()
        stored = list(service.stored) if pass_store else []
        # copies above 3 + len(stored), moved down to 3.. by the wrapper
        base = LISTEN_FDS_START + len(stored) + 16
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, base) for _, fd in stored]
    moves = " ".join(f"{3 + i}<&{fd}" for i, fd in enumerate(high))
    closes = " ".join(f"{fd}<&-" for fd in high)
    script = f'exec {moves} {closes}; LISTEN_PID=$$ exec "$@"' if high else 'exec "$@"'
    env = cli_env()
    env["NOTIFY_SOCKET"] = str(service.path)
    if high:
        env["LISTEN_FDS"] = str(len(high))
        env["LISTEN_FDNAMES"] = ":".join(name for name, _ in stored)
    try:
        return subprocess.Popen(
            [*WRAPPER, script, "sh", *DAEMON, "--runtime-dir", str(runtime_dir), *args],
            env=env,
            pass_fds=high,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    finally:
        for fd in high:
            os.close(fd)


def ready(proc: subprocess.Popen[bytes]) -> str:
    assert proc.stdout is not None
    line = b""
    deadline = time.monotonic() + READY_TIMEOUT
    while not line.endswith(b"\n"):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            _, err = proc.communicate()
            raise AssertionError(f"manager did not become ready: {err.decode()}")
        if select.select([proc.stdout], [], [], 0.2)[0]:
            line += os.read(proc.stdout.fileno(), 4096)
    return line.decode()


def wait_for(condition: object, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not callable(condition) or not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=15)


def memfds_open(pid: int) -> list[str]:
    fd_dir = Path(f"/proc/{pid}/fd")
    return sorted(
        target
        for target in (os.readlink(p) for p in fd_dir.iterdir() if p.name.isdigit())
        if target.startswith("/memfd:")
    )


def test_sigkill_keeps_memfd_regions_through_the_fd_store(service: ServiceManager) -> None:
    runtime_dir = short_tmpdir()
    first = launch(runtime_dir, service, *REGIONS)
    second: subprocess.Popen[bytes] | None = None
    try:
        assert "fd-store=on" in ready(first)
        client = membacking.ControlClient(runtime_dir)
        client.add_region("dev", 0x10000000, 2 * MiB, priority=1)
        client.add_region("doomed", 0x20000000, MiB)
        client.map_range("ram0", 2 * MiB, MiB)  # ram0's middle gets a backing of its own
        with membacking.attach(runtime_dir) as memory:
            memory.write_at(0, pattern(1, 8 * MiB))
            memory.write_at(0x10000000, pattern(2, 2 * MiB))
            memory.write_at(0x20000000, b"doomed")
        client.remove_region("doomed")
        regions_before = client.regions()
        client.close()
        # ram0 (two backings), rom, dev; doomed's memfd leaves once its removal completes
        wait_for(lambda: sum(n.startswith("mem.") for n in service.names()) == 4, "4 memfds")
        assert sum(n.startswith("state.") for n in service.names()) == 1
        keeper = membacking.attach(runtime_dir, name="keeper")  # stays attached through it all
        assert keeper.read_at(0, 4) == pattern(1, 4)
        kill(first)

        second = launch(runtime_dir, service, *REGIONS)
        line = ready(second)
        assert "fd-store=on" in line and "adopted=3" in line, line
        client = membacking.ControlClient(runtime_dir)
        # the mapper registers again and keeps its mapping: the same memfd came back
        keeper.write_at(0, b"still the same memory")
        wait_for(lambda: client.stats()["mappers"] == 1, "the mapper registers again")
        time.sleep(0.5)  # an Unmap of what it holds would have come by now
        assert any(r.start == 0 for r, _ in keeper.mapped_ranges()), keeper.mapped_ranges()
        ram0 = next(r for r in client.regions() if r["name"] == "ram0")
        assert ram0["holders"], ram0
        keeper.detach()
        after = client.regions()
        assert [{k: r[k] for k in r if k != "holders"} for r in after] == [
            {k: r[k] for k in r if k != "holders"} for r in regions_before
        ]
        with membacking.attach(runtime_dir) as memory:
            assert memory.read_at(0, 21) == b"still the same memory"
            assert memory.read_at(21, 8 * MiB - 21) == pattern(1, 8 * MiB)[21:]
            assert memory.read_at(0x10000000, 2 * MiB) == pattern(2, 2 * MiB)
            with pytest.raises(membacking.ReadOnlyError):
                memory.write_at(0xFFF00000, b"x")
            with pytest.raises(membacking.NoMappingError):
                memory.read_at(0x20000000, 1)  # the removal stands
        # the restored backings, each once (plus the read-only reopen of rom); no journal copy
        held = memfds_open(second.pid)
        assert not [t for t in held if "state" in t], held
        assert len(held) == 5, held
        # it goes on mirroring: a new region is pushed, the store holds one journal
        client.add_region("late", 0x30000000, MiB)
        client.close()
        names = service.names()
        assert sum(n.startswith("mem.") for n in names) == 5, names
        assert sum(n.startswith("state.") for n in names) == 1, names
        # a clean stop ends guest memory: the store is emptied
        second.send_signal(signal.SIGTERM)
        assert second.wait(15) == 0
        assert service.names() == []
    finally:
        kill(first)
        if second is not None:
            kill(second)
        shutil.rmtree(runtime_dir, ignore_errors=True)


def crashed_store(service: ServiceManager, runtime_dir: Path) -> None:
    proc = launch(runtime_dir, service, *REGIONS)
    try:
        ready(proc)
        with membacking.attach(runtime_dir) as memory:
            memory.write_at(0, b"kept")
    finally:
        kill(proc)
    assert len(service.names()) == 3, service.names()  # ram0, rom, the journal


def refused(proc: subprocess.Popen[bytes]) -> str:
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    text = err.decode()
    assert "Traceback" not in text, text
    return text


def test_fds_that_do_not_match_the_journal_are_refused_until_fresh(
    service: ServiceManager,
) -> None:
    runtime_dir = short_tmpdir()
    try:
        crashed_store(service, runtime_dir)
        # another memfd of the same size in place of ram0's: not the memory the journal names
        index = next(
            i for i, (n, fd) in enumerate(service.stored) if os.fstat(fd).st_size == 8 * MiB
        )
        name, fd = service.stored[index]
        os.close(fd)
        stranger = os.memfd_create("stranger")
        os.ftruncate(stranger, 8 * MiB)
        service.stored[index] = (name, stranger)
        text = refused(launch(runtime_dir, service, *REGIONS))
        assert "is not in the service manager's fd store" in text and "--fresh" in text, text
        assert len(service.names()) == 3  # a refusal changes nothing

        # a corrupt journal is refused too
        journal = next(i for i, (n, _) in enumerate(service.stored) if n.startswith("state."))
        name, fd = service.stored[journal]
        os.close(fd)
        garbage = os.memfd_create("garbage")
        os.write(garbage, b"not a journal")
        service.stored[journal] = (name, garbage)
        text = refused(launch(runtime_dir, service, *REGIONS))
        assert "journal in the service manager's fd store cannot be used" in text, text

        fresh = launch(runtime_dir, service, *REGIONS, "--fresh")
        try:
            assert "adopted=0" in ready(fresh)
            assert len(memfds_open(fresh.pid)) == 3  # ram0, rom and its read-only reopen
            # the old descriptors were dropped from the store, the new ones pushed
            assert len(service.names()) == 3, service.names()
            with membacking.attach(runtime_dir) as memory:
                assert memory.read_at(0, 4) == bytes(4)
        finally:
            kill(fresh)
    finally:
        shutil.rmtree(runtime_dir, ignore_errors=True)


def test_keep_state_without_a_state_dir_keeps_the_store(service: ServiceManager) -> None:
    runtime_dir = short_tmpdir()
    try:
        proc = launch(runtime_dir, service, *REGIONS, "--keep-state")
        try:
            ready(proc)
            with membacking.attach(runtime_dir) as memory:
                memory.write_at(0, b"kept over a clean stop")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
        finally:
            kill(proc)
        assert len(service.names()) == 3, service.names()
        again = launch(runtime_dir, service, *REGIONS)
        try:
            assert "adopted=2" in ready(again)
            with membacking.attach(runtime_dir) as memory:
                assert memory.read_at(0, 22) == b"kept over a clean stop"
        finally:
            kill(again)
    finally:
        shutil.rmtree(runtime_dir, ignore_errors=True)


def test_with_a_state_dir_stray_descriptors_are_dropped_or_refused(
    service: ServiceManager,
) -> None:
    runtime_dir = short_tmpdir()
    state = Path(tempfile.mkdtemp(prefix="mbfd-", dir="/dev/shm"))
    args = ("--state-dir", str(state), "--region", "ram0=0:1M")
    try:
        proc = launch(runtime_dir, service, *args)
        try:
            ready(proc)  # RAM is a tmpfs file there: nothing for the fd store
        finally:
            kill(proc)
        assert service.names() == []
        # a memfd the journal does not name (a crash between pushing it and journaling it)
        stray = os.memfd_create("stray")
        service.stored.append(("mem.7", stray))
        proc = launch(runtime_dir, service, *args)
        try:
            assert "adopted=1" in ready(proc)
            assert not [t for t in memfds_open(proc.pid) if "stray" in t]
            assert service.names() == []  # and it was dropped from the store
        finally:
            kill(proc)
        # the same with no journal at all: refused, the store left as it is
        service.stored.append(("mem.7", os.memfd_create("stray")))
        shutil.rmtree(state)
        text = refused(launch(runtime_dir, service, *args))
        assert "holds 1 memory descriptor but there is no journal" in text, text
        assert service.names() == ["mem.7"]
    finally:
        shutil.rmtree(runtime_dir, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)


def test_an_unreachable_service_manager_is_logged_once_and_caught_up_with() -> None:
    runtime_dir = short_tmpdir()
    where = short_tmpdir("mbsd-")
    env = cli_env()
    env["NOTIFY_SOCKET"] = str(where / "notify")  # nobody listens there yet
    late: ServiceManager | None = None
    proc = subprocess.Popen(
        [*DAEMON, "--runtime-dir", str(runtime_dir), *REGIONS],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert "fd-store=on" in ready(proc)
        client = membacking.ControlClient(runtime_dir)
        for i in range(3):
            client.add_region(f"r{i}", 0x10000000 + i * MiB, MiB)
        client.close()
        with membacking.attach(runtime_dir) as memory:
            memory.write_at(0x10000000, b"served")
            assert memory.read_at(0x10000000, 6) == b"served"
        # once it listens, the next ticks push every backing (5) and the journal
        late = ServiceManager(where)
        wait_for(lambda: late is not None and len(late.names()) == 6, "the store caught up")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
        assert proc.returncode == 0
        assert err.decode().count("cannot reach the service manager's fd store") == 1, err
        assert late.names() == []  # and the clean stop emptied it
    finally:
        kill(proc)
        if late is not None:
            late.close()
        shutil.rmtree(runtime_dir, ignore_errors=True)
        shutil.rmtree(where, ignore_errors=True)


def test_beyond_file_descriptor_store_max_is_an_error_once(
    service: ServiceManager, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(service.path))
    monkeypatch.setenv("FDSTORE", "3")  # systemd 254+ tells FileDescriptorStoreMax= so
    store = MemfdStore()
    state = ManagerState(store)
    state.state_id = b"x" * 16
    fdstore = FdStore([], with_journal=True, runtime_dir="/nowhere")
    try:
        state.add_region("a", 0, MiB, True)
        fdstore.sync(state, store)  # 1 memfd + 1 journal (+1 while a journal is replaced)
        assert "FileDescriptorStoreMax" not in caplog.text
        for i in range(3):
            state.add_region(f"r{i}", (i + 1) * MiB, MiB, True)
            fdstore.sync(state, store)
        assert caplog.text.count("FileDescriptorStoreMax= is 3") == 1, caplog.text
        assert sum(n.startswith("mem.") for n in service.names()) == 4  # it still pushes
    finally:
        store.close_all()


def test_listen_fds_for_another_process_are_left_alone() -> None:
    environ = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}
    assert inherited_fds(environ) == []
    assert environ == {}  # never passed on to children
    assert inherited_fds({"LISTEN_PID": "me", "LISTEN_FDS": "1"}) == []
