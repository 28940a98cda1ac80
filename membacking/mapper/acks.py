"""`AckQueue`: a mapper's acks (UnmapAck, MapAck) on its fd socket, where the manager's loop reads
them without a ZeroMQ I/O thread in between. Never waits for room and never drops one: what the
socket cannot take waits here, in order, until the mapper thread's poller says it has room.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable

from ..protocol import messages as m
from .fds import MapperFds
from .link import ManagerLink

log = logging.getLogger("membacking.mapper")


class AckQueue:
    """Acks of one mapper; used by its mapper thread only."""

    def __init__(
        self,
        link: ManagerLink,
        fds: MapperFds,
        mapper_id: int,
        watch_for_room: Callable[[bool], None],
    ) -> None:
        self.link = link
        self.fds = fds  # (its `lost` says the fd socket failed: acks are moot then)
        self.id = mapper_id
        #: acks the fd socket had no room for yet, in order
        self.waiting: collections.deque[m.UnmapAck | m.MapAck] = collections.deque()
        #: asks the poller to report (True) or stop reporting (False) room on the fd socket
        self._watch_for_room = watch_for_room

    def send(self, msg: m.UnmapAck | m.MapAck) -> None:
        """Send an ack, or queue it behind those still waiting for room."""
        if not self.waiting:
            try:
                if self.link.try_send(msg):
                    return
            except OSError as exc:  # gone: the fd socket's hang-up says so next
                self._lost(msg, exc)
                return
            self._watch_for_room(True)
        self.waiting.append(msg)

    def flush(self, gone: Callable[[], bool]) -> None:
        """The fd socket has room: send the queued acks, in order, as far as it goes (all are
        dropped once the manager is `gone()`: nobody to tell)."""
        acks = self.waiting
        try:
            while acks and not gone():
                if not self.link.try_send(acks[0]):
                    return  # still waiting for room
                acks.popleft()
        except OSError as exc:
            self._lost(acks[0], exc)
        acks.clear()
        self._watch_for_room(False)

    def _lost(self, msg: m.UnmapAck | m.MapAck, exc: OSError) -> None:
        """The fd socket failed: said once, and no ack is sent on it any more (core.py)."""
        why = exc.strerror or str(exc)
        if self.fds.lost is None or not isinstance(exc, ConnectionError):
            log.warning("mapper %d: cannot send %s: %s", self.id, msg, why)
        if isinstance(exc, ConnectionError):  # the manager's end is gone
            self.fds.lost = self.fds.lost or f"lost the connection to the manager: {why}"
