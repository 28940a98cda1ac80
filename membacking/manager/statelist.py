"""The state directories on this machine, as an operator sees them: whose runtime directory each
one keeps memory for, whether a manager holds it, whether a restart still needs it; and their
removal, refused for one a manager holds or a restart would adopt unless forced.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MembackingError
from ..runtime import RuntimePaths
from ..units import format_size
from . import journal
from .pins import process_start
from .statedir import DEFAULT_PARENT, STATE_POINTER, default_state_dir

#: how a manager names a region's memory file in `mem/` (backing.py): "<id>.membacking:<region>"
_MEMORY_FILE = re.compile(r"[0-9]+\.membacking:.+")

#: what a state directory may hold (the journal's temporary file while it is written)
_ENTRIES = frozenset({"journal", "journal.tmp", "mem", "state.lock"})

HELD, KEPT, STALE, UNKNOWN, UNREADABLE, NEW = (
    "held",
    "kept",
    "stale",
    "unknown",
    "unreadable",
    "new",
)
#: a directory without a journal younger than this may be one a manager is creating (it
#: journals as it starts): it is not taken for stale
NEW_FOR = 60.0


class NotStateDir(MembackingError):
    """A path given as a state directory is not one (or cannot be read)."""


class RemovalRefused(MembackingError):
    """A state directory that a manager holds or a restart would adopt (remove it with force)."""


@dataclass(frozen=True)
class StateInfo:
    """What a state directory holds and who needs it."""

    path: Path
    #: the runtime directory its journal names (None: no journal, or an unreadable one)
    runtime_dir: str | None
    #: the pid of the process holding its lock; 0 if one holds it but its pid is unknown;
    #: None if none does
    holder: int | None
    #: False if /proc/locks could not be read (whether a manager holds it is unknown)
    lock_known: bool
    #: whether `runtime_dir` exists
    runtime_exists: bool
    #: the state directory that runtime directory's note names (None: no note)
    pointer: str | None
    regions: int | None
    memory_files: int
    #: bytes of guest memory (the files' sizes) and bytes of it in RAM (allocated blocks)
    memory_size: int
    memory_used: int
    #: seconds since the journal (else the directory) last changed
    age: float
    #: why the journal cannot be read (None: it can, or there is none)
    problem: str | None
    #: the VMs its journal pinned regions for whose processes still run: (label, pid)
    running_vms: tuple[tuple[str, int], ...] = ()

    @property
    def status(self) -> str:
        """held: a manager runs on it; kept: a manager restarted on its runtime directory
        adopts it; stale: nothing will use it again; unknown: whether one holds it is unknown;
        unreadable: its journal cannot be read here (corrupt, or of a later release, which a
        manager of that release may adopt); new: no journal yet, made within NEW_FOR seconds
        (a manager may be creating it)."""
        if self.holder is not None:
            return HELD
        if not self.lock_known:
            return UNKNOWN
        if self.problem is not None:
            return UNREADABLE
        if self.runtime_dir is None and self.age < NEW_FOR:
            return NEW
        if self.runtime_dir is None or not self.runtime_exists:
            return STALE
        if self.pointer is not None and not _same(self.pointer, self.path):
            return STALE  # its runtime directory moved on to another state directory
        return KEPT

    def as_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "status": self.status,
            "runtime_dir": self.runtime_dir,
            "runtime_dir_exists": self.runtime_exists,
            "runtime_dir_names": self.pointer,
            "holder_pid": self.holder,
            "regions": self.regions,
            "memory_files": self.memory_files,
            "memory_size": self.memory_size,
            "memory_used": self.memory_used,
            "age_seconds": round(self.age, 1),
            "problem": self.problem,
            "running_vms": [{"label": label, "pid": pid} for label, pid in self.running_vms],
        }

    def loss(self) -> str:
        """What removing it would lose, for a refusal."""
        count = self.regions
        regions = "" if count is None else f"{count} region{'' if count == 1 else 's'}, "
        lost = f"{regions}{format_size(self.memory_size)} of guest memory"
        for label, pid in self.running_vms:  # its RAM lent, still in use
            lost += f"; {label} (pid {pid}) still runs on some of it"
        return lost


def _same(a: str | Path, b: str | Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def default_locations(uid: int | None = None) -> list[Path]:
    """The state directories in the default place of this uid (`membacking-<uid>-*`)."""
    prefix = f"membacking-{os.getuid() if uid is None else uid}-"
    try:
        entries = sorted(os.scandir(DEFAULT_PARENT), key=lambda e: e.name)
    except OSError:
        return []
    mine = (e for e in entries if e.name.startswith(prefix))
    return [Path(e.path) for e in mine if e.is_dir(follow_symlinks=False)]


def flock_holders() -> dict[tuple[int, int], int] | None:
    """(device, inode) -> pid of every file flock'ed now, from /proc/locks: knowing who
    holds a lock without taking it (a shared lock taken to probe would make a manager
    starting at that moment refuse the directory as in use). None if it cannot be read."""
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    holders: dict[tuple[int, int], int] = {}
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK":  # "->" marks a waiter, not a holder
            continue
        try:
            major, minor, inode = fields[5].split(":")
            device = os.makedev(int(major, 16), int(minor, 16))
            holders[(device, int(inode))] = int(fields[4])
        except ValueError:
            continue
    return holders


def _a_link(path: Path) -> str:
    return f"{path} is a symbolic link, not a state directory: give its target"


def check_state_dir(path: Path) -> None:
    """NotStateDir unless `path` is a directory (not a symbolic link) holding only what a
    manager puts in a state directory, with a journal of the right magic or, without one,
    its lock file (a manager died before its first journal)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise NotStateDir(f"{path} does not exist") from None
    except OSError as exc:
        raise NotStateDir(f"cannot read {path}: {exc.strerror or exc}") from None
    if stat.S_ISLNK(info.st_mode):
        raise NotStateDir(_a_link(path))
    if not stat.S_ISDIR(info.st_mode):
        raise NotStateDir(f"{path} is not a membacking state directory (not a directory)")
    try:
        names = set(os.listdir(path))
    except OSError as exc:
        raise NotStateDir(f"cannot read {path}: {exc.strerror or exc}") from None
    foreign = sorted(names - _ENTRIES)
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise NotStateDir(
            f"{path} is not a membacking state directory: it holds {shown}, which a manager "
            "never puts there"
        )
    if "journal" in names:
        try:
            with open(path / "journal", "rb") as f:
                magic = f.read(len(journal.MAGIC))
        except OSError as exc:
            raise NotStateDir(f"cannot read {path / 'journal'}: {exc.strerror or exc}") from None
        if magic != journal.MAGIC:
            raise NotStateDir(
                f"{path} is not a membacking state directory: its journal is not a "
                "membacking journal"
            )
    elif "state.lock" not in names:
        raise NotStateDir(f"{path} is not a membacking state directory (no journal, no state.lock)")
    mem = path / "mem"
    if "mem" in names:
        if not mem.is_dir() or mem.is_symlink():
            raise NotStateDir(f"{path} is not a membacking state directory (mem is no directory)")
        with contextlib.suppress(OSError):
            for entry in os.scandir(mem):
                if not entry.is_file(follow_symlinks=False):
                    raise NotStateDir(
                        f"{path} is not a membacking state directory: {entry.path} is not a "
                        "regular file"
                    )
                if not _MEMORY_FILE.fullmatch(entry.name):
                    raise NotStateDir(
                        f"{path} is not a membacking state directory: {entry.path} is not "
                        "named as a manager names guest memory (<id>.membacking:<region>)"
                    )


