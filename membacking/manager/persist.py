"""The daemon's hooks into its state directory: adopt a journaled state at start (or refuse it),
journal the region table after each change, and end or keep the state at a clean stop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..protocol import messages as m
from ..protocol.codec import encode
from ..runtime import RuntimePaths
from .backing import MemfdStore
from .journal import JournalError, Snapshot, decode, decode_head, read_bytes
from .journalcache import JournalEncoder
from .pins import process_start
from .snapshot import check_fits, restore
from .state import ManagerState
from .statedir import STATE_POINTER, StateDir, StateDirError, default_state_dir, region_text

log = logging.getLogger("membacking.manager")

#: control operations that change nothing the journal keeps (no snapshot is taken for them)
READ_ONLY_OPS = frozenset({"regions", "mappings", "mappers", "mapper_held", "stats", "status"})


@dataclass(frozen=True)
class PersistConfig:
    #: the state directory (None: the default one for the runtime directory)
    state_dir: Path | None = None
    #: False: no state directory at all; RAM is sealed memfds that die with the manager
    enabled: bool = True
    #: discard a state found there instead of adopting it
    fresh: bool = False
    #: a clean stop keeps the state (guest memory) for the next start instead of ending it
    keep: bool = False
    #: the service manager's fd store (`fdstore`): auto (under systemd), on, off
    fd_store: str = "auto"


def adopted_region(
    state: ManagerState,
    name: str,
    want: tuple[int, int, bool, str, str | None],
    where: str = "the adopted state",
) -> bool:
    """Whether an initial region (gpa, size, read-only, backing, file) came back from an
    adopted state (state directory or fd store): it must be the configured memory (another
    one is refused, not silently kept or replaced). Where it is placed is the state's, as
    whether it is enabled: a `region move` made while running survives a restart (logged)."""
    region = state.regions.get(name)
    if region is None:
        return False
    have = (region.gpa, region.size, not region.writable, region.backing, region.path)
    if have[0] != want[0] and have[1:] == want[1:]:
        log.warning(
            "region %r stays where it was placed while running (%s; --region/config says %s): "
            "`membacking region move` places it",
            name,
            "unplaced" if have[0] is None else f"{have[0]:#x}",
            "unplaced" if want[0] is None else f"{want[0]:#x}",
        )
    elif have != want:
        ram = state.store.ram_kind  # RAM named as `membacking regions` names it
        have_text, want_text = region_text(*have, ram=ram), region_text(*want, ram=ram)
        raise StateDirError(
            f"region {name!r} in {where} is {have_text}, but --region/config "
            f"asks for {want_text}. Start without that region in --region/config to "
            "keep the state (the region comes back as it was), or with --fresh to discard the "
            "state (its guest memory is lost)"
        )
    return True


def unjournaled(state: ManagerState, msg: m.Message, data: bytes) -> bytes:
    """The answer to a change (`data`, `msg` encoded), marked `not_journaled` with the reason
    where the journal could not be written (a full file system): a crash before a later save
    works would lose that change, which the client is told."""
    error = state.persistence.get("journal_error")
    if error is None or not isinstance(msg, m.ControlReply) or not isinstance(msg.result, dict):
        return data
    return encode(m.ControlReply({**msg.result, "not_journaled": error}))


def describe(persist: Persistence | None, config: PersistConfig, fd_store: bool) -> dict[str, Any]:
    """What `status` says of the state: the state directory in use (None with --no-state),
    whether a clean stop keeps the state, whether systemd's fd store holds memory too."""
    return {
        "state_dir": str(persist.dir.root) if persist is not None else None,
        "keep_state": config.keep and (persist is not None or fd_store),
        "fd_store": fd_store,
    }


