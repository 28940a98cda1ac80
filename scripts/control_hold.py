"""How long each control operation holds the manager's loop at scale.

The manager's single loop runs the state machine for a request and encodes every message it
returns before it serves the next fault. This drives the real state machine (real memfds, no
sockets: mappers are simulated by feeding their messages in) with 10,000 regions, 8 eager and
64 lazy mappers and a region with 10,000 holes, and prints, per operation, the longest time the
state machine plus the encoding of its messages took (what the loop does besides the socket
writes), and for each changing operation the building of the journal's bytes the daemon writes
before it answers (not the file's write and fsync). Each answer from a mapper (a MapAck, an
UnmapAck) is a loop turn of its own and timed as one, and so is each step of the work a change
left for later turns (`ManagerState.work`, which the daemon runs between messages), and each
batch a change sends on later turns (`ManagerState.step`). Then the operations whose messages
grow with what they touch: a mapper's SetEager (every mapping replayed) and its Detach holding
them all, enabling and disabling a region over `--covered` others, moving and enabling the
region of many pieces, each turn timed (`--heavy-repeat` runs each). Every pause
of Python's garbage collector during the whole run (set-up included) is recorded, by
generation; with `--gc freeze` (the daemon's policy, membacking/manager/heap.py) the heap is
frozen as the daemon does (at start, after each collection of the middle generation, on each
one-second tick), and the longest tick is reported; `--gc auto` leaves the collector as Python
sets it.
Times are the loop thread's CPU time (`--clock wall` for wall-clock time, which on a shared
machine includes other users' load).
Run: python scripts/control_hold.py [--regions N] [--holes N] [--repeat N] [--covered N]
[--heavy-repeat N] [--gc auto|freeze] [--clock cpu|wall]
"""

from __future__ import annotations

import argparse
import gc
import logging
import time
from collections.abc import Callable

from membacking.manager.backing import MemfdStore
from membacking.manager.heap import Heap
from membacking.manager.journalcache import JournalEncoder
from membacking.manager.model import Limits
from membacking.manager.state import Effect, ManagerState, Send
from membacking.protocol import messages as m
from membacking.protocol.codec import encode
from membacking.protocol.ranges import MemoryRange

PAGE = 4096
MiB = 1 << 20
#: what holds are measured with: the thread's CPU time by default (the machine is shared: other
#: users' load stretches wall-clock times, not the CPU time the loop's work takes); `--clock wall`
clock = time.thread_time


class Pauses:
    """Every pause of the cyclic garbage collector, by generation (from gc.callbacks)."""

    def __init__(self) -> None:
        self.by_generation: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = clock()
        else:
            self.by_generation[info["generation"]].append(clock() - self._started)


