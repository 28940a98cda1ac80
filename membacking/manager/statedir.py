"""The state directory: where guest memory and the region journal outlive the manager process.

A 0700 directory of the daemon's uid (default on /dev/shm, a tmpfs) holding `journal` (see
`journal`), `mem/<mappable id>` (the memory of each RAM region, a tmpfs file) and `state.lock`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import stat
from pathlib import Path

from ..errors import MembackingError
from ..runtime import RuntimePaths
from ..units import format_size
from . import journal
from .journal import Snapshot

log = logging.getLogger("membacking.manager")

#: where state directories live unless --state-dir says otherwise (a tmpfs on Linux)
DEFAULT_PARENT = Path("/dev/shm")
#: the file in the runtime directory that names the state directory of the daemon serving it
STATE_POINTER = "state-dir"
#: file systems whose files live in memory: guest RAM there costs no disk writes
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})


class StateDirError(MembackingError):
    """The state directory cannot be used, or holds a state that does not fit this manager."""


def default_state_dir(paths: RuntimePaths) -> Path:
    """/dev/shm/membacking-<uid>-<hash of the runtime directory's real path>: one per runtime
    directory, whatever path names it (a symlink to it, /var/run for /run: a path as given
    made a restart through another name start fresh). A state kept under the hash of the
    path as given (earlier releases) is still found there."""
    real = _state_dir_for(os.path.realpath(paths.root))
    given = _state_dir_for(str(paths.root))
    if given != real and given.exists() and not real.exists():
        return given
    return real


def _state_dir_for(path: str) -> Path:
    digest = hashlib.sha256(os.fsencode(path)).hexdigest()[:16]
    return DEFAULT_PARENT / f"membacking-{os.getuid()}-{digest}"


def region_text(
    gpa: int | None,
    size: int,
    readonly: bool,
    backing: str,
    path: str | None,
    ram: str = "memfd",
) -> str:
    """A region as a --region spec gives it: size, place, backing, file, read-only. The
    backing is named as `membacking regions` names it: RAM (backing "memfd") is `ram`, where
    this manager keeps it (BackingStore.ram_kind: "shm" in a state directory, else "memfd")."""
    where = "not placed" if gpa is None else f"at {gpa:#x}"
    extra = (f" {path}" if path else "") + (", read-only" if readonly else "")
    memory = ram if backing == "memfd" else backing
    return f"{format_size(size)} ({size:#x} bytes) {where}, {memory}{extra}"


def left_behind(paths: RuntimePaths) -> str | None:
    """What a manager run with --no-state should tell of the default state directory of its
    runtime directory if a manager left a state there (killed, or stopped with --keep-state):
    it ignores it, and the guest memory in it stays allocated until adopted or removed. The
    state directory the runtime directory's note names (a --state-dir given before) too."""
    said = [w for w in (_left_in(root) for root in _states_of(paths)) if w is not None]
    return " ".join(said) or None


def _states_of(paths: RuntimePaths) -> list[Path]:
    """The default state directory of `paths`, and the one its note names if another."""
    roots = [default_state_dir(paths)]
    try:
        named = Path((paths.root / STATE_POINTER).read_text().strip())
    except (OSError, UnicodeDecodeError):
        return roots
    return [*roots, named] if named.is_absolute() and named != roots[0] else roots


def _left_in(root: Path) -> str | None:
    if _in_use(root):
        return None  # the running manager's, not left behind (a takeover is refused anyway)
    try:
        files = [e.stat() for e in os.scandir(root / "mem") if e.is_file(follow_symlinks=False)]
    except OSError:
        files = []
    if not files and not (root / "journal").exists():
        return None
    used = sum(f.st_blocks * 512 for f in files)
    size = sum(f.st_size for f in files)
    return (
        f"--no-state ignores the state left in {root} by an earlier manager: "
        f"{len(files)} memory files, {format_size(used)} in use ({format_size(size)} of guest "
        "memory), which stay allocated until that directory is removed. To keep that memory, "
        f"start without --no-state (with --state-dir {root}: the state is adopted); if nothing "
        f"needs it, remove it: membacking manager state remove --force {root}"
    )


