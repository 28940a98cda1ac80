"""Shared fixtures: a real manager daemon in a subprocess on a short private runtime directory."""

from __future__ import annotations

import compileall
import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import membacking
from membacking.control_client import ControlClient
from membacking.manager.statedir import default_state_dir
from membacking.manager.statelist import default_locations, remove_state_of, runtime_dir_of
from membacking.runtime import RuntimePaths

READY_TIMEOUT = 20.0


#: every directory `short_tmpdir` made in this session (runtime directories among them)
_MADE: list[Path] = []
#: test -> state directories it left (a manager killed, or stopped with --keep-state) that
#: the cleanup after it removed
_CLEANED: dict[str, list[str]] = {}


def short_tmpdir(prefix: str = "mb-") -> Path:
    """A directory short enough for Unix socket paths (107 bytes). A manager's state left on
    /dev/shm for it as a runtime directory is removed after the test (`_no_state_left`)."""
    made = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    _MADE.append(made)
    return made


def _ours(runtime_dir: str, roots: Sequence[Path]) -> bool:
    real = os.path.realpath(runtime_dir)
    return any(real == str(r) or real.startswith(f"{r}/") for r in roots)


def _kept_for(roots: Sequence[Path]) -> list[str]:
    """The runtime directories under `roots` that state directories in the default place
    keep memory for."""
    named = (runtime_dir_of(p) for p in default_locations())
    return sorted({r for r in named if r is not None and _ours(r, roots)})


