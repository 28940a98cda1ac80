"""Processes the benchmarks drive: a manager daemon in a subprocess, mapper processes that obey
commands over a pipe (spawned, so no ZeroMQ state is inherited across fork), the endpoints raw
baselines meet on, and every process's CPU clock.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from ..control_client import ControlClient
from ..manager.statelist import remove_state_of

_SPAWN = multiprocessing.get_context("spawn")


@contextlib.contextmanager
def endpoints() -> Iterator[tuple[str, str]]:
    """A SEQPACKET path and a ZeroMQ ipc endpoint in a fresh directory, removed afterwards."""
    directory = tempfile.mkdtemp(prefix="mb-bench-", dir="/tmp")
    try:
        yield os.path.join(directory, "fd.sock"), f"ipc://{directory}/stream"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def connect_seqpacket(path: str, timeout: float = 30.0) -> socket.socket:
    """Connect a SEQPACKET socket to `path`, waiting for its listener to appear."""
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    while True:
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                sock.close()
                raise
            time.sleep(0.01)


def stop(proc: BaseProcess, timeout: float = 10) -> None:
    """Wait for a spawned process to exit, killing it after `timeout` seconds."""
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()


class Manager:
    """`membacking manager run` in a subprocess on a private runtime directory."""

    def __init__(self, *args: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="mb-bench-", dir="/tmp"))
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "membacking",
                "manager",
                "run",
                "--runtime-dir",
                str(self.dir),
                "--log-level",
                "error",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline() if ready else b""
        if not line.startswith(b"membacking manager ready"):
            self.close()
            raise RuntimeError("the manager did not start")
        self.client = ControlClient(self.dir, timeout=120)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        remove_state_of(self.dir)  # what a manager killed above kept on /dev/shm
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def manager(*args: str) -> Iterator[Manager]:
    running = Manager(*args)
    try:
        yield running
    finally:
        running.close()


def _mapper_main(runtime_dir: str, name: str, conn: Connection) -> None:
    from ..mapper import attach

    with attach(runtime_dir, name=name) as memory:
        conn.send(("ready", memory.mapper_id))
        while True:
            command, args = conn.recv()
            if command == "quit":
                break
            if command == "touch":  # map these GPAs (one byte each)
                for gpa in args:
                    memory.read_at(gpa, 1)
                conn.send(("ok", None))
            elif command == "fault_many":  # time a first access to each GPA
                started = time.perf_counter()
                for gpa in args:
                    memory.read_at(gpa, 8)
                conn.send(("ok", time.perf_counter() - started))


class Mapper:
    """A mapper process driven over a pipe: membacking's own, or a thin one (`thin`)."""

    def __init__(self, runtime_dir: Path, name: str, thin: bool = False) -> None:
        from .thin import holder_main

        self.conn, child = _SPAWN.Pipe()
        self.proc = _SPAWN.Process(
            target=holder_main if thin else _mapper_main,
            args=(str(runtime_dir), name, child),
            daemon=True,
        )
        self.proc.start()
        child.close()
        status, self.mapper_id = self.call_raw(60)
        assert status == "ready"

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None  # started in __init__
        return self.proc.pid

    def call_raw(self, timeout: float) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError("mapper process did not answer")
        return self.conn.recv()

    def call(self, command: str, args: Any = None, timeout: float = 120) -> Any:
        self.conn.send((command, args))
        status, value = self.call_raw(timeout)
        assert status == "ok"
        return value

    def send(self, command: str, args: Any) -> None:
        self.conn.send((command, args))

    def close(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self.conn.send(("quit", None))
        self.proc.join(15)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def cpu_seconds(pids: list[int]) -> float:
    """Seconds of CPU used so far by the processes `pids`, every thread counted (those that
    ended too), read from each one's CPU clock with nanosecond resolution."""
    total = 0.0
    for pid in pids:
        # the clock id clock_getcpuclockid(3) gives for `pid` on Linux: its process-wide
        # scheduler clock (CPUCLOCK_SCHED = 2), encoded as ~pid << 3 | 2; reading another
        # process's clock needs no privilege
        try:
            total += time.clock_gettime((~pid << 3) | 2)
        except OSError as exc:
            raise RuntimeError(f"cannot read the CPU clock of pid {pid}: {exc}") from None
    return total


def rss(pid: int) -> int:
    import psutil

    return int(psutil.Process(pid).memory_info().rss)


def cpu_count() -> int:
    return os.cpu_count() or 1