def filesystem_of(path: Path) -> str | None:
    """The type of the file system `path` is on (from /proc/self/mountinfo: the mount point
    that is the longest prefix of it), None if it cannot be told."""
    best, kind = -1, None
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    target = str(path.resolve())
    for line in lines:
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        # mount point: field 5, octal escapes for spaces and the like; type: after " - "
        mount = fields[4].encode().decode("unicode_escape")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > best:
            best, kind = len(mount), line.split(" - ", 1)[1].split()[0]
    return kind


def _in_use(root: Path) -> bool:
    """Whether a running manager holds the state directory `root` (its state.lock)."""
    try:
        fd = os.open(root / "state.lock", os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # drops the lock if it was taken
    return False


def _check_own(path: Path, what: str, directory: bool) -> os.stat_result | None:
    """lstat `path` (None if it does not exist) and refuse what this uid must not trust: a
    symbolic link, the wrong kind of file, a file of another uid."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    kind_ok = stat.S_ISDIR(info.st_mode) if directory else stat.S_ISREG(info.st_mode)
    if stat.S_ISLNK(info.st_mode):
        raise StateDirError(
            f"{what} {path} is a symbolic link, which a state directory may not hold or be; "
            "give the path it points to, or choose another --state-dir"
        )
    if not kind_ok:
        kind = "directory" if directory else "regular file"
        raise StateDirError(f"{what} {path} is not a {kind}; choose another --state-dir")
    if info.st_uid != os.getuid():
        raise StateDirError(
            f"{what} {path} belongs to uid {info.st_uid}, not to you (uid {os.getuid()}); "
            "it is not adopted: remove it, or choose another --state-dir"
        )
    return info


class StateDir:
    """A claimed state directory (flock'ed while the daemon runs)."""

    def __init__(self, root: Path) -> None:
        self.root = root.absolute()
        self.journal = self.root / "journal"
        self.mem = self.root / "mem"
        self._lock_fd: int | None = None
        self._unlink_later: list[str] = []
        self._last_written: bytes | None = None
        #: the type of its file system, once read (`filesystem`)
        self._filesystem: tuple[str | None] | None = None

    def filesystem(self) -> str | None:
        """The type of the file system the directory is on (/proc/self/mountinfo is read
        once: a daemon taking over reads it before it asks, not after the release, when
        every mapper waits for it)."""
        if self._filesystem is None:
            self._filesystem = (filesystem_of(self.root),)
        return self._filesystem[0]

    def holds_state(self) -> bool:
        """Whether a journal or guest memory files are there (without claiming anything)."""
        return (self.root / "journal").exists() or bool(self.memory_files())

    def memory_files(self) -> list[str]:
        """The names of the files in `mem/` (guest memory kept for a journal), sorted."""
        try:
            return sorted(e.name for e in os.scandir(self.mem) if e.is_file(follow_symlinks=False))
        except OSError:
            return []

    def acquire(self) -> None:
        if not self.root.parent.is_dir():  # a typo must not create directories anywhere
            raise StateDirError(
                f"cannot create the state directory {self.root}: {self.root.parent} does not "
                "exist (create it first, or choose another --state-dir)"
            )
        try:
            self.root.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise StateDirError(
                f"cannot create the state directory {self.root}: {exc.strerror or exc} "
                "(choose another with --state-dir, or run without one: --no-state)"
            ) from None
        _check_own(self.root, "state directory", directory=True)
        self._tighten(self.root, 0o700)
        with contextlib.suppress(FileExistsError):
            self.mem.mkdir(mode=0o700)
        _check_own(self.mem, "memory directory", directory=True)
        self._tighten(self.mem, 0o700)
        lock = self.root / "state.lock"
        _check_own(lock, "lock file", directory=False)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise StateDirError(
                f"state directory {self.root} is in use by another membacking manager{who}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        _check_own(self.journal, "journal", directory=False)
        kind = self.filesystem()
        if kind is not None and kind not in MEMORY_FILESYSTEMS:
            log.warning(
                "state directory %s is on a %s file system, not a tmpfs: guest RAM is kept in "
                "files there, so the kernel writes it back to that storage (slower, and it "
                'outlives a reboot); see OPERATIONS.md, "Guest memory across restarts and crashes"',
                self.root,
                kind,
            )

    def _tighten(self, path: Path, mode: int) -> None:
        """Take away what group and others may do with `path` (of this uid), and say so."""
        info = os.stat(path, follow_symlinks=False)
        if stat.S_IMODE(info.st_mode) & 0o077:
            log.warning(
                "%s had mode %o: set to %o (only the manager's uid may use its state)",
                path,
                stat.S_IMODE(info.st_mode),
                mode,
            )
            os.chmod(path, mode, follow_symlinks=False)

    def read(self) -> Snapshot | None:
        """The journal's snapshot, None if there is none (JournalError if it is unusable)."""
        return journal.read(self.journal)

    def read_bytes(self) -> bytes | None:
        """The journal's bytes, None if there is none (JournalError if over the limit)."""
        return journal.read_bytes(self.journal)

    def write(self, snapshot: Snapshot) -> bool:
        """Store `snapshot` atomically unless it is what was stored last; then unlink the files
        of mappables destroyed before it (the journal no longer names them). True if written."""
        return self.write_encoded(journal.encode(snapshot))

    def write_encoded(self, data: bytes) -> bool:
        """`write` of a snapshot already encoded (`journal.encode` or `JournalEncoder`)."""
        written = data != self._last_written
        if written:
            journal.write_atomically(self.journal, data)
            self._last_written = data
        self.flush_unlinks()
        return written

    # ---- memory files --------------------------------------------------------------------------

    def create_file(self, name: str, size: int) -> int:
        """A new zero-filled file `mem/<name>` of `size` bytes, 0600, opened read-write. A file
        left there by a manager that died before journaling it is replaced."""
        path = self.mem / name
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            path.unlink()
            fd = os.open(path, flags, 0o600)
        try:
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        return fd

    def open_file(self, name: str) -> int:
        """Open `mem/<name>` read-write; one of this uid that group or others could use is
        made 0600 (with a warning). Its owner, size and inode are checked by the caller."""
        fd = os.open(self.mem / name, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        info = os.fstat(fd)
        if info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) & 0o077:
            log.warning(
                "%s had mode %o: set to 600 (only the manager's uid may use guest memory)",
                self.mem / name,
                stat.S_IMODE(info.st_mode),
            )
            os.fchmod(fd, 0o600)
        return fd

    def discard(self, name: str) -> None:
        """Unlink `mem/<name>` now (a file no journal has named)."""
        with contextlib.suppress(FileNotFoundError):
            (self.mem / name).unlink()

    def unlink_later(self, name: str) -> None:
        """Forget `mem/<name>` once the next journal no longer names it (mappers that still map
        it keep the memory until they unmap it)."""
        self._unlink_later.append(name)

    def flush_unlinks(self) -> None:
        for name in self._unlink_later:
            with contextlib.suppress(FileNotFoundError):
                (self.mem / name).unlink()
        self._unlink_later.clear()

    def remove_orphans(self, keep: set[str]) -> list[str]:
        """Unlink memory files the journal does not name (created or destroyed by a manager
        that died before journaling it). Returns their names."""
        gone = []
        for entry in os.scandir(self.mem):
            if entry.name not in keep:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                gone.append(entry.name)
        return sorted(gone)

    def reset(self) -> None:
        """Start fresh: forget the journal and every memory file."""
        with contextlib.suppress(FileNotFoundError):
            self.journal.unlink()
        self.remove_orphans(set())
        self._last_written = None

    @property
    def held(self) -> bool:
        """Whether this process holds the directory's lock (acquired, not released yet)."""
        return self._lock_fd is not None

    def release(self, remove: bool) -> None:
        """Unlock; with `remove`, delete the whole state (guest memory ends when the last
        mapper unmaps it)."""
        if self._lock_fd is None:
            return
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)
        os.close(self._lock_fd)
        self._lock_fd = None