def describe(path: Path, holders: dict[tuple[int, int], int] | None = None) -> StateInfo:
    """What the state directory `path` holds (NotStateDir if it is none). `holders` as
    `flock_holders` returns (read now if not given)."""
    path = Path(os.path.abspath(path))
    check_state_dir(path)
    if holders is None:
        holders = flock_holders()
    holder = None
    with contextlib.suppress(OSError):
        info = os.lstat(path / "state.lock")
        if holders is not None and (info.st_dev, info.st_ino) in holders:
            holder = holders[(info.st_dev, info.st_ino)] or 0
    runtime_dir, regions, problem = None, None, None
    running_vms: tuple[tuple[str, int], ...] = ()
    try:
        data = journal.read_bytes(path / "journal")
        if data is not None:
            snapshot = journal.decode(data)
            runtime_dir, regions = snapshot.runtime_dir, len(snapshot.regions)
            running_vms = tuple(
                (pin.label, pin.pid)
                for pin in snapshot.pins
                if process_start(pin.pid) == pin.started  # that process, not a later one
            )
    except (OSError, journal.JournalError) as exc:
        problem = str(exc)
    files = []
    with contextlib.suppress(OSError):
        files = [e.stat(follow_symlinks=False) for e in os.scandir(path / "mem") if e.is_file()]
    if runtime_dir is None and problem is None and files:  # no journal, memory: never stale
        problem = (
            f"no journal beside {len(files)} memory file{'s' if len(files) > 1 else ''} (a "
            "manager killed before its first journal, or a journal removed): a manager refuses "
            "to start on it, as their contents cannot be adopted without it"
        )
    try:
        changed = os.stat(path / "journal").st_mtime
    except OSError:
        changed = os.stat(path).st_mtime
    pointer = None
    if runtime_dir is not None:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            pointer = (Path(runtime_dir) / STATE_POINTER).read_text().strip() or None
    return StateInfo(
        path=path,
        runtime_dir=runtime_dir,
        holder=holder,
        lock_known=holders is not None,
        runtime_exists=runtime_dir is not None and os.path.isdir(runtime_dir),
        pointer=pointer,
        regions=regions,
        memory_files=len(files),
        memory_size=sum(f.st_size for f in files),
        memory_used=sum(f.st_blocks * 512 for f in files),
        age=max(0.0, time.time() - changed),
        problem=problem,
        running_vms=running_vms,
    )