class Persistence:
    """Owns the state directory for one daemon run."""

    def __init__(self, config: PersistConfig, paths: RuntimePaths) -> None:
        self.config = config
        self.paths = paths
        self.dir = StateDir(config.state_dir or default_state_dir(paths))
        self.state_id = b""
        #: regions adopted from the journal at start (0: started fresh)
        self.adopted = 0
        #: no state was there (or --fresh): a start that fails leaves nothing behind
        self.fresh = False
        self._rollbacks = 0
        self._adopted_note: str | None = None
        #: the last save failure logged (a failure logged once, not at every change)
        self._save_error: str | None = None
        #: the journal's records packed so far: a save packs only the regions changed since
        self._encoder = JournalEncoder()
        #: what `prepare` adopted: the journal's snapshot and the bytes of its regions and
        #: backings (None: nothing prepared)
        self._prepared: tuple[Snapshot, bytes, list[str]] | None = None

    def prepare(self, state: ManagerState, store: MemfdStore) -> Snapshot | None:
        """Before a handover, while the running daemon still holds the directory: adopt its
        journal as it stands into the empty `state`/`store` (open and check every memory file,
        build the table, pack the journal's records), so that `open` has only to read what
        changed since. Returns the snapshot (None if there is none); JournalError or
        StateDirError if it does not fit (`state`/`store` are left empty then)."""
        self.dir.filesystem()  # what `open_prepared` checks, read now
        data = self.dir.read_bytes()
        if data is None:
            return None
        snapshot = decode(data)
        check_fits(snapshot, str(self.paths.root), state.address_space)
        if any(b.kind in ("memfd", "hugetlb") for b in snapshot.backings):
            return snapshot  # its fds come from the old daemon once it stopped: not prepared
        warnings = restore(snapshot, state, store)
        _, tail = decode_head(data)
        self._prepared = (snapshot, tail, warnings)
        self._encoder.encode(state, store, snapshot.state_id, str(self.paths.root))
        return snapshot

    @property
    def prepared(self) -> bool:
        """Whether `prepare` adopted a state that `open_prepared` can take."""
        return self._prepared is not None

    def open_prepared(self, state: ManagerState, store: MemfdStore) -> bool:
        """`open` for a `state`/`store` that `prepare` filled: claim the directory and, if the
        journal's regions and backings are still the very bytes prepared, take only its other
        fields (counters, id counters). False (the directory claimed, nothing adopted) if they
        changed since: the caller adopts again into an empty state with `adopt`."""
        assert self._prepared is not None
        prepared, tail, warnings = self._prepared
        self._prepared = None
        self.dir.acquire()
        try:
            data = self.dir.read_bytes()
            head, now = decode_head(data) if data is not None else (None, b"")
        except JournalError:
            head, now = None, b""  # `adopt` says what is wrong
        except BaseException:
            self.dir.release(remove=False)
            raise
        if (
            head is None
            or now != tail
            or (head.state_id, head.uid, head.runtime_dir, head.address_space, head.pins)
            != (
                prepared.state_id,
                prepared.uid,
                prepared.runtime_dir,
                prepared.address_space,
                prepared.pins,
            )
        ):
            log.info("the state changed while it was prepared: adopting it again")
            self._encoder = JournalEncoder()
            return False
        state.counters.subtract(prepared.counters)
        state.counters.update(head.counters)
        state._next_mappable_id = max(head.next_mappable_id, state._next_mappable_id)
        state._next_order = max(head.next_order, state._next_order)
        state._next_mapper_id = max(head.next_mapper_id, state._next_mapper_id)
        state.awaited.adopt(head.mappers)  # those of now, not of when it was prepared
        self._adopted(prepared, warnings)
        return True

    def adopt(self, state: ManagerState, store: MemfdStore) -> None:
        """`open` after `open_prepared` returned False (the directory is claimed already)."""
        try:
            self._adopt(state, store)
        except BaseException:
            self.dir.release(remove=False)
            raise

    def open(self, state: ManagerState, store: MemfdStore) -> None:
        """Claim the directory and adopt its state into the empty `state`/`store`, or start
        fresh when there is none (or --fresh). StateDirError when it does not fit, or when
        the manager before on this runtime directory kept a state elsewhere."""
        self._check_pointer()
        self.dir.acquire()
        try:
            self._adopt(state, store)
        except BaseException:
            self.dir.release(remove=False)
            raise
        self._remember()

    def _check_pointer(self) -> None:
        """Refuse to start over while the state the manager before on this runtime directory
        kept (named in its STATE_POINTER file) is elsewhere and still there: started again
        without its --state-dir, a daemon started fresh in the default one, and the guest's
        memory waited unnoticed in the other."""
        if self.config.fresh:
            return
        named = self.noted_state_dir()
        if named is None or named == self.dir.root:
            return
        here = self.dir.holds_state()
        if here and self.config.state_dir is not None:
            return  # a state directory named on purpose, with a state of its own
        if StateDir(named).holds_state():
            other = (
                f" (which holds an older state: --state-dir {self.dir.root} adopts that one)"
                if here
                else ""
            )
            raise StateDirError(
                f"the manager before on {self.paths.root} kept its state in {named}, not in "
                f"{self.dir.root}{other}: start with --state-dir {named} to adopt it, or with "
                f"--fresh to start without it (its memory stays in {named} until that is "
                "removed)"
            )

    def _warn_running_vms(self) -> None:
        """--fresh over a journal that pinned regions for VMs still running: say so (they run
        on memory this manager no longer serves, and nothing keeps it from change now)."""
        with contextlib.suppress(OSError, JournalError):
            data = read_bytes(self.dir.root / "journal")
            pins = decode(data).pins if data is not None else ()
            for pin in pins:
                if process_start(pin.pid) == pin.started:
                    log.warning(
                        "--fresh discards the state %s (pid %d) still runs on (regions %s): "
                        "it runs on memory this manager no longer serves; stop it",
                        pin.label,
                        pin.pid,
                        ", ".join(pin.regions),
                    )

    def noted_state_dir(self) -> Path | None:
        """The state directory the runtime directory's note names (that of the manager that
        runs or ran there last), if it names one."""
        try:
            named = Path((self.paths.root / STATE_POINTER).read_text().strip())
        except (OSError, UnicodeDecodeError):
            return None
        return named if named.is_absolute() else None

    def _remember(self) -> None:
        """Name the state directory in use in the runtime directory, for the next start."""
        pointer = self.paths.root / STATE_POINTER
        try:  # (0600, as the lock: it names where the guest's memory is kept)
            tmp = pointer.with_name(pointer.name + ".tmp")
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
            fd = os.open(tmp, flags, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"{self.dir.root}\n")
            tmp.replace(pointer)
        except OSError as exc:
            log.warning("cannot note the state directory in %s: %s", pointer, exc)

    def _adopt(self, state: ManagerState, store: MemfdStore) -> None:
        hint = (
            f"the state in {self.dir.root} cannot be used: {{}}. Nothing was changed; start "
            "with --fresh to discard it (its guest memory is lost), or give another --state-dir"
        )
        try:
            snapshot = None if self.config.fresh else self.dir.read()
        except JournalError as exc:
            raise StateDirError(hint.format(exc)) from None
        if snapshot is None:
            if self.config.fresh:
                log.warning("starting fresh: discarding any state in %s", self.dir.root)
                self._warn_running_vms()
            else:
                kept = self.dir.memory_files()
                if kept:  # guest memory whose journal is gone: never discarded unasked
                    raise StateDirError(
                        hint.format(
                            f"it holds {len(kept)} memory files ({', '.join(kept[:4])}"
                            f"{', ...' if len(kept) > 4 else ''}) but no journal, so what "
                            "they held cannot be adopted"
                        )
                    )
            self.dir.reset()
            self.state_id = secrets.token_bytes(16)
            self.fresh = True
            return
        try:
            check_fits(snapshot, str(self.paths.root), state.address_space)
            warnings = restore(snapshot, state, store)
        except StateDirError as exc:
            raise StateDirError(hint.format(exc)) from None
        self._adopted(snapshot, warnings)

    def _adopted(self, snapshot: Snapshot, warnings: list[str]) -> None:
        self.state_id = snapshot.state_id
        self.adopted = len(snapshot.regions)
        for warning in warnings:
            log.error("restored state: %s", warning)
        keep = {b.name for b in snapshot.backings if b.kind == "shm"}
        orphans = self.dir.remove_orphans(keep)
        if orphans:
            log.info("removed %d memory files no journal named: %s", len(orphans), orphans)
        # logged by `announce` once the whole start was accepted
        self._adopted_note = f"{len(snapshot.regions)} regions, {len(snapshot.backings)} backings"

    def has_region(
        self, state: ManagerState, name: str, want: tuple[int, int, bool, str, str | None]
    ) -> bool:
        return adopted_region(state, name, want, f"the state in {self.dir.root}")

    def save(self, state: ManagerState, store: MemfdStore) -> None:
        """Journal the region table if it changed since the last save (the regions that did
        not change are not packed again)."""
        data = self._encoder.encode(state, store, self.state_id, str(self.paths.root))
        self.dir.write_encoded(data)

    def announce(self) -> None:
        """Log what the start adopted, once the whole start was accepted (its last step: a
        socket it cannot bind or a metrics port in use refuses it after the first save)."""
        if self._adopted_note is not None:
            log.info("adopted the state in %s: %s", self.dir.root, self._adopted_note)
            self._adopted_note = None

    def save_logged(self, state: ManagerState, store: MemfdStore) -> bool:
        """`save`, logging a failure (the change stands; a crash now would lose it), which
        `status` then names (state.persistence["journal_error"]) until a save succeeds."""
        try:
            self.save(state, store)
        except OSError as exc:
            error = f"cannot journal in {self.dir.root}: {exc}"
            if error != self._save_error:  # the same failure again: `status` names it
                log.error("cannot journal the region table in %s: %s", self.dir.root, exc)
            self._save_error = error
            state.persistence["journal_error"] = error
            return False
        if self._save_error is not None:
            log.info("the region table is journaled again in %s", self.dir.root)
            self._save_error = None
        state.persistence.pop("journal_error", None)
        return True

    def lost(self) -> bool:
        """Whether the state directory was removed under the daemon (`state remove --force`):
        nothing can be journaled or kept in it any more."""
        return self.dir.held and not os.path.isdir(self.dir.root)

    def tick(self, state: ManagerState, store: MemfdStore) -> None:
        """Each second: journal what acknowledgements changed (only rollbacks of an add, an
        enable or a move change what the journal keeps), or, after a save that failed (a
        full file system), try it again; then unlink the files of mappables destroyed since
        (removals that completed), once a journal that no longer names them is written: a
        file unlinked while the journal still named it made a restart refuse the state."""
        if self.lost():  # removed under the daemon (`state remove --force`)
            state.persistence["keep_state"] = False  # (shutdown.py: its stop is for good)
            state.persistence["state_dir_removed"] = True  # (`stop --keep-state` refused)
            state.persistence["journal_error"] = (
                f"the state directory {self.dir.root} was removed: nothing is journaled, and a "
                "crash or a restart now loses the guest memory kept there"
            )
        if state.counters["rollbacks"] != self._rollbacks or self._save_error is not None:
            self._rollbacks = state.counters["rollbacks"]
            self.save_logged(state, store)  # (a failure is logged once and shown by `status`)
        if self._save_error is None:
            self.dir.flush_unlinks()

    def close(self, state: ManagerState, store: MemfdStore, clean: bool) -> None:
        """At exit: a clean stop ends the state unless it is to be kept (then it is journaled
        one last time); otherwise (start failed) the directory is only unlocked, or removed if
        this start created it (it holds nothing anyone served). Once closed, nothing more:
        a later call (the daemon's last one, for a start that failed) must not take the
        runtime directory's note of a state kept by the first."""
        if not self.dir.held:
            return
        if clean and self.config.keep:
            if self.lost():
                log.error("the state directory %s was removed: nothing was kept", self.dir.root)
            else:
                try:
                    self.save(state, store)
                    log.info("kept the state in %s for the next start", self.dir.root)
                except OSError as exc:
                    log.error(
                        "cannot journal the region table in %s at the stop: %s; the "
                        "next start adopts the journal saved before",
                        self.dir.root,
                        exc,
                    )
        remove = (not self.config.keep) if clean else self.fresh
        self.dir.release(remove=remove)
        if remove:  # nothing kept: the next start on this runtime directory may use any
            with contextlib.suppress(OSError):
                (self.paths.root / STATE_POINTER).unlink()
