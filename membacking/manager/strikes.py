"""Strikes against peers of the mapper socket (ZeroMQ) whose messages do not decode: an attached
mapper is evicted after MAX_STRIKES in a row; an unattached peer, which a ROUTER cannot hang up
on, is no longer answered after as many (in a bounded table, the oldest forgotten first).
"""

from __future__ import annotations

import logging

log = logging.getLogger("membacking.manager")

#: A connection that sends this many invalid messages in a row is disconnected.
MAX_STRIKES = 8
#: unattached ZeroMQ peers whose strikes are remembered
MAX_STRANGERS = 1024


class StreamStrikes:
    """Invalid messages in a row, by attached mapper and by unattached ZeroMQ identity."""

    __slots__ = ("_mappers", "_strangers")

    def __init__(self) -> None:
        self._mappers: dict[int, int] = {}  # mapper id -> invalid messages in a row
        self._strangers: dict[bytes, int] = {}  # unattached identity -> invalid messages

    def ignored(self, identity: bytes) -> bool:
        """Whether an unattached peer struck out (its messages are dropped unanswered)."""
        return self._strangers.get(identity, 0) >= MAX_STRIKES

    def valid(self, mapper_id: int) -> None:
        """An attached mapper sent a message the manager acted on (not one it refused, such
        as an ack of an unknown seq): its row of strikes ends."""
        self._mappers.pop(mapper_id, None)

    def attached(self, identity: bytes) -> None:
        """A peer attached: what it did as a stranger is forgotten."""
        self._strangers.pop(identity, None)

    def stranger(self, identity: bytes) -> None:
        """Count an invalid message from a peer that never attached."""
        self._strangers[identity] = self._strangers.pop(identity, 0) + 1
        if self._strangers[identity] == MAX_STRIKES:
            log.warning("ignoring an unattached ZeroMQ peer after %d invalid messages", MAX_STRIKES)
        while len(self._strangers) > MAX_STRANGERS:
            del self._strangers[next(iter(self._strangers))]

    def mapper(self, mapper_id: int) -> int | None:
        """Count an invalid message from an attached mapper: its strikes in a row if that makes
        MAX_STRIKES (the mapper is to be evicted; its count starts again), else None."""
        strikes = self._mappers.get(mapper_id, 0) + 1
        if strikes < MAX_STRIKES:
            self._mappers[mapper_id] = strikes
            return None
        self._mappers.pop(mapper_id, None)
        return strikes
