"""Changes that send many messages, sent a bounded batch per turn of the daemon's loop.

An eager mapper's replay of every mapping (SetEager) and the MapEager of many new mappings to
the eager mappers (an activation of thousands of pieces or regions) are continuations: each
`TableState.step` sends one batch, and the change they belong to is answered only once the
last batch was sent and acknowledged. Each batch reads the table as it is then.
"""

from __future__ import annotations

import bisect
import collections
import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..protocol.ranges import MemoryRange
from .held import Held
from .later import WORK_PER_MAPPABLE, WORK_PER_WINDOW
from .model import Effect, Mapping, Operation
from .placing import Place

if TYPE_CHECKING:
    from .table import TableState

#: messages (MapEager, not counting the FdGrant behind one) one step sends at most: about
#: 10 us each with their encoding, so a step holds the loop for about a millisecond
STEP_MESSAGES = 96
#: table entries a replay step looks at, per message it may send (entries the mapper holds
#: already cost a lookup each, not a message)
LOOK_FACTOR = 16
#: what one run of a refill costs in entries looked at (about 5 us: 64 holders that lost 2,000
#: regions each are 128,000 runs, 1,536 of them a step took 7 ms)
RUN_LOOKS = 12
_END = operator.attrgetter("end")
#: windows of held ranges (one per cut not yet deleted: `Held.take_later`) a step deletes per
#: message of its budget: a mapper's first Map after 2,000 cuts would delete all of them at
#: once (about 3 us each), so a step deletes them a few at a time before it sends
WINDOWS_PER_MESSAGE = 4


#: `TableState.work`'s units of work (later.py) a message of a step's budget stands for
UNITS_PER_MESSAGE = WINDOWS_PER_MESSAGE * WORK_PER_WINDOW


