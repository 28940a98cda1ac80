"""`MapperFds`: the fds a mapper holds, keyed by mappable id, and how it gets the one a Map needs.

The manager pushes each fd on the fd socket right behind the first Map that needs it; an fd the
kernel drops on arrival (this process at its open-file limit) fails that Map, and the next Map of
the mappable asks for it again (ResendFd). Used by the mapper thread, except `dup`, which
`GuestMemory.sharing()` calls from its caller's thread.
"""

from __future__ import annotations

import bisect
import logging
import os
import resource
import struct
import threading
from collections import Counter
from collections.abc import Callable

from ..protocol import messages as m
from ..protocol.errors import ProtocolError
from ..protocol.fdpass import FdsDropped, PeerClosed, close_fds
from ..protocol.messages import Message
from .link import ManagerLink

log = logging.getLogger("membacking.mapper")

#: one entry of PackedHoldings.fds: mappable id, st_dev, st_ino
_FD = struct.Struct(m.PACKED_FD_FORMAT)


def _open_file_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


#: stream messages that need the fd socket (an fd behind them, or an ack): moot once it is lost
#: (PROTOCOL.md §9.1: what a dead manager left queued may be applied or dropped)
NEED_FD_SOCKET = (m.Map, m.MapEager, m.Unmap, m.Release)


