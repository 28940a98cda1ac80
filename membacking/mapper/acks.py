"""`AckSender`: a mapper's acknowledgements (UnmapAck, MapAck) on its fd socket, in order. The
manager's loop reads them there without a ZeroMQ I/O thread in between; those the socket has no
room for wait in the mapper's queue (never dropped, and the mapper thread never waits for room).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import zmq

from ..protocol import messages as m

if TYPE_CHECKING:
    from .core import VaMapper

log = logging.getLogger("membacking.mapper")

_POLLOUT, _POLLERR = int(zmq.POLLOUT), int(zmq.POLLERR)


class AckSender:
    """Sends the acks of one mapper (mapper thread only); the queue is `mapper._acks`."""

    def __init__(self, mapper: VaMapper) -> None:
        self._mapper = mapper

    def send(self, msg: m.UnmapAck | m.MapAck) -> None:
        """Send an ack now, or queue it behind those still waiting for room."""
        mapper = self._mapper
        if mapper.gone is not None:
            return  # nobody to tell
        if not mapper._acks:
            try:
                if mapper.link.try_send(msg):
                    return
            except OSError as exc:  # gone: the fd socket's hang-up says so next
                log.warning("mapper %d: cannot send %s: %s", mapper.id, msg, exc.strerror or exc)
                return
            self._watch_for_room(True)
        mapper._acks.append(msg)

    def flush(self) -> None:
        """The fd socket has room: send the queued acks, in order, as far as it goes."""
        mapper = self._mapper
        acks = mapper._acks
        try:
            while acks and mapper.gone is None:
                if not mapper.link.try_send(acks[0]):
                    return  # still waiting for room
                acks.popleft()
        except OSError as exc:
            log.warning("mapper %d: cannot send %s: %s", mapper.id, acks[0], exc.strerror or exc)
        acks.clear()
        self._watch_for_room(False)

    def _watch_for_room(self, on: bool) -> None:
        mapper = self._mapper
        if mapper._poller is not None and mapper._fd_polled:
            fileno = mapper.link.fd_sock.fileno()
            mapper._poller.modify(fileno, _POLLERR | _POLLOUT if on else _POLLERR)