class Rig:
    """A ManagerState with simulated mappers that answer at once, each answer timed."""

    def __init__(self, regions: int, heap: Heap | None = None) -> None:
        self.heap = heap
        self.next_tick = time.monotonic() + 1.0
        limits = Limits(max_regions=regions + 100, max_mappers=2000)
        self.state = ManagerState(MemfdStore(), limits=limits)
        self.streams: dict[bytes, int] = {}
        self.worst_answer = 0.0
        self.worst_step = 0.0
        self.steps = 0
        store = self.state.store
        assert isinstance(store, MemfdStore)
        self.store = store
        self.journal = JournalEncoder()

    def journal_bytes(self) -> float:
        """Seconds to build the journal's bytes after a change, as the daemon does before it
        answers a changing request (the atomic write of the file is not included)."""
        gc.disable()
        started = clock()
        self.journal.encode(self.state, self.store, bytes(16), "/run/membacking")
        held = clock() - started
        gc.enable()
        return held

    def attach(self, name: str, eager: bool) -> int:
        entry = self.state.register_mapper(name, pid=1)
        stream = f"{name}-s".encode()
        self.streams[stream] = entry.id
        self.state.handle_mapper(stream, m.Attach(entry.id, entry.token, m.ROLE_STREAM))
        if eager:
            self.answer(self.state.handle_mapper(stream, m.SetEager()))
            self.work()
        return entry.id

    def upgrade(self, name: str) -> tuple[float, float, int]:
        """A lazy mapper attaches and asks to become eager (SetEager: every mapping is
        replayed to it), then detaches holding them all: the seconds SetEager's own turn and
        the Detach's turn held the loop, and how many mappings the Detach let go of."""
        mapper_id = self.attach(name, eager=False)
        stream = f"{name}-s".encode()
        entry = self.state.mappers[mapper_id]
        upgrade, _ = self.timed(lambda: self.state.handle_mapper(stream, m.SetEager()))
        assert entry.eager, "the replay did not complete"
        held = len(entry.held)
        detach, _ = self.timed(lambda: self.state.handle_mapper(stream, m.Detach()))
        del self.streams[stream]
        return upgrade, detach, held

    def fault(self, mapper_id: int, rng: MemoryRange) -> None:
        """Faults of all of `rng` on the mapper's fd socket (answered with Maps, not timed): a
        fault is answered up to its first gap, so one per stretch between gaps."""
        start = rng.start
        while start < rng.end:
            msg = m.SendMappings(MemoryRange(start, rng.end))
            effects = self.state.handle_fd_message(mapper_id, msg) or []
            assert not any(isinstance(getattr(e, "msg", None), m.Error) for e in effects)
            sent = [e.msg for e in effects if isinstance(e, Send)]
            gaps = [msg for msg in sent if isinstance(msg, m.NoMapping)]
            if not gaps:
                return
            gap = gaps[-1]
            assert isinstance(gap, m.NoMapping)
            start = gap.range.end

    def answer(self, effects: list[Effect]) -> list[Effect]:
        """Carry out `effects`: encode each message; every MapEager, Unmap and Release is
        acknowledged at once (one timed turn each); the control replies are returned."""
        replies: list[Effect] = []
        queue = list(effects)
        while queue:
            effect = queue.pop(0)
            if not isinstance(effect, Send):
                continue
            msg = effect.msg
            if effect.identity not in self.streams and isinstance(msg, m.ControlReply | m.Error):
                replies.append(effect)
                continue
            ack: m.Message | None = None
            if isinstance(msg, m.MapEager):
                ack = m.MapAck(msg.seq, True, "")
            elif isinstance(msg, m.Unmap | m.Release):
                ack = m.UnmapAck(msg.seq)
            if ack is not None:
                gc.disable()
                started = clock()
                more = self.state.handle_mapper(effect.identity, ack)
                for e in more:
                    if isinstance(e, Send):
                        encode(e.msg)
                self.worst_answer = max(self.worst_answer, clock() - started)
                gc.enable()
                queue.extend(more)
                self.work(steps=False)
        return replies

    def work(self, steps: bool = True) -> list[Effect]:
        """The work changes left for later, a step at a time as the daemon's loop does it
        between messages, each step timed as a turn (its messages encoded and answered);
        returns the control replies those steps gave. `steps=False`: only the bookkeeping
        (`work`), not the steps that send messages (`step`)."""
        replies: list[Effect] = []
        while True:
            stepping = steps and getattr(self.state, "has_steps", False)
            if not stepping and not getattr(self.state, "has_work", False):
                return replies  # (the code before them had neither)
            gc.disable()
            started = clock()
            effects = self.state.step() if stepping else []
            if not stepping:
                self.state.work()
            for e in effects:
                if isinstance(e, Send):
                    encode(e.msg)
            self.worst_step = max(self.worst_step, clock() - started)
            self.steps += 1
            gc.enable()
            replies += self.answer(effects)

    def timed(self, run: Callable[[], list[Effect]]) -> tuple[float, list[Effect]]:
        """Seconds one turn took (`run` and the encoding of what it returns), and what it
        returned, answered (acks fed back, later steps run): the control replies."""
        gc.disable()
        started = clock()
        effects = run()
        for effect in effects:
            if isinstance(effect, Send):
                encode(effect.msg)
        held = clock() - started
        gc.enable()
        replies = self.answer(effects)
        return held, replies + self.work()

    def control(self, op: str, **args: object) -> tuple[float, object]:
        """Seconds the request held the loop (state machine + encoding), and its result. The
        cyclic garbage collector is kept out of the time (`main` measures a pass of its own)."""
        gc.disable()
        started = clock()
        effects = self.state.handle_control(b"client", m.ControlRequest(op, dict(args)))
        for effect in effects:
            if isinstance(effect, Send):
                encode(effect.msg)
        held = clock() - started
        gc.enable()
        self.work(steps=False)
        if self.heap is not None and time.monotonic() >= self.next_tick:
            state = self.state  # the daemon's tick, once a second, between two requests
            self.heap.tick(True, len(state.regions) + len(state.table) + len(state.mappers))
            self.next_tick = time.monotonic() + 1.0
        replies = self.answer(effects)
        replies += self.work()
        result = None
        for reply in replies:
            assert isinstance(reply, Send)
            if isinstance(reply.msg, m.Error):
                raise RuntimeError(f"{op}: {reply.msg.code}: {reply.msg.message}")
            result = getattr(reply.msg, "result", None)
        return held, result