def runtime_dir_of(path: Path) -> str | None:
    """The runtime directory the journal in `path` names, read cheaply (only the journal's
    head); None if there is no readable journal."""
    try:
        data = journal.read_bytes(path / "journal")
        return None if data is None else journal.decode_head(data)[0].runtime_dir
    except (OSError, journal.JournalError):
        return None


def survey(
    extra: list[Path], defaults: bool = True
) -> tuple[list[StateInfo], list[tuple[Path, str]]]:
    """The state directories in the default place (unless not `defaults`) and those in
    `extra`, and why one in `extra` is none ((path, message) each). One in the default place
    that is none is left out: it was removed since it was seen (a clean stop), or a manager
    is creating it."""
    holders = flock_holders()
    seen: set[str] = set()
    found: list[StateInfo] = []
    errors: list[tuple[Path, str]] = []
    asked_for = {os.path.realpath(p) for p in extra}
    links = [p for p in extra if os.path.islink(p)]
    # refused as `remove` refuses it, even where its target is listed anyway
    errors += [(link, _a_link(link)) for link in links]
    for path in [*(default_locations() if defaults else []), *extra]:
        if path in links:
            continue
        key = os.path.realpath(path)
        if key in seen:
            continue
        seen.add(key)
        asked = key in asked_for
        try:
            found.append(describe(path, holders))
        except NotStateDir as exc:
            if asked:
                errors.append((path, str(exc)))
    return found, errors


def refusal(info: StateInfo) -> str | None:
    """Why `info` may not be removed without force (None: it is stale)."""
    status = info.status
    if status == HELD:
        who = f"pid {info.holder}" if info.holder else "a process"
        return (
            f"{info.path} is held by a running manager ({who}"
            f"{f', serving {info.runtime_dir}' if info.runtime_dir else ''}): removing it would "
            f"take away its journal and memory files ({info.loss()}), so a crash or restart of "
            "that manager would lose them. Stop the manager instead (a clean stop removes it), "
            "or give --force"
        )
    if status == KEPT:
        return (
            f"{info.path} keeps the state of {info.runtime_dir}, where a manager was killed or "
            f"stopped with --keep-state: a manager started there adopts it ({info.loss()}). "
            "Removing it loses that memory; start a manager there to use it, or give --force"
        )
    if status == UNREADABLE:
        return (
            f"{info.path} has a journal that cannot be read ({info.problem}): if it is damaged "
            f"nothing will adopt it, but one written by a later release may still be adopted "
            f"by that release ({info.loss()}): give --force to remove it"
        )
    if status == NEW:
        return (
            f"{info.path} has no journal yet and changed {int(info.age)} s ago: a manager may "
            "be creating it; try again in a minute, or give --force"
        )
    if status == UNKNOWN:
        return (
            f"cannot tell whether a manager holds {info.path} (/proc/locks is unreadable): "
            "give --force to remove it anyway"
        )
    return None


def remove(path: Path, force: bool = False) -> StateInfo:
    """Remove the state directory `path`: NotStateDir if it is none, RemovalRefused unless it
    is stale or `force`. Its lock is taken while it is removed, so no manager adopts it
    meanwhile (with `force`, one held is removed under its manager)."""
    info = describe(path)
    why = refusal(info)
    if why is not None and not force:
        raise RemovalRefused(why)
    fd = None
    try:
        fd = os.open(info.path / "state.lock", os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except FileNotFoundError:
        pass
    except BlockingIOError:
        if not force:  # a manager took it since it was looked at
            assert fd is not None
            os.close(fd)
            raise RemovalRefused(f"{info.path} was taken by a manager meanwhile: kept") from None
    except OSError as exc:
        if fd is not None:
            os.close(fd)
        raise NotStateDir(f"cannot lock {info.path}: {exc.strerror or exc}") from None
    try:
        _rmtree(info.path)
    finally:
        if fd is not None:
            os.close(fd)
    return info


def _rmtree(path: Path) -> None:
    errors: list[str] = []

    def note(function: Any, name: str, exc_info: Any) -> None:
        errors.append(f"{name}: {exc_info[1].strerror or exc_info[1]}")

    shutil.rmtree(path, onerror=note)
    if errors:
        raise NotStateDir(f"cannot remove all of {path}: {errors[0]}")


def remove_state_of(runtime_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove what a manager on `runtime_dir` kept and nothing needs any more, once it is
    gone: the default state directory of that runtime directory and the one its note names,
    each if it is a state directory of that runtime directory (its journal says so, or it has
    none) that no process holds. For benchmarks and tests that kill their managers. Returns
    what was removed."""
    paths = RuntimePaths.resolve(runtime_dir)
    candidates = [default_state_dir(paths)]
    with contextlib.suppress(OSError, UnicodeDecodeError):
        named = (paths.root / STATE_POINTER).read_text().strip()
        if named:
            candidates.append(Path(named))
    removed = []
    for candidate in candidates:
        try:
            info = describe(candidate)
        except NotStateDir:
            continue
        if info.holder is not None or not info.lock_known:
            continue
        if info.runtime_dir is not None and not _same(info.runtime_dir, paths.root):
            continue
        with contextlib.suppress(MembackingError):
            remove(candidate, force=True)
            removed.append(candidate)
    return removed
