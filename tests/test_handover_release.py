"""A new daemon waiting for the one that agreed to hand over to release the runtime directory:
woken by the lock's removal (an inotify watch), not by looking at the lock every few
milliseconds, and still bounded by RELEASE_WAIT."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from membacking.manager import handover
from membacking.manager.rundir import RuntimeDirLock
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
