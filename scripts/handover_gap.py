"""The service gap of a planned handover: `python scripts/handover_gap.py [--regions N]
[--mappers M] [--trace]`.

Starts a manager with N regions (64 KiB each) and M mapper processes that map every region,
then ask the manager without pause (a read of a hole is answered by the manager each time)
while one reads its mapped memory. `manager run --takeover` then replaces the manager. Each
mapper records when every answer came back; its gap is the pause before its first answer
after the new daemon started serving (no answer before that is the new daemon's: last answer
of the old daemon to first of the new), beside the longest pause in a
same-length window before it (the baseline of this run) and the longest pause anywhere in the
handover's window. Every process marks its phases (membacking.trace); their times from the
old daemon's agreement are reported, every mark with --trace, and the CPU time each side spent
(on a loaded machine, what tells work from waiting for a core). Any failed access to mapped
memory is counted.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from membacking.bench.gaps import BASE, REGION, longest
from membacking.manager.statelist import remove_state_of


def ending_first_after(pauses: list[list[float]], moment: float) -> list[float]:
    """The pause that ends with the first answer at or after `moment` ([0, moment] if none
    does): with `moment` the new daemon's start of service, from the last answer of the old
    daemon to the first of the new."""
    return next(([p, at] for p, at in pauses if at + p >= moment), [0.0, moment])


def read_marks(trace: Path) -> list[tuple[float, int, str]]:
    return sorted((at, pid, phase) for at, pid, _, phase in read_marks_cpu(trace))


def read_marks_cpu(trace: Path) -> list[tuple[float, int, float, str]]:
    """Each mark with the CPU time (ms) its process had used by then."""
    marks = []
    for line in trace.read_text().splitlines():
        at, pid, cpu, phase = line.split(" ", 3)
        marks.append((float(at), int(pid), float(cpu), phase))
    return sorted(marks)


def cpu_spent(trace: Path, old_pid: int, new_pid: int) -> dict[str, Any]:
    """CPU ms each side spent in the handover (load on the machine stretches wall-clock times,
    much less these): the old daemon from its agreement to its release, the new one from the
    start of its service to the last Holdings it checked, each mapper from the start of its
    relink to its Holdings sent (median and most). The old daemon's CPU from its release to its
    end is added by `main` (from its rusage)."""
    marks = read_marks_cpu(trace)

    def first(pid: int, phase: str, last: bool = False) -> float | None:
        found = [cpu for _, p, cpu, name in marks if p == pid and name.startswith(phase)]
        return (found[-1] if last else found[0]) if found else None

    def between(pid: int, start: str, end: str, last: bool = False) -> float | None:
        a, b = first(pid, start), first(pid, end, last)
        return None if a is None or b is None else round(b - a, 2)

    relinked = sorted({p for _, p, _, name in marks if name.startswith("mapper.relink")})
    spent = [between(p, "mapper.relink", "mapper.restored") for p in relinked]
    mappers = sorted(x for x in spent if x is not None)
    return {
        "old_daemon_agreed_to_released": between(old_pid, "handover.agreed", "daemon.released"),
        "new_daemon_serving_to_last_holdings": between(
            new_pid, "daemon.serving", "daemon.holdings", last=True
        ),
        "mapper_relink_to_restored_median_max": (
            [mappers[len(mappers) // 2], mappers[-1]] if mappers else None
        ),
    }


def _wait_with_cpu(proc: subprocess.Popen[str], timeout: float) -> tuple[int, float]:
    """Wait for `proc` to end: its exit status and the CPU ms it used in all."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, (usage.ru_utime + usage.ru_stime) * 1e3
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(proc.args, timeout)
        time.sleep(0.005)


def _after_mark(trace: Path, pid: int, phase: str, total: float) -> float | None:
    """The CPU ms process `pid` used from its mark `phase` to its end (`total` in all): the
    old daemon's last work, done on the cores the new one and the mappers need."""
    found = [cpu for _, p, cpu, name in read_marks_cpu(trace) if p == pid and name == phase]
    return round(total - found[0], 2) if found else None


