"""Runs every benchmark beside its raw baseline, prints the table and writes the JSON.

Ratios compare numbers measured in the same run on the same machine; targets come from the
performance issue. Nothing here asserts a time: the table is the verdict.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

from . import baselines, cases


@dataclass
class Result:
    what: str
    ours: float
    baseline: float
    unit: str  # "GB/s", "us", "/s", "bytes"
    ratio: float | None  # ours/baseline for times, ours/baseline for rates (see `better`)
    better: str  # "higher" or "lower" (for the ratio)
    target: float | None  # ratio bound (>= for "higher", <= for "lower"); None: report only
    met: bool | None


def _result(
    what: str, ours: float, baseline: float, unit: str, better: str, target: float | None
) -> Result:
    ratio = ours / baseline if baseline else None
    met = None
    if target is not None and ratio is not None:
        met = ratio >= target if better == "higher" else ratio <= target
    return Result(what, ours, baseline, unit, ratio, better, target, met)


def run(quick: bool, log: Callable[[str], None]) -> list[Result]:
    size = (16 if quick else 64) * cases.MiB
    repeat = 5 if quick else 10
    results: list[Result] = []

    def add(result: Result) -> None:
        results.append(result)
        ours, base = _fmt(result.ours, result.unit), _fmt(result.baseline, result.unit)
        log(f"  {result.what}: {ours} vs {base}")

    log("bulk copies")
    copy = baselines.copy_seconds(size, repeat)
    ours = cases.bulk(size, repeat)
    gb = size / 1e9
    for name in ("read_into", "write_at"):
        add(
            _result(
                f"bulk {name}, {size >> 20} MiB", gb / ours[name], gb / copy, "GB/s", "higher", 0.9
            )
        )
    add(
        _result(
            f"view() + copy, {size >> 20} MiB", gb / ours["view"], gb / copy, "GB/s", "higher", 1.0
        )
    )

    log("plain values")
    number = 50_000 if quick else 200_000
    raw_read, raw_write = baselines.plain_seconds(number)
    read, write = cases.plain(number)
    add(_result("read_plain 8 bytes", read * 1e6, raw_read * 1e6, "us", "lower", 8.0))
    add(_result("write_plain 8 bytes", write * 1e6, raw_write * 1e6, "us", "lower", 8.0))

    log("faults")
    count = 50 if quick else 200
    add(
        _result(
            "first fault (request, fd, mmap, access)",
            cases.first_fault(count) * 1e6,
            baselines.seqpacket_fd_mmap_seconds(count * 4) * 1e6,
            "us",
            "lower",
            2.0,
        )
    )
    zmq_rtt = baselines.zmq_round_trip_seconds(count * 4)
    add(
        _result(
            "fault, fd already held",
            cases.fault_with_fd(count) * 1e6,
            zmq_rtt * 1e6,
            "us",
            "lower",
            1.3,
        )
    )

    log("removals")
    rounds = 5 if quick else 15
    for holders in (1, 4, 16) if quick else (1, 4, 16, 64):
        removal = cases.removal(holders, rounds)
        fanout = baselines.zmq_fanout(holders, rounds)
        raw = fanout.seconds * 1e6
        label = f"remove, {holders} holders:"
        add(_result(f"{label} inside the manager", removal.inside * 1e6, raw, "us", "lower", 1.5))
        add(
            _result(
                f"{label} control client's view",
                removal.client_seen * 1e6,
                raw,
                "us",
                "lower",
                None,
            )
        )
        add(
            _result(
                f"{label} CPU per holder process",
                removal.mapper_cpu * 1e6,
                fanout.dealer_cpu * 1e6,
                "us",
                "lower",
                None,
            )
        )
        add(
            _result(
                f"{label} CPU of the manager",
                removal.manager_cpu * 1e6,
                fanout.router_cpu * 1e6,
                "us",
                "lower",
                None,
            )
        )

    log("parallel faults")
    per = 25 if quick else 100
    rate, cpu = cases.parallel_faults(8, per)
    raw_rate, raw_cpu = baselines.zmq_parallel_rate(8, per)
    add(_result("faults per second, 8 mappers in parallel", rate, raw_rate, "/s", "higher", None))
    add(
        _result(
            "CPU per fault, 8 mappers in parallel", cpu * 1e6, raw_cpu * 1e6, "us", "lower", None
        )
    )

    log("many regions")
    regions = 1000 if quick else 10_000
    probes = 30 if quick else 100
    few = probes + 1  # the faulted regions themselves, and ram0
    one, many = cases.fault_among(regions, probes)
    add(
        _result(
            f"fault latency with {regions} regions vs {few}",
            many * 1e6,
            one * 1e6,
            "us",
            "lower",
            1.2,
        )
    )

    log("manager memory")
    memory = cases.manager_memory(1000 if quick else 10_000, 8 if quick else 16)
    add(
        _result(
            "manager memory per region",
            memory["per_region"],
            memory["base_rss"],
            "bytes",
            "lower",
            None,
        )
    )
    add(
        _result(
            "manager memory per mapper",
            memory["per_mapper"],
            memory["base_rss"],
            "bytes",
            "lower",
            None,
        )
    )
    return results


def _fmt(value: float, unit: str) -> str:
    if unit == "GB/s":
        return f"{value:.2f} GB/s"
    if unit == "us":
        return f"{value:.2f} us" if value < 10 else f"{value:.0f} us"
    if unit == "/s":
        return f"{value:,.0f}/s"
    return f"{value / 1024:,.1f} KiB"


def table(results: list[Result], out: TextIO) -> None:
    rows = [["what", "membacking", "baseline", "ratio", "target", "met"]]
    for r in results:
        if r.target is None:
            target = "report"
        else:
            target = f"{'>=' if r.better == 'higher' else '<='} {r.target:g}x"
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None and r.unit != "bytes" else "-"
        met = "-" if r.met is None else ("yes" if r.met else "NO")
        baseline = (
            _fmt(r.baseline, r.unit) if r.unit != "bytes" else (f"RSS {_fmt(r.baseline, r.unit)}")
        )
        rows.append([r.what, _fmt(r.ours, r.unit), baseline, ratio, target, met])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        out.write(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n"
        )
        if i == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")


def main(quick: bool = False, json_path: Path | None = None, out: TextIO = sys.stdout) -> int:
    started = time.time()
    results = run(quick, lambda line: print(line, file=sys.stderr, flush=True))
    out.write(
        f"\nmembacking benchmark ({'quick' if quick else 'full'}), {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M')}\n\n"
    )
    table(results, out)
    if json_path is not None:
        json_path.write_text(
            json.dumps(
                {
                    "quick": quick,
                    "started": started,
                    "seconds": time.time() - started,
                    "cores": os.cpu_count(),
                    "python": platform.python_version(),
                    "results": [asdict(r) for r in results],
                },
                indent=2,
            )
            + "\n"
        )
    return 0
