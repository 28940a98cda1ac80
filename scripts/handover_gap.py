"""The service gaps of a handover and of a crash and restart, alone: `python
scripts/handover_gap.py [--regions N] [--mappers M]` prints what `membacking.bench.gaps.measure`
measured as JSON (milliseconds). `membacking bench` shows the same beside its other rows.

Starts a manager with N regions (64 KiB each) and M mapper processes that map every region,
then ask the manager without pause (a read of a hole is answered by the manager each time)
while they read mapped memory. `manager run --takeover` then replaces the manager: the gap is
the longest pause between two answers during the handover (last served by the old daemon to
first served by the new), beside the longest pause in a same-length window before it. Then the
new daemon is SIGKILLed and a plain one started: the time from its start to every mapper's first
answer after the kill, beside a new mapper's attach and first answer. Failed accesses are
counted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from membacking.bench.gaps import measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regions", type=int, default=1000)
    parser.add_argument("--mappers", type=int, default=16)
    args = parser.parse_args()
    gaps = measure(args.regions, args.mappers)
    report = {
        k: round(v * 1e3, 1) if isinstance(v, float) else v
        for k, v in dataclasses.asdict(gaps).items()
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