def phases(marks: list[tuple[float, int, str]], old_pid: int, t0: float) -> dict[str, Any]:
    """When each part of the handover ended, in ms from the old daemon's agreement."""

    def at(phase: str, pid: int | None = None) -> list[float]:
        return [
            round((t - t0) * 1e3, 1)
            for t, p, name in marks
            if name.startswith(phase) and (pid is None or p == pid)
        ]

    new = [p for _, p, name in marks if name == "takeover.ask"]
    new_pid = new[-1] if new else -1
    prepared, asked = at("takeover.prepare", new_pid), at("takeover.ask", new_pid)
    restored = at("mapper.restored")
    return {
        "new_daemon_prepared_ms_before": round(asked[0] - prepared[0], 1) if prepared else None,
        "old_daemon_released": (at("daemon.released", old_pid) or [None])[0],
        "new_daemon_adopted": (at("daemon.adopted", new_pid) or [None])[0],
        "new_daemon_serving": (at("daemon.serving", new_pid) or [None])[0],
        "mappers_registered_first_last": [min(restored), max(restored)] if restored else None,
        "holdings_checked_last": max(at("daemon.holdings", new_pid), default=None),
    }


def timeline(trace: Path, results: list[dict[str, Any]], t0: float, served: float) -> list[str]:
    """Every phase mark (membacking.trace) in time order, in ms from the old daemon's
    agreement (`t0`), with its process's CPU ms, and each mapper's gap (up to its first answer
    after `served`)."""
    marks: list[tuple[float, int, float | None, str]] = list(read_marks_cpu(trace))
    for i, result in enumerate(results):
        pause, at = ending_first_after(result["pauses"], served)
        marks.append((at, result["pid"], None, f"gap.last-old-answer mapper#{i}"))
        marks.append((at + pause, result["pid"], None, f"gap.first-new-answer mapper#{i}"))
    marks.sort(key=lambda x: x[0])
    return [
        f"{(at - t0) * 1e3:9.1f} ms  pid {pid:<7d} "
        f"{'' if cpu is None else f'cpu {cpu:9.2f}':14s} {phase}"
        for at, pid, cpu, phase in marks
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regions", type=int, default=1000)
    parser.add_argument("--mappers", type=int, default=4)
    parser.add_argument("--trace", action="store_true", help="print every phase mark in time order")
    args = parser.parse_args()
    import membacking

    runtime = Path(tempfile.mkdtemp(prefix="mbgap-", dir="/tmp"))
    cli = [sys.executable, "-m", "membacking", "manager", "run", "--runtime-dir", str(runtime)]
    env = dict(os.environ, MEMBACKING_RUNTIME_DIR=str(runtime))
    trace = runtime / "trace"
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
                [sys.executable, "-m", "membacking.bench.gaps", str(runtime), str(args.regions)],
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
        old_status, old_cpu = _wait_with_cpu(old, 30)
        time.sleep(1.0)
        results = [json.loads(m.communicate("", timeout=60)[0]) for m in mappers]
        window = ready - asked
        marks = read_marks(trace)
        agreed = [t for t, pid, name in marks if name == "handover.agreed" and pid == old.pid]
        t0 = agreed[0] if agreed else asked
        # no answer before the new daemon serves is its own: the first one after is
        serving = [t for t, pid, name in marks if name == "daemon.serving" and pid == new.pid]
        served = serving[0] if serving else t0
        gaps = [ending_first_after(r["pauses"], served)[0] for r in results]
        anywhere = [longest(r["pauses"], asked, ready + 0.5) for r in results]
        base = [longest(r["pauses"], asked - 0.2 - window, asked - 0.2) for r in results]
        report = {
            "regions": args.regions,
            "mappers": args.mappers,
            "old_exit_status": old_status,
            "takeover_start_to_ready_ms": round(window * 1e3, 1),
            # CLOCK_MONOTONIC of the agreement, which the times below count from
            "agreed_monotonic_s": round(t0, 6),
            "gap_ms_max": round(max(gaps) * 1e3, 1),
            "gap_ms_per_mapper": [round(g * 1e3, 1) for g in gaps],
            "longest_pause_in_window_ms": round(max(anywhere) * 1e3, 1),
            "baseline_pause_ms_max": round(max(base) * 1e3, 1),
            "ratio_gap_to_baseline": round(max(gaps) / max(max(base), 1e-6), 1),
            "failed_accesses": sum(r["failures"] for r in results),
            "phases_ms_after_agreement": phases(marks, old.pid, t0),
            "cpu_ms": {
                **cpu_spent(trace, old.pid, new.pid),
                "old_daemon_released_to_exit": _after_mark(
                    trace, old.pid, "daemon.released", old_cpu
                ),
            },
        }
        print(json.dumps(report, indent=2))
        if args.trace:
            print("\n".join(timeline(trace, results, t0, served)))
        new.terminate()
        new.wait(30)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        remove_state_of(runtime)  # what the killed or stopped managers kept on /dev/shm
        shutil.rmtree(runtime, ignore_errors=True)


if __name__ == "__main__":
    main()
