"""A new daemon waiting for the one that agreed to hand over to release the runtime directory:
woken by the lock's removal (an inotify watch), not by looking at the lock every few
milliseconds, and still bounded by RELEASE_WAIT; a stopping daemon releases it before its
ZeroMQ context ends."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from membacking.manager import handover
from membacking.manager.daemon import Daemon
from membacking.manager.persist import PersistConfig
from membacking.manager.routers import IPC_FILE_OUTLIVES_CLOSE
from membacking.manager.rundir import RuntimeDirLock
from membacking.manager.settings import ManagerConfig
from membacking.runtime import RuntimePaths

from conftest import short_tmpdir


class CountingPaths(RuntimePaths):
    """RuntimePaths that count how often the lock is looked at."""

    looks = 0

    def manager_running(self) -> bool | None:
        self.looks += 1
        return super().manager_running()


def test_the_release_wakes_the_wait_without_polling_the_lock() -> None:
    root = Path(short_tmpdir()) / "run"
    paths = CountingPaths(root)
    lock = RuntimeDirLock(paths)
    lock.acquire()
    for name in ("fd.sock", "mapper.ipc", "control.ipc"):  # released with the lock
        (root / name).touch()
    hold = 0.4
    releaser = threading.Timer(hold, lock.release)
    started = time.monotonic()
    releaser.start()
    try:
        handover._await_release(paths, 1)
    finally:
        releaser.join()
        lock.release()
    assert time.monotonic() - started >= hold  # it did wait for the release
    assert paths.manager_running() is False
    # a look every 2 ms would be about 200; with the watch: one at the start, one per file
    # the release removed, one each RELEASE_LOOK (8 in 0.4 s)
    assert paths.looks < 2 + 4 + hold / handover.RELEASE_LOOK + 3


def test_a_lock_never_released_ends_the_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    root = Path(short_tmpdir()) / "run"
    paths = RuntimePaths(root)
    lock = RuntimeDirLock(paths)
    lock.acquire()
    monkeypatch.setattr(handover, "RELEASE_WAIT", 0.2)
    try:
        with pytest.raises(handover.HandoverError, match=r"agreed to hand over but still holds"):
            handover._await_release(paths, 1234)
    finally:
        lock.release()


class _RecordingContext:
    """A daemon's ZeroMQ context that notes, as it ends, whether the runtime directory was
    free then."""

    def __init__(self, ctx: Any, paths: RuntimePaths) -> None:
        self.ctx, self.paths = ctx, paths
        self.free_at_term: list[bool | None] = []

    def term(self) -> None:
        self.free_at_term.append(self.paths.manager_running() is False)
        self.ctx.term()


def test_a_stopping_daemon_frees_the_runtime_directory_before_its_context_ends(
    tmp_path: Path,
) -> None:
    """The context's end waits for what is queued to mappers (their Shutdown) to be
    delivered: a successor waiting for the directory does not wait for that too, where an ipc
    listener leaves its socket file as it closes (else the old order, which keeps a
    successor's socket files from being unlinked under it)."""
    runtime = short_tmpdir()
    daemon = Daemon(ManagerConfig(runtime_dir=runtime, persist=PersistConfig(enabled=False)))
    daemon.start()
    recorder = _RecordingContext(daemon._ctx, daemon.paths)
    daemon._ctx = recorder  # type: ignore[assignment]
    daemon._close_all()
    assert recorder.free_at_term == [IPC_FILE_OUTLIVES_CLOSE]
    assert daemon.paths.manager_running() is False
    shutil.rmtree(runtime, ignore_errors=True)


def test_a_successor_s_socket_files_outlive_the_listeners_of_the_daemon_before() -> None:
    """What the order above relies on, with the libzmq in use: a ROUTER bound where another
    one is still bound keeps its socket file when the first closes and its context ends."""
    if not IPC_FILE_OUTLIVES_CLOSE:
        pytest.skip(f"libzmq {zmq.zmq_version()} unlinks an ipc socket file as it closes")
    root = short_tmpdir()
    path = root / "mapper.ipc"
    old_ctx, new_ctx = zmq.Context(), zmq.Context()
    old, new = old_ctx.socket(zmq.ROUTER), new_ctx.socket(zmq.ROUTER)
    try:
        old.bind(f"ipc://{path}")
        path.unlink()  # as the old daemon's release does
        new.bind(f"ipc://{path}")
        old.close()
        old_ctx.term()
        assert path.exists()
        dealer = new_ctx.socket(zmq.DEALER)
        dealer.connect(f"ipc://{path}")
        dealer.send(b"hello")
        assert new.poll(5000) and new.recv_multipart()[1] == b"hello"
        dealer.close(0)
    finally:
        new.close(0)
        new_ctx.term()
        shutil.rmtree(root, ignore_errors=True)
