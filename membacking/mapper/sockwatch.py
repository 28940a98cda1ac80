"""Waiting for a new manager's fd.sock: an inotify watch of the runtime directory wakes a mapper
when a file is moved into it, as a manager puts its listening fd.sock in place (a rename), so
it neither polls (CPU every few ms, in every mapper, just when the old and new managers want
it) nor lags behind. Files created there (the lock, the ZeroMQ sockets) wake no one: every
mapper woken at once takes the CPU from the starting manager. Where inotify is unavailable
it sleeps in short steps instead; a manager that binds fd.sock in place (an earlier release)
is seen when a wait runs out."""

from __future__ import annotations

import contextlib
import os
import select
import time

from .. import ffi

#: how long one wait sleeps where inotify is unavailable (the fd socket is looked at after each)
POLL_STEP = 0.005


class SocketWatch:
    """Wakes `wait` when a file is moved into `directory`."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self._fd: int | None
        try:
            self._fd = ffi.watch_directory(os.fspath(directory), ffi.IN_MOVED_TO)
        except OSError:
            self._fd = None  # the fallback: short sleeps
        self._poll = select.poll()
        if self._fd is not None:
            self._poll.register(self._fd, select.POLLIN)

    @property
    def notified(self) -> bool:
        """Whether the kernel tells of new files (else `wait` sleeps POLL_STEP at most)."""
        return self._fd is not None

    def wait(self, timeout: float) -> None:
        """Return when a file was moved into the directory since the last call, or after
        `timeout` seconds (POLL_STEP at most without inotify)."""
        if self._fd is None:
            time.sleep(min(timeout, POLL_STEP))
            return
        if self._poll.poll(max(0.0, timeout) * 1000):
            self.drain()

    def drain(self) -> None:
        """Forget the events seen so far (the events themselves tell nothing more)."""
        if self._fd is not None:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._fd, 4096):
                    pass

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> SocketWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
