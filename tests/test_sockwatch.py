"""SocketWatch: a mapper waiting for a new manager's fd.sock is woken by the kernel (inotify)
as the file appears, without polling; where inotify is unavailable it sleeps in short steps."""

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
    def bind() -> None:
        time.sleep(after)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.bind(str(path))
        sock.close()

    thread = threading.Thread(target=bind)
    thread.start()
    return thread


def test_a_socket_bound_in_the_directory_wakes_the_wait(tmp_path: Path) -> None:
    with SocketWatch(tmp_path) as watch:
        assert watch.notified
        binder = _bind_later(tmp_path / "fd.sock", 0.2)
        started = time.monotonic()
        watch.wait(10.0)
        woke = time.monotonic() - started
        binder.join()
        assert (tmp_path / "fd.sock").exists()
        assert 0.15 < woke < 5.0  # woken by the bind, long before the timeout
        # nothing new since: the next wait lasts its timeout
        started = time.monotonic()
        watch.wait(0.2)
        assert time.monotonic() - started >= 0.15


def test_a_file_moved_into_the_directory_wakes_it_too(tmp_path: Path) -> None:
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
    def unavailable(path: str) -> int:
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