def heavy(rig: Rig, opts: argparse.Namespace, lazy: list[int], big: int) -> None:
    """The operations whose work grows with the number of regions or pieces they touch: each
    turn (the operation's own, then every step it left and every mapper answer) timed."""
    pieces = len(rig.state.regions["holes"].submappings)
    first = opts.regions // 5  # the covered regions: r[first] .. r[first + covered - 1]
    cover = MemoryRange.from_size(MiB + first * 2 * PAGE, opts.covered * 2 * PAGE)
    rig.control(
        "add_region",
        name="cover",
        gpa=cover.start,
        size=cover.end - cover.start,
        priority=1,
        disabled=True,
    )

    def enable_cover(i: int) -> float:
        rig.control("disable_region", name="cover")
        for mapper_id in lazy:  # every lazy mapper holds the regions it hides
            rig.fault(mapper_id, cover)
        return rig.control("enable_region", name="cover")[0]

    def disable_cover(i: int) -> float:
        rig.control("enable_region", name="cover")
        for mapper_id in lazy:  # every lazy mapper holds the cover: it is refilled on disable
            rig.fault(mapper_id, cover)
        return rig.control("disable_region", name="cover")[0]

    def move(i: int) -> float:
        gpa = big * 3 if i % 2 == 0 else big
        return rig.control("move_region", name="holes", gpa=gpa)[0]

    def enable_big(i: int) -> float:
        rig.control("disable_region", name="holes")
        return rig.control("enable_region", name="holes")[0]

    upgrades: list[tuple[float, float, int]] = []

    def set_eager(i: int) -> float:
        upgrades.append(rig.upgrade(f"late{i}"))
        return upgrades[-1][0]

    def detach(i: int) -> float:
        return upgrades[i][1]

    heavy_ops: list[tuple[str, Callable[[int], float]]] = [
        (f"enable_region (hides {opts.covered} regions)", enable_cover),
        (f"disable_region (uncovers {opts.covered})", disable_cover),
        (f"move_region ({pieces} pieces)", move),
        (f"enable_region ({pieces} pieces)", enable_big),
        ("SetEager (replays every mapping)", set_eager),
        ("Detach (holding every mapping)", detach),
    ]
    print(
        f"\n{'operation':40} {'median':>13} {'longest':>13} {'longest step':>17} "
        f"{'longest answer':>15}"
    )
    for label, run in heavy_ops:
        holds = []
        rig.worst_answer = rig.worst_step = 0.0
        rig.steps = 0
        for i in range(opts.heavy_repeat):
            holds.append(run(i) * 1e3)
        holds.sort()
        step = f"{rig.worst_step * 1e3:11.2f} ms" if rig.steps else f"{'-':>14}"
        print(
            f"{label:40} {holds[len(holds) // 2]:10.2f} ms {holds[-1]:10.2f} ms {step:>17} "
            f"{rig.worst_answer * 1e3:12.2f} ms"
        )
    if upgrades:
        print(f"  (the Detach let go of {upgrades[-1][2]} mappings)")
    from membacking.manager.handover import what_is_handed_over

    holds = []
    for _ in range(opts.repeat):  # what the handover's answer reads of the state
        gc.disable()
        started = clock()
        what_is_handed_over(rig.state)
        holds.append((clock() - started) * 1e3)
        gc.enable()
    holds.sort()
    label = "handover answer (its reading of the state)"
    print(f"{label:40} {holds[len(holds) // 2]:10.2f} ms {holds[-1]:10.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regions", type=int, default=10_000)
    parser.add_argument("--holes", type=int, default=10_000)
    parser.add_argument("--eager", type=int, default=8)
    parser.add_argument("--holders", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--covered", type=int, default=2000)
    parser.add_argument("--heavy-repeat", type=int, default=3)
    parser.add_argument("--gc", choices=("auto", "freeze"), default="freeze")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    opts = parser.parse_args()
    global clock
    clock = time.thread_time if opts.clock == "cpu" else time.perf_counter
    logging.disable(logging.WARNING)  # fd-limit refusals of the eager mappers are expected
    pauses = Pauses()
    heap = Heap(clock) if opts.gc == "freeze" else None
    if heap is not None:
        heap.settle()  # the daemon settles its heap once it has started
    rig = Rig(opts.regions, heap)
    for i in range(opts.eager):
        rig.attach(f"eager{i}", eager=True)
    lazy = [rig.attach(f"lazy{i}", eager=False) for i in range(opts.holders)]
    setup = time.perf_counter()
    for i in range(opts.regions):
        rig.control("add_region", name=f"r{i:05d}", gpa=MiB + i * 2 * PAGE, size=PAGE)
    big = 1 << 36
    pages = 2 * (opts.holes + opts.repeat) + 2
    rig.control("add_region", name="holes", gpa=big, size=pages * PAGE)
    for mapper_id in lazy:  # every lazy mapper holds every region
        rig.fault(mapper_id, MemoryRange(MiB, MiB + opts.regions * 2 * PAGE))
        rig.fault(mapper_id, MemoryRange.from_size(big, pages * PAGE))
    for i in range(opts.holes):
        rig.control("unmap_range", name="holes", offset=(2 * i + 1) * PAGE, size=PAGE)
    rig.worst_answer = 0.0
    rig.journal_bytes()  # the daemon journals the whole table once at start
    print(
        f"{opts.regions} regions, {opts.eager} eager and {opts.holders} lazy mappers holding "
        f"every region, a region with {opts.holes} holes (set up in "
        f"{time.perf_counter() - setup:.1f} s)\n"
    )
    ops: list[tuple[str, Callable[[int], tuple[float, object]]]] = [
        ("stats", lambda i: rig.control("stats")),
        ("regions (one page)", lambda i: rig.control("regions", after=f"r{i:05d}")),
        ("mappings (one page)", lambda i: rig.control("mappings", name="holes", offset=i * PAGE)),
        (
            f"unmap_range ({opts.holes} holes)",
            lambda i: rig.control(
                "unmap_range", name="holes", offset=(2 * (opts.holes + i) + 1) * PAGE, size=PAGE
            ),
        ),
        (
            "add_region (eager mappers)",
            lambda i: rig.control("add_region", name=f"new{i}", gpa=big * 2 + i * MiB, size=MiB),
        ),
        (
            "remove_region (every mapper holds it)",
            lambda i: rig.control("remove_region", name=f"r{i:05d}"),
        ),
        ("disable_region", lambda i: rig.control("disable_region", name=f"r{i + 100:05d}")),
        ("enable_region", lambda i: rig.control("enable_region", name=f"r{i + 100:05d}")),
        ("mappers (one page)", lambda i: rig.control("mappers", after_id=i)),
        (
            "mapper_held (one page)",
            lambda i: rig.control("mapper_held", id=lazy[0], gpa=MiB + i * 100 * PAGE),
        ),
    ]
    changing = ("unmap_range", "add_region", "remove_region", "disable_region", "enable_region")
    print(f"{'operation':40} {'median':>13} {'longest':>13} {'journal median':>17} {'longest':>13}")
    for label, run in ops:
        holds, saves = [], []
        for i in range(opts.repeat):
            holds.append(run(i)[0] * 1e3)
            if label.startswith(changing):  # the daemon journals before it answers
                saves.append(rig.journal_bytes() * 1e3)
        holds.sort()
        saves.sort()
        line = f"{label:40} {holds[len(holds) // 2]:10.2f} ms {holds[-1]:10.2f} ms"
        if saves:
            line += f" {saves[len(saves) // 2]:14.2f} ms {saves[-1]:10.2f} ms"
        print(line)
    label = "one mapper answer (MapAck, UnmapAck)"
    print(f"{label:40} {'':13} {rig.worst_answer * 1e3:10.2f} ms")
    label = "one step of work left for later"
    print(f"{label:40} {'':13} {rig.worst_step * 1e3:10.2f} ms")
    heavy(rig, opts, lazy, big)
    label = f"remove_region ({len(rig.state.regions['holes'].submappings)} pieces)"
    rig.worst_answer = rig.worst_step = 0.0
    rig.steps = 0
    held, _ = rig.control("remove_region", name="holes")
    saved = rig.journal_bytes()
    print(f"{label:40} {held * 1e3:10.2f} ms {held * 1e3:10.2f} ms {saved * 1e3:14.2f} ms")
    label = "  its longest answer (UnmapAck)"
    print(f"{label:40} {'':13} {rig.worst_answer * 1e3:10.2f} ms")
    label = f"  its longest step of work ({rig.steps} steps)"
    print(f"{label:40} {'':13} {rig.worst_step * 1e3:10.2f} ms")
    print(f"\ngarbage collector ({opts.gc}): pauses during the run, set-up included")
    for generation, times in pauses.by_generation.items():
        times.sort()
        if times:
            label = f"generation {generation} ({len(times)} collections)"
            print(f"{label:40} {times[len(times) // 2] * 1e3:10.2f} ms {times[-1] * 1e3:10.2f} ms")
    if heap is not None:
        label = f"{gc.get_freeze_count()} objects frozen"
        print(label)
        label = f"longest tick ({heap.checks} checks, {heap.full_collections} full)"
        print(f"{label:40} {'':13} {heap.longest_tick * 1e3:10.2f} ms")
    started = clock()
    gc.collect()
    label = "a full pass of the garbage collector"
    print(f"{label:40} {'':13} {(clock() - started) * 1e3:10.2f} ms")
    if heap is not None:
        started = clock()
        heap.settle()
        label = "unfreeze, collect all, freeze (rare)"
        print(
            f"{label:40} {'':13} {(clock() - started) * 1e3:10.2f} ms "
            f"({heap.last_found} unreachable objects found)"
        )


if __name__ == "__main__":
    main()
