"""SocketWatch: a mapper waiting for a new manager's fd.sock is woken by the kernel (inotify)
as the manager moves its listening socket into place, without polling, and not by the other
files a starting manager creates; where inotify is unavailable it sleeps in short steps."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from membacking import ffi
from membacking.mapper import sockwatch
from membacking.mapper.sockwatch import SocketWatch


def _bind_later(path: Path, after: float) -> threading.Thread:
    """Bind a socket at `path` after `after` seconds as a manager does: under another name
    (a file created: no wake-up), then renamed into place."""

    def bind() -> None:
        time.sleep(after)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.bind(str(path) + ".new")
        sock.listen(1)
        time.sleep(0.2)
        os.rename(str(path) + ".new", path)
        sock.close()

    thread = threading.Thread(target=bind)
    thread.start()
    return thread


def test_a_socket_moved_into_the_directory_wakes_the_wait(tmp_path: Path) -> None:
    with SocketWatch(tmp_path) as watch:
        assert watch.notified
        binder = _bind_later(tmp_path / "fd.sock", 0.2)
        started = time.monotonic()
        watch.wait(10.0)
        woke = time.monotonic() - started
        binder.join()
        assert (tmp_path / "fd.sock").exists()
        # woken by the rename (0.4 s in), not by the bind under another name (0.2 s in)
        assert 0.35 < woke < 5.0
        # nothing new since: the next wait lasts its timeout
        started = time.monotonic()
        watch.wait(0.2)
        assert time.monotonic() - started >= 0.15


def test_a_file_moved_into_the_directory_wakes_it(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    inside = tmp_path / "runtime"
    outside.mkdir()
    inside.mkdir()
    (outside / "x").write_text("x")
    with SocketWatch(inside) as watch:
        os.rename(outside / "x", inside / "x")
        started = time.monotonic()
        watch.wait(10.0)
        assert time.monotonic() - started < 5.0


def test_without_inotify_it_sleeps_in_short_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unavailable(path: str, mask: int = 0) -> int:
        raise OSError(38, "inotify_init1: Function not implemented")

    monkeypatch.setattr(ffi, "watch_directory", unavailable)
    with SocketWatch(tmp_path) as watch:
        assert not watch.notified
        started = time.monotonic()
        watch.wait(10.0)
        assert time.monotonic() - started < 1.0  # one step, then the caller looks
    assert sockwatch.POLL_STEP < 0.1


def test_watching_a_missing_directory_is_an_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        ffi.watch_directory(str(tmp_path / "missing"))
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(20):  # no descriptor leaks on the failure path
        with pytest.raises(OSError):
            ffi.watch_directory(str(tmp_path / "missing"))
    assert len(os.listdir("/proc/self/fd")) == fds


def test_files_created_in_the_directory_wake_no_one(tmp_path: Path) -> None:
    """A starting manager creates its lock and ZeroMQ sockets there first: every mapper woken
    by each of them would take the CPU from that manager."""
    with SocketWatch(tmp_path) as watch:
        (tmp_path / "manager.lock").write_text("1")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.bind(str(tmp_path / "mapper.ipc"))
        sock.close()
        started = time.monotonic()
        watch.wait(0.3)
        assert time.monotonic() - started >= 0.25
