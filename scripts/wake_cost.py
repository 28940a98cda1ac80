"""What a wake-up costs on this machine: `python scripts/wake_cost.py [--count N]`.

Runs the manager's whole handling of one fault (decode a SendMappings, the state machine, encode
the Map; no sockets) back to back, and again right after the thread slept in `select` (whose
timeout has microsecond resolution) for a while, as every stage of a real fault does. On a
machine whose idle CPUs halt (and lose their caches to whatever runs meanwhile), the same work
costs several times more after a sleep.
"""

from __future__ import annotations

import argparse
import os
import select
import statistics
import sys
import time

from membacking.manager.backing import MemfdStore
from membacking.manager.state import ManagerState, Send, SendFd
from membacking.protocol import messages as m
from membacking.protocol.codec import decode, encode
from membacking.protocol.messages import Channel
from membacking.protocol.ranges import MemoryRange

GAPS_US = (0, 100, 300, 1000, 5000)
REGION = MemoryRange(1 << 32, (1 << 32) + 4096)


def _fault_handler() -> tuple[ManagerState, bytes, MemfdStore]:
    store = MemfdStore()
    state = ManagerState(store, address_space=1 << 40, unmap_timeout=5.0)
    state.add_region("probe", REGION.start, REGION.len, True)
    entry = state.register_mapper("wake-cost", pid=os.getpid())
    for role, identity in ((m.ROLE_STREAM, b"s"), (m.ROLE_REQUESTS, b"r")):
        state.handle_mapper(identity, m.Attach(entry.id, entry.token, role))
    return state, encode(m.SendMappings(REGION)), store


def measure(count: int) -> dict[int, float]:
    """Median microseconds of one fault's handling after each gap (in microseconds)."""
    state, request, store = _fault_handler()

    def handle() -> None:
        msg = decode(request, Channel.MAPPER, sender="mapper")
        for effect in state.handle_mapper(b"r", msg):
            if isinstance(effect, Send | SendFd):
                encode(effect.msg)

    read_end, write_end = os.pipe()  # never written: waiting on it is a plain sleep
    out = {}
    try:
        for gap in GAPS_US:
            samples = []
            for _ in range(count):
                if gap:  # select, not poll: poll's timeout rounds up to whole milliseconds
                    select.select([read_end], [], [], gap / 1e6)
                started = time.perf_counter_ns()
                handle()
                samples.append(time.perf_counter_ns() - started)
            out[gap] = statistics.median(samples) / 1000
    finally:
        os.close(read_end)
        os.close(write_end)
        store.close_all()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=2000, help="samples per gap")
    args = parser.parse_args()
    result = measure(args.count)
    hot = result[0]
    print(f"one fault's handling in the manager, median of {args.count} runs")
    for gap, us in result.items():
        label = "back to back" if gap == 0 else f"after {gap} us asleep"
        print(f"  {label:22s} {us:7.1f} us  {us / hot:5.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