class MapperFds:
    """The fds of one mapper, by mappable id."""

    def __init__(self, link: ManagerLink, mapper_id: int) -> None:
        self.link = link
        self.id = mapper_id
        self._held: dict[int, int] = {}
        #: (mappable id, st_dev, st_ino) of each fd held, taken when it arrived and packed as
        #: PackedHoldings lists it: what Holdings report after a manager restart, without an
        #: fstat or a pack per fd then. One buffer in mappable-id order (`_ids` beside it), so
        #: that reporting copies it at once instead of gathering a thousand objects on cold
        #: caches, and mappers holding the same fds tell the same bytes whatever order they
        #: came in (the manager checks the same bytes once)
        self._ids: list[int] = []
        self._identities = bytearray()
        #: held while an fd is received and held, closed or replaced, while another thread
        #: duplicates one (so that it never duplicates a number closed, and perhaps reused,
        #: meanwhile), and by a thread forking (forking.py: no fd is in flight then)
        self._closing = threading.Lock()
        self._denied: dict[int, list[str]] = {}  # one reason per denied Map, in order
        #: mappables whose FdGrant came without its fd, read before the Map it came behind:
        #: that Map fails
        self._unclaimed: set[int] = set()
        #: mappables whose fd was dropped and whose Map failed: the next Map asks (ResendFd)
        self._dropped: set[int] = set()
        #: Maps that gave up waiting for their grant or denial, by mappable: the answers that
        #: arrive later belong to them, not to the next Maps
        self._abandoned: Counter[int] = Counter()
        #: told of an Error read here (one refusing a tagged request: FEATURE_TAGS)
        self.on_error: Callable[[m.Error], None] | None = None
        #: a Shutdown the manager wrote on the fd socket right before closing it
        self._farewell: m.Shutdown | None = None
        #: why the fd socket failed, once a receive found it closed (None: not seen to): what
        #: the manager left on the stream then needs the fd socket for no fd or ack (core.py)
        self.lost: str | None = None

    def take_farewell(self) -> m.Shutdown | None:
        """The Shutdown that arrived on the fd socket, once (None if none did)."""
        farewell, self._farewell = self._farewell, None
        return farewell

    @property
    def fork_lock(self) -> threading.Lock:
        """The lock a fork takes first (forking.py): no fd is then between its receipt and the
        table, nor half closed."""
        return self._closing

    def get(self, mappable_id: int) -> int | None:
        """The fd held for `mappable_id` (mapper thread: others use `dup`)."""
        return self._held.get(mappable_id)

    def held(self) -> list[tuple[int, int]]:
        """(mappable id, fd) of every fd held (mapper thread)."""
        return list(self._held.items())

    def identities(self) -> list[int]:
        """mappable id, st_dev, st_ino of every fd held, one after the other (mapper thread)."""
        return [x for entry in _FD.iter_unpack(self._identities) for x in entry]

    def packed_identities(self) -> bytes:
        """(mappable id, st_dev, st_ino) of every fd held, as PackedHoldings lists them, by
        mappable id (mapper thread)."""
        return bytes(self._identities)

    def _note_identity(self, mappable_id: int, fd: int) -> None:
        info = os.fstat(fd)
        entry = _FD.pack(mappable_id, info.st_dev, info.st_ino)
        i = bisect.bisect_left(self._ids, mappable_id)
        at = i * _FD.size
        if i < len(self._ids) and self._ids[i] == mappable_id:  # replaced
            self._identities[at : at + _FD.size] = entry
        else:
            self._ids.insert(i, mappable_id)
            self._identities[at:at] = entry

    def _forget_identity(self, mappable_id: int) -> None:
        i = bisect.bisect_left(self._ids, mappable_id)
        if i < len(self._ids) and self._ids[i] == mappable_id:
            del self._ids[i]
            del self._identities[i * _FD.size : (i + 1) * _FD.size]

    def dup(self, mappable_id: int) -> int | None:
        """A duplicate of the fd held for `mappable_id`, owned by the caller (any thread)."""
        with self._closing:
            fd = self._held.get(mappable_id)
            return None if fd is None else os.dup(fd)

    def read_waiting(self) -> str | None:
        """Take every fd message waiting; the reason if the connection to the manager is lost."""
        while True:
            try:
                got = self._receive(wait=False)
            except (PeerClosed, OSError) as exc:
                reason = getattr(exc, "strerror", None) or str(exc)
                self.lost = f"lost the connection to the manager: {reason}"
                return self.lost
            except FdsDropped as exc:
                self._note_dropped(exc)
                continue
            except ProtocolError as exc:
                log.warning("mapper %d: invalid data on the fd socket: %s", self.id, exc)
                continue
            if got is None:
                return None
            self._take(*got)

    def for_map(self, mappable_id: int) -> int | str:
        """The fd of a mappable just sent a Map for (held already, right behind the Map, or
        asked for again if the kernel dropped it earlier), or why there is none."""
        while True:
            fd = self._held.get(mappable_id)
            if fd is not None:
                return fd
            reasons = self._denied.get(mappable_id)
            if reasons:  # each denial answers one Map: take this one's
                denied = reasons.pop(0)
                if not reasons:
                    del self._denied[mappable_id]
                return f"the manager denied the fd of mappable {mappable_id}: {denied}"
            if mappable_id in self._unclaimed:  # this Map's fd: dropped on arrival
                self._unclaimed.discard(mappable_id)
                self._dropped.add(mappable_id)
                return (
                    f"the fd of mappable {mappable_id} was dropped on arrival: this process is "
                    f"at its open-file limit ({_open_file_limit()})"
                )
            if mappable_id in self._dropped:
                # the manager believes it is here, so no fd follows this Map unless asked for
                # (on the fd socket, like every request: a later fault's cannot overtake it)
                try:
                    self.link.send(m.ResendFd(mappable_id))
                except OSError as exc:  # still dropped: the next Map asks again
                    why = exc.strerror or str(exc)
                    if isinstance(exc, ConnectionError):  # (not a full socket: gone)
                        self.lost = f"lost the connection to the manager: {why}"
                    return f"cannot ask for the fd of mappable {mappable_id} again: {why}"
                self._dropped.discard(mappable_id)
            try:
                got = self._receive(wait=True)
            except TimeoutError:
                self._abandoned[mappable_id] += 1
                return f"the manager did not send the fd of mappable {mappable_id}"
            except FdsDropped as exc:
                self._note_dropped(exc)  # this Map's (checked above) or one still on its way
                continue
            except (PeerClosed, OSError) as exc:
                self.lost = f"lost the connection to the manager: {exc}"
                return f"cannot receive the fd of mappable {mappable_id}: {exc}"
            except ProtocolError as exc:  # junk on the socket: ignored; the fd may still come
                log.warning("mapper %d: invalid data on the fd socket ignored: %s", self.id, exc)
                continue
            assert got is not None
            self._take(*got)

    def close(self, ids: tuple[int, ...]) -> None:
        """Close the fds of mappables the manager released (a later Map brings them again)."""
        self._unclaimed.difference_update(ids)
        self._dropped.difference_update(ids)
        with self._closing:
            close_fds([fd for fd in (self._held.pop(i, None) for i in ids) if fd is not None])
            for i in ids:
                self._forget_identity(i)

    def close_all(self) -> None:
        with self._closing:
            # forgotten before closed: a child forked meanwhile (forking.py) closes only
            # numbers still ours, never one another thread reused
            held = list(self._held.values())
            self._held.clear()
            self._ids.clear()
            self._identities.clear()
            close_fds(held)

    def close_after_fork(self) -> None:
        """In a child forked from the mapper's process (forking.py, no other thread alive):
        close every fd held, after resetting the lock a thread of the parent may have held."""
        reinit = getattr(self._closing, "_at_fork_reinit", None)  # CPython's
        if reinit is not None:
            reinit()
        self._unclaimed.clear()
        self._dropped.clear()
        self.close_all()

    def _note_dropped(self, exc: FdsDropped) -> None:
        """A grant whose fd the kernel dropped: the Map it came behind will fail."""
        if not isinstance(exc.msg, m.FdGrant):
            log.warning("mapper %d: invalid data on the fd socket: %s", self.id, exc)
            return
        mappable_id = exc.msg.mappable_id
        # the Map it came behind fails, unless that Map has failed already (then the next asks)
        (self._dropped if self._late_answer(mappable_id) else self._unclaimed).add(mappable_id)
        log.warning(
            "mapper %d: the fd of mappable %d was dropped on arrival: this process is at its "
            "open-file limit (%d); the next access to it asks for it again",
            self.id,
            mappable_id,
            _open_file_limit(),
        )

    def _late_answer(self, mappable_id: int) -> bool:
        """Whether a grant or denial of `mappable_id` answers a Map that gave up waiting for it
        (the oldest answers first); counts that Map as answered."""
        left = self._abandoned.get(mappable_id, 0)
        if left > 1:
            self._abandoned[mappable_id] = left - 1
        elif left:
            del self._abandoned[mappable_id]
        return left > 0

    def _receive(self, wait: bool) -> tuple[Message, list[int]] | None:
        """The next message on the fd socket, None if `wait` is false and none is waiting; an
        FdGrant's fd is in the table already. The receive and the hold happen under the lock a
        fork takes first (forking.py), so no child is forked with an fd that arrived and that
        the table does not name yet: the child closes every fd the table names."""
        while True:
            with self._closing:
                got = self.link.recv_fd_message()
                if got is not None and isinstance(got[0], m.FdGrant):
                    self._hold(got[0].mappable_id, got[1][0])
            if got is not None or not wait:
                return got
            self.link.wait_fd_message()

    def _hold(self, mappable_id: int, fd: int) -> None:
        """Keep `fd` for `mappable_id` (lock held)."""
        replaced = self._held.get(mappable_id)
        self._held[mappable_id] = fd
        if replaced is not None:  # sent twice (a manager bug): keep one
            close_fds([replaced])
        self._note_identity(mappable_id, fd)

    def _take(self, msg: Message, fds: list[int]) -> None:
        if isinstance(msg, m.FdGrant):  # its fd is held already (_receive)
            self._unclaimed.discard(msg.mappable_id)
            self._dropped.discard(msg.mappable_id)
            self._late_answer(msg.mappable_id)  # kept either way: the manager counts it sent
        elif isinstance(msg, m.FdDenied) and self._late_answer(msg.mappable_id):
            log.warning(
                "mapper %d: a late denial of mappable %d's fd answers a Map that gave up waiting "
                "for it: %s",
                self.id,
                msg.mappable_id,
                msg.reason,
            )
        elif isinstance(msg, m.FdDenied):
            self._denied.setdefault(msg.mappable_id, []).append(msg.reason)
        elif isinstance(msg, m.Error) and self.on_error is not None:
            self.on_error(msg)
        elif isinstance(msg, m.Shutdown):
            self._farewell = msg
        else:
            close_fds(fds)
            log.warning("mapper %d: unexpected %s on the fd socket", self.id, type(msg).__name__)
