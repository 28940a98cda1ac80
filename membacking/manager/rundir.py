"""The daemon's claim on a runtime directory: a 0700 directory, an flock'ed lock file, no stale
sockets. A second daemon on the same directory is refused with the first one's pid. The lock file
says "PID INSTANCE": control clients address their requests to that daemon instance.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import resource
import secrets
import stat
import time
from pathlib import Path

from ..errors import MembackingError
from ..runtime import RuntimePaths

log = logging.getLogger("membacking.manager")


def raise_fd_limit() -> int:
    """Every region holds a memfd and every mapper three descriptors: take the hard open-file
    limit rather than the often small soft one. Returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class RuntimeDirError(MembackingError):
    """The runtime directory cannot be used (taken by another daemon, unsafe, unwritable)."""


def _lock_exclusive(fd: int, patience: float = 0.5) -> bool:
    """flock(LOCK_EX) without blocking for long: a client checking whether a daemon is alive
    holds a shared lock for a moment, so a held lock is tried again for `patience` seconds."""
    deadline = time.monotonic() + patience
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


class RuntimeDirLock:
    """Holds the runtime directory for one daemon; `release()` removes sockets and the lock."""

    def __init__(self, paths: RuntimePaths) -> None:
        self.paths = paths
        self._fd: int | None = None
        #: this daemon process's id, different at every start (written in the lock file)
        self.instance = secrets.token_hex(8)
        #: the directories `acquire` created (the runtime directory, then parents it lacked)
        self.created: list[Path] = []
        #: set when the start was refused: `release` then removes what `created` holds if
        #: nothing else was put there (a refused start leaves nothing it made)
        self.discard_created = False

    def acquire(self) -> None:
        paths = self.paths
        try:
            paths.check_lengths()
        except ValueError as exc:
            raise RuntimeDirError(str(exc)) from None
        missing = paths.root
        try:
            while not missing.exists() and missing != missing.parent:
                self.created.append(missing)
                missing = missing.parent
            paths.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = paths.root.stat()
        except (FileExistsError, NotADirectoryError):  # a file where a directory must be
            raise RuntimeDirError(
                f"cannot create runtime directory {paths.root}: it, or a directory above it, "
                "is a file"
            ) from None
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise RuntimeDirError(f"cannot create runtime directory {paths.root}: {why}") from None
        if not stat.S_ISDIR(info.st_mode):
            raise RuntimeDirError(f"runtime directory {paths.root} is not a directory")
        if info.st_uid != os.getuid():
            raise RuntimeDirError(
                f"runtime directory {paths.root} belongs to uid {info.st_uid}, not to you "
                f"(uid {os.getuid()}); choose another --runtime-dir"
            )
        if paths.root not in self.created and info.st_mode & 0o777 not in (0o700, 0o711):
            log.warning(
                "runtime directory %s had mode %o: made 0700 (only this user reaches the "
                "manager's sockets; --allow-uid opens them to others)",
                paths.root,
                info.st_mode & 0o777,
            )
        os.chmod(paths.root, 0o700)
        fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if not _lock_exclusive(fd):
            other = (os.read(fd, 64).decode(errors="replace").split() or ["?"])[0]
            os.close(fd)
            raise RuntimeDirError(
                f"another membacking manager (pid {other}) is already serving {paths.root}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {self.instance}\n".encode())
        self._fd = fd
        # The lock is ours, so any socket file left here belongs to a daemon that died.
        for path in (
            paths.fd_socket,
            paths.fd_socket_staging,
            paths.mapper_socket,
            paths.control_socket,
        ):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def release(self) -> None:
        if self._fd is None:
            return
        for path in (
            self.paths.fd_socket,
            self.paths.mapper_socket,
            self.paths.control_socket,
            self.paths.lock,
        ):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        os.close(self._fd)
        self._fd = None
        if self.discard_created:
            for made in self.created:  # deepest first; one that holds anything stays
                try:
                    os.rmdir(made)
                except OSError:
                    break