@pytest.fixture(autouse=True)
def _no_state_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test (failed or not): remove the state a manager killed in it kept for a
    runtime directory it made (`short_tmpdir`, or under pytest's tmp_path), unless a manager
    still holds it: guest memory on /dev/shm that nothing would ever use again."""
    first = len(_MADE)
    yield
    made = list(_MADE[first:])
    if {"tmp_path", "tmp_path_factory"} & set(request.fixturenames):
        factory = request.getfixturevalue("tmp_path_factory")
        made += [Path(r) for r in _kept_for([Path(os.path.realpath(factory.getbasetemp()))])]
    removed = [p for d in made for p in remove_state_of(d)]
    if removed:
        _CLEANED[request.node.nodeid] = [str(p) for p in removed]


def pytest_configure(config: pytest.Config) -> None:
    """Write the package's bytecode once, before any test starts a process. Python writes it at
    first import, except where PYTHONDONTWRITEBYTECODE is set: there every process the tests
    start (managers, mappers, command lines: hundreds in a run) compiled every module from
    source, about 200 ms of each start (a manager ready in 430 ms instead of 200)."""
    compileall.compile_dir(Path(membacking.__file__).parent, quiet=1)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a state directory of a runtime directory this session made is still
    on /dev/shm at its end: only a manager process still running holds one past the cleanup
    after each test (a test left it running)."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    roots = [Path(os.path.realpath(d)) for d in _MADE]
    if factory is not None:
        roots.append(Path(os.path.realpath(factory.getbasetemp())))
    left = [Path(r) for r in _kept_for(roots)]
    if left:
        for runtime in left:
            print(f"\na state directory of {runtime} is left on /dev/shm by this test run")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _CLEANED:
        terminalreporter.write_line(
            f"state directories left by {len(_CLEANED)} tests, removed after them: "
            + "; ".join(f"{k}: {len(v)}" for k, v in sorted(_CLEANED.items()))
        )


def cli_env(runtime_dir: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MEMBACKING_RUNTIME_DIR", None)
    if runtime_dir is not None:
        env["MEMBACKING_RUNTIME_DIR"] = str(runtime_dir)
    return env


def run_cli(
    *args: str, runtime_dir: Path | None = None, timeout: float = 60.0, input: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `python -m membacking ARGS` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "membacking", *args],
        env=cli_env(runtime_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclass
class RunningManager:
    runtime_dir: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    ready_line: str
    _extra: list[Path] = field(default_factory=list)
    _client: ControlClient | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def client(self, timeout: float = 10.0) -> ControlClient:
        """One control client per manager (it keeps its connection between calls)."""
        if self._client is None:
            self._client = ControlClient(self.runtime_dir, timeout=timeout)
        return self._client

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, runtime_dir=self.runtime_dir, timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        assert self.proc.returncode is not None
        return self.proc.returncode


def launch_manager(runtime_dir: Path, *args: str, prefix: Sequence[str] = ()) -> RunningManager:
    """Start `membacking manager run` (behind `prefix`, e.g. unshare) and wait for its ready
    line."""
    log_dir = short_tmpdir("mblog-")
    log_path = log_dir / "manager.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [
                *prefix,
                sys.executable,
                "-m",
                "membacking",
                "manager",
                "run",
                "--runtime-dir",
                str(runtime_dir),
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=log_file,
            env=cli_env(),
        )
    assert proc.stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or proc.poll() is not None:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"manager did not become ready: {log_path.read_text()}")
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                continue
            line += chunk
    text = line.decode()
    assert "membacking manager ready" in text, text  # a text line, or JSON with --log-format json
    # the default state directory (on /dev/shm) of a daemon that was killed outlives it
    state_dir = default_state_dir(RuntimePaths.resolve(runtime_dir))
    return RunningManager(runtime_dir, proc, log_path, text, [log_dir, state_dir])


@pytest.fixture
def start_manager() -> Iterator[Callable[..., RunningManager]]:
    """Factory: start_manager("--region", "ram0=0:64M", ...) -> RunningManager."""
    started: list[RunningManager] = []
    dirs: list[Path] = []

    def start(
        *args: str, runtime_dir: Path | None = None, prefix: Sequence[str] = ()
    ) -> RunningManager:
        if runtime_dir is None:
            runtime_dir = short_tmpdir()
            dirs.append(runtime_dir)
        running = launch_manager(runtime_dir, *args, prefix=prefix)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()
        for extra in running._extra:
            shutil.rmtree(extra, ignore_errors=True)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def clock() -> Any:
    """A clock the state-machine tests move by hand (test_manager_state.Clock)."""
    from test_manager_state import Clock

    return Clock()


@pytest.fixture
def state(clock: Any) -> Any:
    """A state machine on that clock and a store that records (test modules that need another
    define their own `state`)."""
    from test_manager_state import RecordingStore

    from membacking.manager.state import ManagerState

    return ManagerState(
        RecordingStore(), address_space=1 << 32, unmap_timeout=5.0, clock=clock, monotonic=clock
    )


@pytest.fixture
def manager(start_manager: Callable[..., RunningManager]) -> RunningManager:
    """A manager with one 64 MiB read-write region `ram0` at GPA 0 and a 1 MiB read-only `rom`
    at 0xfff00000."""
    return start_manager("--region", "ram0=0:64M", "--region", "rom=0xfff00000:1M:ro")


WORKER = Path(__file__).with_name("worker.py")


class Worker:
    """A mapper process running tests/worker.py, driven over its stdin/stdout."""

    def __init__(self, runtime_dir: Path, name: str, *extra: str) -> None:
        self.name = name
        self._pending = b""  # read from stdout, not yet returned by _line
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(runtime_dir), name, *extra],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
        )
        # stderr read as it comes: a worker that logs more than a pipe holds (64 KiB) would
        # block in its next log call, whichever thread makes it
        self._err: list[str] = []
        self._err_reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._err_reader.start()
        first = self._line(READY_TIMEOUT)
        if not first.startswith("ok "):
            raise RuntimeError(f"worker {name} did not attach: {first} {self.stderr()}")
        self.mapper_id = int(first.split()[1])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _line(self, timeout: float) -> str:
        """The next line the worker wrote. Read straight from the pipe into a buffer of its
        own: a buffered reader would hold a second answer that arrived with the first where
        `select` cannot see it."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._pending:
            ready, _, _ = select.select(
                [self.proc.stdout], [], [], max(0.0, deadline - time.monotonic())
            )
            if not ready:
                raise TimeoutError(f"worker {self.name} did not answer within {timeout}s")
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:  # it exited: what is left (readline's answer at the end of a file)
                line, self._pending = self._pending, b""
                return line.decode().strip()
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode().strip()

    def _read_stderr(self) -> None:
        stream = self.proc.stderr
        assert stream is not None
        with stream:  # closed here, at its end: never under a read of this thread's
            for line in stream:
                self._err.append(line)

    def stderr(self) -> str:
        """What the worker wrote on stderr (all of it once it has exited)."""
        if self.proc.poll() is not None:
            self._err_reader.join(2)
        return "".join(self._err)

    def send(self, command: str) -> None:
        """Start a command without waiting for its answer (read it with `answer`)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def answer(self, timeout: float = 30.0) -> str:
        """The next answer, which must be `ok` (without `ok `)."""
        line = self._line(timeout)
        assert line.startswith("ok"), (line, self.stderr())
        return line[3:]

    def ask(self, command: str, timeout: float = 30.0) -> str:
        """Send a command; return the answer (without `ok `), raise on `err`."""
        self.send(command)
        answer = self._line(timeout)
        if answer.startswith("err "):
            raise WorkerError(answer[4:])
        assert answer.startswith("ok"), answer
        return answer[3:]

    def maps(self) -> str:
        return Path(f"/proc/{self.pid}/maps").read_text()

    def fd_targets(self) -> list[str]:
        out = []
        for entry in Path(f"/proc/{self.pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                out.append(os.readlink(entry))
        return out

    def close(self) -> int:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, TimeoutError, AssertionError, WorkerError):
                self.ask("quit", timeout=10)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):  # (stderr: its reader closes it)
            if stream is not None:
                stream.close()
        # before the test ends: a pipe closed by the reader during the next test changed the
        # open-fd counts tests of this process compare
        self._err_reader.join(5)
        return self.proc.returncode


class WorkerError(Exception):
    """A worker answered `err`: the text is 'ExceptionClass message'."""


@pytest.fixture
def spawn_worker() -> Iterator[Callable[..., Worker]]:
    workers: list[Worker] = []

    def spawn(manager: RunningManager, name: str, *extra: str) -> Worker:
        worker = Worker(manager.runtime_dir, name, *extra)
        workers.append(worker)
        return worker

    yield spawn
    for worker in workers:
        worker.close()


class HandMapper:
    """A mapper written by hand from docs/PROTOCOL.md: the fd socket plus the stream socket (and
    with `requests_socket`, the requests socket mappers of earlier releases used), registered
    and attached, and nothing else (it reads and answers only when told to)."""

    def __init__(self, runtime_dir: Path, name: str, requests_socket: bool = False) -> None:
        import socket

        import zmq

        from membacking.protocol import messages as m
        from membacking.protocol.codec import decode, encode
        from membacking.protocol.fdpass import recv_message, send_message
        from membacking.protocol.messages import Channel
        from membacking.runtime import RuntimePaths

        paths = RuntimePaths.resolve(runtime_dir)
        self.fd_sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.fd_sock.settimeout(5)
        self.fd_sock.connect(str(paths.fd_socket))
        send_message(self.fd_sock, m.Hello(name))
        welcome, _ = recv_message(self.fd_sock)
        assert isinstance(welcome, m.Welcome), welcome
        self.welcome = welcome
        self.ctx = zmq.Context()
        sockets = []
        for role in (m.ROLE_STREAM, m.ROLE_REQUESTS)[: 2 if requests_socket else 1]:
            dealer = self.ctx.socket(zmq.DEALER)
            dealer.connect(paths.mapper_endpoint)
            dealer.send(encode(m.Attach(welcome.mapper_id, welcome.token, role)))
            assert dealer.poll(5000)
            assert decode(dealer.recv(), Channel.MAPPER) == m.Attached(role)
            sockets.append(dealer)
        self.stream = sockets[0]
        self.requests = sockets[1] if requests_socket else None

    def close(self) -> None:
        for sock in (self.stream, self.requests):
            if sock is not None:
                sock.close(0)
        self.ctx.term()
        self.fd_sock.close()


@contextlib.contextmanager
def region_toggled(runtime_dir: Path, name: str, gpa: int, size: int) -> Iterator[list[int]]:
    """While the block runs, a thread removes region `name` and adds it again (at `gpa`, of
    `size` bytes) over and over; yields a list whose only item counts the rounds."""
    stop = threading.Event()
    rounds = [0]

    def toggle() -> None:
        client = ControlClient(runtime_dir)
        try:
            while not stop.is_set():
                client.remove_region(name)
                client.add_region(name, gpa, size)
                rounds[0] += 1
        finally:
            client.close()

    toggler = threading.Thread(target=toggle)
    toggler.start()
    try:
        yield rounds
    finally:
        stop.set()
        toggler.join(30)


def stop_in_eager_replay(manager: RunningManager, worker: Worker) -> None:
    """Make `worker` eager and SIGSTOP it in the middle of its replay (its acks owed: the
    manager's status shows it waited on); the caller sends SIGCONT."""
    client = manager.client()
    worker.send("eager")
    deadline = time.monotonic() + 10
    while not client.status()["waiting_on"] and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(worker.pid, signal.SIGSTOP)
    if not client.status()["waiting_on"]:
        os.kill(worker.pid, signal.SIGCONT)
        raise AssertionError("the replay was over before the mapper stopped")
