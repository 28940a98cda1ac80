"""The service gap of a planned handover: `python scripts/handover_gap.py [--regions N]
[--mappers M]`.

Starts a manager with N regions (64 KiB each) and M mapper processes that map every region,
then ask the manager without pause (a read of a hole is answered by the manager each time)
while one reads its mapped memory. `manager run --takeover` then replaces the manager. Each
mapper records when every answer came back; the gap is the longest pause between two answers
during the handover (last served by the old daemon to first served by the new), beside the
longest pause in a same-length window before it (the baseline of this run). Any failed access
to mapped memory is counted.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REGION = 64 << 10
BASE = 1 << 32
HOLE = 1 << 30  # no region there


def mapper_main(runtime_dir: str, regions: int) -> None:
    import membacking

    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    answers: list[float] = []
    failures = 0
    with membacking.attach(runtime_dir, reconnect_timeout=30.0) as memory:
        for i in range(regions):
            memory.write_at(BASE + i * REGION, b"x")
        print("ready", flush=True)
        while not done.is_set():
            try:
                memory.read_at(HOLE, 1)
            except membacking.NoMappingError:
                answers.append(time.monotonic())
            if memory.read_at(BASE + (len(answers) % regions) * REGION, 1) != b"x":
                failures += 1
    pauses = [(b - a, a) for a, b in itertools.pairwise(answers)]
    print(
        json.dumps(
            {"pid": os.getpid(), "answers": len(answers), "failures": failures, "pauses": pauses}
        )
    )


def longest(pauses: list[list[float]], start: float, end: float) -> float:
    """The longest pause that overlaps [start, end)."""
    return max((p for p, at in pauses if at < end and at + p > start), default=0.0)


def timeline(trace: Path, results: list[dict[str, Any]], start: float, end: float) -> list[str]:
    """The phase marks of every process (membacking.trace) in time order, in ms from the old
    daemon's agreement, with each mapper's gap (its longest pause in [start, end)) beside them."""
    marks = []
    for line in trace.read_text().splitlines():
        at, pid, phase = line.split(" ", 2)
        marks.append((float(at), int(pid), phase))
    for i, result in enumerate(results):
        overlapping = [(p, at) for p, at in result["pauses"] if at < end and at + p > start]
        if overlapping:
            pause, at = max(overlapping)
            marks.append((at, result["pid"], f"gap.last-old-answer mapper#{i}"))
            marks.append((at + pause, result["pid"], f"gap.first-new-answer mapper#{i}"))
    t0 = next((at for at, _, phase in marks if phase == "handover.agreed"), start)
    marks.sort()
    return [f"{(at - t0) * 1e3:9.1f} ms  pid {pid:<7d} {phase}" for at, pid, phase in marks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regions", type=int, default=1000)
    parser.add_argument("--mappers", type=int, default=4)
    parser.add_argument(
        "--trace",
        action="store_true",
        help="print every process's phase marks (MEMBACKING_TRACE) in time order",
    )
    parser.add_argument("--mapper", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mapper:
        mapper_main(args.mapper[0], int(args.mapper[1]))
        return
    import membacking

    runtime = Path(tempfile.mkdtemp(prefix="mbgap-", dir="/tmp"))
    cli = [sys.executable, "-m", "membacking", "manager", "run", "--runtime-dir", str(runtime)]
    env = dict(os.environ, MEMBACKING_RUNTIME_DIR=str(runtime))
    trace = runtime / "trace"
    if args.trace:
        env["MEMBACKING_TRACE"] = str(trace)
    procs: list[subprocess.Popen[str]] = []

    def start(*extra: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [*cli, *extra], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
        )
        procs.append(proc)
        assert proc.stdout is not None and "ready" in proc.stdout.readline()
        return proc

    try:
        old = start()
        client = membacking.ControlClient(runtime)
        for i in range(args.regions):
            client.add_region(f"r{i}", BASE + i * REGION, REGION)
        client.close()
        mappers = []
        for _ in range(args.mappers):
            mapper = subprocess.Popen(
                [sys.executable, __file__, "--mapper", str(runtime), str(args.regions)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            procs.append(mapper)
            mappers.append(mapper)
        for mapper in mappers:
            assert mapper.stdout is not None
            select.select([mapper.stdout], [], [], 120)
            assert mapper.stdout.readline().strip() == "ready"
        time.sleep(1.0)
        asked = time.monotonic()
        new = start("--takeover")
        ready = time.monotonic()
        old_status = old.wait(30)
        time.sleep(1.0)
        results = [json.loads(m.communicate("", timeout=60)[0]) for m in mappers]
        window = ready - asked
        gaps = [longest(r["pauses"], asked, ready + 0.5) for r in results]
        base = [longest(r["pauses"], asked - 0.2 - window, asked - 0.2) for r in results]
        report = {
            "regions": args.regions,
            "mappers": args.mappers,
            "old_exit_status": old_status,
            "takeover_start_to_ready_ms": round(window * 1e3, 1),
            "gap_ms_max": round(max(gaps) * 1e3, 1),
            "gap_ms_per_mapper": [round(g * 1e3, 1) for g in gaps],
            "baseline_pause_ms_max": round(max(base) * 1e3, 1),
            "ratio_gap_to_baseline": round(max(gaps) / max(max(base), 1e-6), 1),
            "failed_accesses": sum(r["failures"] for r in results),
        }
        print(json.dumps(report, indent=2))
        if args.trace:
            print("\n".join(timeline(trace, results, asked, ready + 0.5)))
        new.terminate()
        new.wait(30)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(runtime, ignore_errors=True)


if __name__ == "__main__":
    main()