def settled(held: Held, budget: int) -> tuple[bool, int]:
    """Delete some of the windows `held` waits to delete, within `budget` messages' worth
    (a window of 2,000 regions' ranges, hidden at once, costs as much as 30 messages):
    (whether none is left, the budget used)."""
    if not held.windows:
        return True, 0
    spent = held.settle_within(
        max(1, budget) * UNITS_PER_MESSAGE, WORK_PER_WINDOW, WORK_PER_MAPPABLE
    )
    return not held.windows, max(1, spent // UNITS_PER_MESSAGE)


def hold(held: Held, mappings: list[Mapping]) -> None:
    """Record `mappings` (sent to the mapper in this batch) as held: in one slice of its
    lists when they lie in address order in one gap of them (a batch of a refill, a push or
    a replay), where one insertion each moved the rest of the lists (about 10 us each at
    10,000 ranges)."""
    held.extend([mp.range for mp in mappings], [mp.mappable_id for mp in mappings])


@dataclass
class Replay:
    """The mappings a mapper upgrading to eager (`SetEager`) has not been sent yet: those of
    the table starting at or after `cursor`. A mapping added behind the cursor meanwhile was
    pushed to it (it is `upgrading`); one removed before the cursor reached it is never sent."""

    mapper_id: int
    op: Operation
    cursor: int = 0
    #: what the change waits for until the replay is complete (set by `TableState.begin_step`)
    key: tuple[int, int] = (0, 0)

    def run(self, state: TableState, budget: int) -> tuple[list[Effect], bool]:
        """One batch: (its messages, whether the replay is complete)."""
        entry = state.mappers.get(self.mapper_id)
        if entry is None or not entry.upgrading or entry.stream is None:
            return [], True  # gone (or cut off): its upgrade ends with nothing more to send
        effects: list[Effect] = []
        ready, sent = settled(entry.held, budget)
        looked = 0
        while ready and sent < budget and looked < LOOK_FACTOR * budget:
            page = state.table.page(self.cursor, budget - sent)
            if not page:
                return effects, True
            looked += len(page)
            # what it faulted in is not sent again
            new = [mapping for _, mapping in page if entry.id not in mapping.holders]
            for mapping in new:
                effects.extend(state._map_eager(entry, mapping, self.op, hold=False))
            hold(entry.held, new)
            sent += len(new)
            self.cursor = page[-1][0].end
        return effects, False

    def release(self) -> list[Any]:
        return []


@dataclass
class Push:
    """New mappings the eager mappers have not been sent yet (from `index` on). Each batch
    pushes those still in the table to every eager (or upgrading) mapper not holding them:
    one cut meanwhile is not sent, and one a mapper faulted in meanwhile not again."""

    mappings: list[Mapping]
    op: Operation
    index: int = 0
    key: tuple[int, int] = (0, 0)

    def run(self, state: TableState, budget: int) -> tuple[list[Effect], bool]:
        effects: list[Effect] = []
        sent = 0
        eager = [e for e in state.mappers.values() if (e.eager or e.upgrading) and e.stream]
        for entry in eager:
            if entry.held.windows and sent >= budget:
                return effects, False  # the rest settle on the next steps
            ready, used = settled(entry.held, budget - sent)
            sent += used
            if not ready:
                return effects, False
        sent_to: list[list[Mapping]] = [[] for _ in eager]
        while self.index < len(self.mappings) and sent < budget:
            mapping = self.mappings[self.index]
            self.index += 1
            if state._mapping_at(mapping.range) is not mapping:
                continue  # cut (or replaced) before its turn came
            for entry, new in zip(eager, sent_to, strict=True):
                if entry.id not in mapping.holders:
                    effects.extend(state._map_eager(entry, mapping, self.op, hold=False))
                    new.append(mapping)
                    sent += 1
        for entry, new in zip(eager, sent_to, strict=True):
            hold(entry.held, new)
        return effects, self.index >= len(self.mappings)

    def release(self) -> list[Any]:
        """Its list, for the caller to free a batch at a time (`free_later`)."""
        mappings, self.mappings = self.mappings, []
        return mappings


@dataclass
class Refill:
    """Mappings that replaced memory lazy holders lost (`runs`: mapper id, the ranges it lost
    in address order): each holder is sent a Map of what the table holds now over what it
    lost and it does not hold (a fault may have brought it meanwhile), holder after holder,
    from `cursor` on in the current run."""

    runs: list[tuple[int, list[MemoryRange]]]
    op: Operation
    index: int = 0
    cursor: int = 0
    key: tuple[int, int] = (0, 0)

    def run(self, state: TableState, budget: int) -> tuple[list[Effect], bool]:
        effects: list[Effect] = []
        sent = looked = 0
        while self.index < len(self.runs) and sent < budget and looked < LOOK_FACTOR * budget:
            mapper_id, lost = self.runs[self.index]
            entry = state.mappers.get(mapper_id)
            if entry is None or entry.eager or entry.upgrading or entry.stream is None:
                self._next()  # gone, or eager now (then sent MapEager): nothing to refill
                continue
            ready, used = settled(entry.held, budget - sent)
            sent += used
            if not ready:
                continue  # the budget is spent, or more windows are deleted first
            end, limit = lost[-1].end, budget - sent
            if limit <= 0:
                break
            page = state.table.page(max(self.cursor, lost[0].start), limit)
            looked += len(page) + RUN_LOOKS  # a run costs more than an entry
            finished = len(page) < limit
            new: list[Mapping] = []
            for mrange, mapping in page:
                if mrange.start >= end:
                    finished = True
                    break
                self.cursor = mrange.end
                # the first lost piece ending after its start (sorted by end too: no overlaps)
                i = bisect.bisect_right(lost, mrange.start, key=_END)
                missing = i < len(lost) and lost[i].start < mrange.end
                if missing and mapper_id not in mapping.holders:
                    effects.extend(state._map_to(entry, mapping, hold=False))
                    new.append(mapping)
            hold(entry.held, new)
            sent += len(new)
            if finished:
                self._next()
        return effects, self.index >= len(self.runs)

    def release(self) -> list[Any]:
        """Its runs, for the caller to free a batch at a time (`free_later`): 128,000 of them
        took 7 ms to free at once."""
        runs, self.runs = self.runs, []
        return runs

    def _next(self) -> None:
        self.index += 1
        self.cursor = 0


Step = Replay | Push | Refill | Place


class StepQueue:
    """The changes with messages left to send, in the order they began: `run_one` sends a
    batch of the first; each change waits (a key in its `waiting`) until its last batch."""

    def __init__(self, state: TableState) -> None:
        self._state = state
        self._queue: collections.deque[Step] = collections.deque()

    def __bool__(self) -> bool:
        return bool(self._queue)

    def begin(self, step: Step, now: bool = True) -> list[Effect]:
        """Send the first batch of `step` now (unless not `now`: the change's own turn did
        much already) and queue the rest for later turns; its change then waits until the
        last batch was sent (and, as ever, acknowledged)."""
        state = self._state
        step.key = (-1, state._next_seq)  # never a real (mapper id, seq)
        state._next_seq += 1
        effects, done = step.run(state, STEP_MESSAGES) if now else ([], False)
        if not done:
            step.op.waiting.add(step.key)
            self._queue.append(step)
        else:
            state.free_later(step.release())
        return effects

    def run_one(self) -> list[Effect]:
        """One batch (about STEP_MESSAGES messages) of the first change queued; the change's
        answer follows its last batch once nothing else is pending."""
        if not self._queue:
            return []
        step = self._queue[0]
        effects, done = step.run(self._state, STEP_MESSAGES)
        if done:
            self._queue.popleft()
            self._state.free_later(step.release())
            step.op.waiting.discard(step.key)
            effects += self._state._maybe_finish(step.op)
        return effects

    def ops(self) -> list[Operation]:
        return [step.op for step in self._queue]

    def clear(self) -> None:
        """The manager stops: nothing more is sent."""
        self._queue.clear()
