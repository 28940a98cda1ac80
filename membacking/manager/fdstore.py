"""The service manager's file descriptor store (systemd, FDSTORE=1): every memfd and hugetlb
backing is pushed there, with a sealed memfd holding the journal when there is no state
directory, and taken back at the next start (LISTEN_FDS), so that memory outlives a crash too.

Names in the store: `mem.<mappable id>` (one backing per datagram: systemd gives every fd of a
datagram the same name and removes by name; each is also matched to the journal by inode) and
`state.<n>` (the journal; the highest n that decodes is the newest).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
import time
from collections.abc import MutableMapping, Sequence

from . import sdnotify
from .backing import MemfdStore
from .journal import MAX_JOURNAL_BYTES, BackingRecord, JournalError, decode, encode
from .persist import PersistConfig, Persistence
from .snapshot import capture, check_fits, restore
from .state import ManagerState
from .statedir import StateDirError

log = logging.getLogger("membacking.manager")

#: the first descriptor the service manager passes (SD_LISTEN_FDS_START)
LISTEN_FDS_START = 3
#: backing kinds that die with the manager unless the fd store keeps them
KEPT_KINDS = frozenset({"memfd", "hugetlb"})
#: seconds between tries after the service manager could not be reached
RETRY = 1.0
_NAME = re.compile(r"(mem|state)\.(\d+)\Z")
_HINT = (
    "; nothing was changed. Start with --fresh to discard it (its guest memory is lost), or "
    "empty the store (systemctl clean --what=fdstore membacking)"
)


def inherited_fds(environ: MutableMapping[str, str] = os.environ) -> list[tuple[str, int]]:
    """The descriptors the service manager passed to this process (LISTEN_FDS from 3 on, named
    by LISTEN_FDNAMES) as (name, fd), close-on-exec from now on. The variables are removed so
    that no child takes them for its own."""
    pid = environ.pop("LISTEN_PID", None)
    count = environ.pop("LISTEN_FDS", None)
    names = environ.pop("LISTEN_FDNAMES", None)
    if pid is None or count is None:
        return []
    try:
        mine, total = int(pid) == os.getpid(), int(count)
    except ValueError:
        log.warning("ignoring LISTEN_PID=%r LISTEN_FDS=%r: not numbers", pid, count)
        return []
    if not mine:
        log.warning("ignoring LISTEN_FDS: they were passed to pid %s, not to this process", pid)
        return []
    labels = names.split(":") if names else []
    out = []
    for i, fd in enumerate(range(LISTEN_FDS_START, LISTEN_FDS_START + max(0, total))):
        try:
            os.set_inheritable(fd, False)
        except OSError:
            continue  # not open after all
        out.append((labels[i] if i < len(labels) else "unknown", fd))
    return out


def use_fd_store(mode: str) -> bool:
    """--fd-store auto|on|off: auto uses it under a service manager ($NOTIFY_SOCKET) unless
    $FDSTORE (systemd 254+: FileDescriptorStoreMax=) says 0."""
    if mode == "off":
        return False
    if sdnotify.address() is None:
        if mode == "on":
            log.warning("--fd-store on: NOTIFY_SOCKET is not set, there is no fd store to use")
        return False
    return mode == "on" or os.environ.get("FDSTORE", "").strip() != "0"


class FdStore:
    """Mirrors the manager's backings (and, without a state directory, its journal) in the
    service manager's fd store, and restores them from what it passed at start."""

    def __init__(
        self, inherited: Sequence[tuple[str, int]], with_journal: bool, runtime_dir: str
    ) -> None:
        self.runtime_dir = runtime_dir
        #: push the journal too (no state directory keeps it)
        self.with_journal = with_journal
        limit = os.environ.get("FDSTORE", "")
        #: FileDescriptorStoreMax= when the service manager tells it (systemd 254+)
        self.limit = int(limit) if limit.isdigit() else None
        #: the journal's state id (random when nothing was adopted)
        self.state_id = secrets.token_bytes(16)
        #: regions restored from the store's journal (0: none)
        self.adopted = 0
        self._inherited = list(inherited)
        self._mem: dict[tuple[int, int], tuple[str, int]] = {}  # inherited, by (dev, ino)
        self._states: list[tuple[int, str, int]] = []  # inherited journals (n, name, fd)
        self._name_of: dict[int, str] = {}  # mappable id -> its name in the store
        self._rollbacks = -1
        self._seq = 0
        self._state_name: str | None = None
        self._journal: bytes | None = None
        self._strict = False
        self._failing = False
        self._retry_at = 0.0
        self._behind = False  # the last journal was not pushed: try again at the next tick
        self._warned_full = False

    # ---- start ---------------------------------------------------------------------------------

    def open(
        self, state: ManagerState, store: MemfdStore, persist: Persistence | None, fresh: bool
    ) -> None:
        """Adopt what the store passed: through the state directory's journal (`persist`), or
        through the store's own journal. StateDirError when it does not match."""
        self._classify(fresh)
        store.inherited = self._take
        if persist is not None:
            persist.open(state, store)
            journaled = not persist.fresh
            # the state directory keeps the journal: the store's own ones are not used
            for _, name, fd in self._states:
                os.close(fd)
                self._remove(name)
            self._states.clear()
        else:
            journaled = self._restore(state, store)
        store.inherited = None
        if self._mem and not journaled:
            raise StateDirError(
                f"the service manager's fd store holds {len(self._mem)} memory "
                f"descriptor{'s' if len(self._mem) != 1 else ''} but there is no journal to "
                "adopt them" + _HINT
            )
        taken = set(self._name_of.values())
        for name, fd in self._mem.values():  # named by no journal: a crash before journaling
            os.close(fd)
            if name not in taken:
                self._remove(name)
        if self._mem:
            log.info(
                "dropped %d descriptors from the fd store that no journal named", len(self._mem)
            )
        self._mem.clear()

    def _classify(self, fresh: bool) -> None:
        names: set[str] = set()
        for name, fd in self._inherited:
            match = _NAME.match(name)
            if match is None:
                log.warning("closing descriptor %d (%r): not one this manager stores", fd, name)
                os.close(fd)
                continue
            names.add(name)
            self._seq = max(self._seq, int(match.group(2)) + 1)
            if fresh:
                os.close(fd)
            elif match.group(1) == "state":
                self._states.append((int(match.group(2)), name, fd))
            else:
                info = os.fstat(fd)
                if (info.st_dev, info.st_ino) in self._mem:
                    os.close(fd)  # the same memory twice: the store keeps one
                else:
                    self._mem[info.st_dev, info.st_ino] = (name, fd)
        self._inherited.clear()
        if fresh:
            if names:
                log.warning("starting fresh: discarding %d descriptors of the fd store", len(names))
            for name in sorted(names):
                self._remove(name)
            return
        self._strict = bool(names)
        self._states.sort(reverse=True)

    def _restore(self, state: ManagerState, store: MemfdStore) -> bool:
        """Adopt the newest journal of the store; False if it holds none."""
        problems = []
        snapshot = None
        for _, name, fd in self._states:
            try:
                size = os.fstat(fd).st_size
                if size > MAX_JOURNAL_BYTES:
                    raise JournalError(f"{size} bytes, more than a journal can be")
                candidate = decode(os.pread(fd, size, 0))
            except (OSError, JournalError) as exc:
                problems.append(f"{name}: {exc}")
                continue
            if snapshot is None:
                snapshot, self._state_name = candidate, name
        for _, name, fd in self._states:
            os.close(fd)
            if name != self._state_name:
                self._remove(name)
        self._states.clear()
        if snapshot is None:
            if problems:
                raise StateDirError(
                    "the journal in the service manager's fd store cannot be used: "
                    + "; ".join(problems)
                    + _HINT
                )
            return False
        try:
            check_fits(snapshot, self.runtime_dir, state.address_space)
            for warning in restore(snapshot, state, store):
                log.error("restored state: %s", warning)
        except StateDirError as exc:
            raise StateDirError(
                f"the journal in the service manager's fd store: {exc}{_HINT}"
            ) from None
        self.state_id = snapshot.state_id
        self.adopted = len(snapshot.regions)
        log.info(
            "adopted %d regions and %d backings from the service manager's fd store",
            len(snapshot.regions),
            len(snapshot.backings),
        )
        return True

    def _take(self, record: BackingRecord) -> int | None:
        """The stored descriptor of a journaled memfd/hugetlb backing (MemfdStore.adopt)."""
        what = f"mappable {record.mappable_id} ({record.kind}, {record.size} bytes)"
        found = self._mem.pop((record.dev, record.ino), None) if record.ino else None
        if found is None:
            if self._strict:
                raise StateDirError(f"{what} is not in the service manager's fd store")
            return None
        name, fd = found
        size = os.fstat(fd).st_size
        if size != record.size:
            os.close(fd)
            raise StateDirError(f"{what}: the fd store's descriptor ({name}) is {size} bytes")
        self._name_of[record.mappable_id] = name
        return fd

    # ---- while serving -------------------------------------------------------------------------

    @classmethod
    def attach(cls, config: PersistConfig, runtime_dir: str) -> FdStore | None:
        """The fd store of this start (None when not used: then whatever the service manager
        passed is left alone)."""
        if not use_fd_store(config.fd_store):
            return None
        return cls(inherited_fds(), with_journal=not config.enabled, runtime_dir=runtime_dir)

    def sync(self, state: ManagerState, store: MemfdStore) -> None:
        """Make the store hold what the manager holds: new backings first, then the journal,
        then drop what the journal no longer names (a crash in between leaves extra
        descriptors, which the next start drops, never a journal naming a missing one)."""
        self._rollbacks = state.counters["rollbacks"]
        self._behind = False
        fds = {i: fd for i, (fd, kind) in store.fd_table().items() if kind in KEPT_KINDS}
        for new in sorted(set(fds) - set(self._name_of)):
            name = f"mem.{new}"
            if self._send(f"FDSTORE=1\nFDNAME={name}", [fds[new]]):
                self._name_of[new] = name
        if self.with_journal:
            self._push_journal(encode(capture(state, store, state.state_id, self.runtime_dir)))
        for gone in sorted(set(self._name_of) - set(fds)):
            self._remove(self._name_of.pop(gone))
        held = len(self._name_of) + (1 if self._state_name else 0)
        if self.limit is not None and held + 1 > self.limit and not self._warned_full:
            self._warned_full = True
            log.error(
                "the fd store needs %d descriptors, FileDescriptorStoreMax= is %d: the service "
                "manager drops the rest, and their memory would not survive a crash",
                held + 1,
                self.limit,
            )

    def tick(self, state: ManagerState, store: MemfdStore) -> None:
        """Each second: sync what acknowledgements changed (completed removals, rollbacks)."""
        table = store.fd_table()
        kept = {i for i, (_, kind) in table.items() if kind in KEPT_KINDS}
        changed = kept != set(self._name_of) or state.counters["rollbacks"] != self._rollbacks
        if changed or self._behind:
            self.sync(state, store)

    def _push_journal(self, data: bytes) -> None:
        if data == self._journal:
            return
        try:
            fd = os.memfd_create("membacking:state", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as exc:  # the change stands; a crash now would lose it (logged)
            log.error("cannot make the journal memfd for the fd store: %s", exc.strerror or exc)
            self._behind = True
            return
        try:
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(fd, view) :]
                seals = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals | fcntl.F_SEAL_SEAL)
            except OSError as exc:
                log.error("cannot write the journal memfd for the fd store: %s", exc)
                self._behind = True
                return
            name = f"state.{self._seq}"
            if not self._send(f"FDSTORE=1\nFDNAME={name}", [fd]):
                self._behind = True
                return
        finally:
            os.close(fd)
        self._seq += 1
        if self._state_name is not None:
            self._remove(self._state_name)
        self._state_name, self._journal = name, data

    def _remove(self, name: str) -> None:
        self._send(f"FDSTOREREMOVE=1\nFDNAME={name}", [])

    def _send(self, message: str, fds: list[int]) -> bool:
        """One datagram; after a failure none is tried for RETRY seconds (a stuck service
        manager costs one SEND_TIMEOUT, not one per backing); what was not pushed is pushed
        at a later sync."""
        if self._failing and time.monotonic() < self._retry_at:
            return False
        try:
            sdnotify.send(message, fds)
        except OSError as exc:
            if not self._failing:
                log.error("cannot reach the service manager's fd store: %s", exc.strerror or exc)
            self._failing = True
            self._retry_at = time.monotonic() + RETRY
            return False
        if self._failing:
            log.warning("the service manager's fd store is reachable again")
        self._failing = False
        return True

    # ---- stop ----------------------------------------------------------------------------------

    def stop(self, keep: bool) -> None:
        """A clean stop: empty the store unless the state is to be kept."""
        if keep:
            return
        for name in sorted(self._name_of.values()):
            self._remove(name)
        if self._state_name is not None:
            self._remove(self._state_name)
        self._name_of.clear()
        self._state_name = None

    def close(self) -> None:
        """Close every inherited descriptor not taken up (a start that failed)."""
        for _, fd in self._inherited:
            with contextlib.suppress(OSError):
                os.close(fd)
        for _, fd in self._mem.values():
            os.close(fd)
        for _, _, fd in self._states:
            os.close(fd)
        self._inherited.clear()
        self._mem.clear()
        self._states.clear()
