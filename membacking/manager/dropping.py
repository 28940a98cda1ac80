"""Evicted mappers given their lease to drop what they held: a change that waited on one, or
that starts within EVICT_GRACE of its eviction, completes only once the grace is over.

An evicted mapper whose process runs on learns of its eviction when its mapper thread next
turns; its accesses stop within its lease (membacking.mapper.lease.LEASE) of the Shutdown, since
a turn that starts after it drops every mapping instead of renewing the lease. Until then it
may still write what it held, even memory a change moves elsewhere.
"""

from __future__ import annotations

from .model import Operation

#: a mapper's lease (0.5 s), and as much again for an access past its lease check when the
#: lease ran out to finish its copy (its thread may wait for the interpreter lock meanwhile)
EVICT_GRACE = 1.0
#: the seq under which a change waits for an evicted mapper's grace (never a real seq: those
#: start at 1)
GRACE_SEQ = -1


class Dropping:
    """The evicted mappers still within their grace, and the changes that wait for it."""

    def __init__(self) -> None:
        self._until: dict[int, float] = {}
        self._ops: dict[int, list[Operation]] = {}

    def __bool__(self) -> bool:
        return bool(self._until)

    def evicted(self, mapper_id: int, now: float) -> None:
        """Mapper `mapper_id` was evicted at `now`: changes wait for its grace."""
        self._until[mapper_id] = now + EVICT_GRACE

    def hold(self, op: Operation, mapper_id: int | None = None) -> None:
        """Make `op` wait for the grace of `mapper_id` (None: of every mapper within one);
        marks it as held (`graced`): a change is held once."""
        op.graced = True
        for mid in self._until if mapper_id is None else (mapper_id,):
            if mid in self._until and (mid, GRACE_SEQ) not in op.waiting:
                op.waiting.add((mid, GRACE_SEQ))
                self._ops.setdefault(mid, []).append(op)

    def due(self, now: float) -> list[Operation]:
        """End the graces over by `now`; the changes that waited for them (to finish if
        nothing else holds them), each once however many graces it waited for."""
        done: dict[int, Operation] = {}
        for mid in [m for m, until in self._until.items() if until <= now]:
            del self._until[mid]
            for op in self._ops.pop(mid, []):
                op.waiting.discard((mid, GRACE_SEQ))
                done[id(op)] = op
        return list(done.values())

    def holding(self) -> tuple[list[int], int]:
        """The evicted mappers whose grace a change waits for, by id, and how many changes
        wait."""
        changes = {id(op) for ops in self._ops.values() for op in ops}
        return sorted(mid for mid, ops in self._ops.items() if ops), len(changes)

    def ops(self) -> list[Operation]:
        """The changes waiting for a grace."""
        return [op for ops in self._ops.values() for op in ops]
