"""Runs every benchmark beside its raw baseline, prints the table and writes the JSON.

Ratios compare numbers measured in the same run on the same machine; targets come from the
performance issue. Nothing here asserts a time: the table is the verdict.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO, TypeVar

from ..units import plural
from . import baselines, cases, floors, gaps
from .turns import Removal, in_turn, medians

T = TypeVar("T")


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
    limit: float | None = None  # a bound on `ours` itself, in `unit` (the service gaps)


#: bounds on membacking's own code's share (manager x mapper factors) of a path
CODE_TARGETS = {"fault, fd already held": 1.35, "remove, 16 holders (inside)": 1.5}


@dataclass
class Breakdown:
    """One path that misses its target, measured four ways in the same run (seconds; for the
    parallel rows, wall seconds per fault (1 / the rate) and CPU seconds per fault)."""

    path: str
    membacking: float  #: the real manager with membacking's mapper
    thin: float  #: the real manager with a thin mapper (bench/thin.py)
    floor: float  #: membacking's hops with the least Python at both ends (bench/floors.py)
    baseline: float  #: the raw baseline of the main table

    @property
    def ratios(self) -> dict[str, float]:
        """shape: floor/baseline; manager: thin/floor; mapper: membacking/thin (their product is
        membacking/baseline)."""
        return {
            "shape": self.floor / self.baseline,
            "manager": self.thin / self.floor,
            "mapper": self.membacking / self.thin,
        }


def _result(
    what: str,
    ours: float,
    baseline: float,
    unit: str,
    better: str,
    target: float | None,
    limit: float | None = None,
) -> Result:
    ratio = ours / baseline if baseline else None
    met = None
    if target is not None and ratio is not None:
        met = ratio >= target if better == "higher" else ratio <= target
    if limit is not None:
        met = ours <= limit
    return Result(what, ours, baseline, unit, ratio, better, target, met, limit)


def _in_turn(turns: int, **variants: AbstractContextManager[Callable[[], T]]) -> dict[str, list[T]]:
    """Set up every variant (the processes it needs), run their probes in turn, take them down."""
    with contextlib.ExitStack() as stack:
        probes = {name: stack.enter_context(variant) for name, variant in variants.items()}
        return in_turn(probes, turns)


def run(quick: bool, log: Callable[[str], None]) -> tuple[list[Result], list[Breakdown]]:
    size = (16 if quick else 64) * cases.MiB
    # turn counts are multiples of the four variants, so each runs in each place equally often
    repeat = 4 if quick else 12
    results: list[Result] = []
    breakdowns: list[Breakdown] = []

    def add(result: Result) -> None:
        results.append(result)
        ours, base = _fmt(result.ours, result.unit), _fmt(result.baseline, result.unit)
        if result.unit == "bytes":  # no raw twin: the manager's RSS before the memory rows
            log(f"  {result.what}: {ours} (the manager's RSS before: {base})")
        else:
            log(f"  {result.what}: {ours} vs {base}")

    log("bulk copies")
    with cases.bulk(size) as (accesses, fd, buf), baselines.copy(fd, buf) as copy:
        copies = in_turn({"baseline": copy, **accesses}, repeat)
    best = {name: min(samples) for name, samples in copies.items()}
    gb = size / 1e9
    for name in ("read_into", "write_at"):
        add(
            _result(
                f"bulk {name}, {size >> 20} MiB",
                gb / best[name],
                gb / best["baseline"],
                "GB/s",
                "higher",
                0.9,
            )
        )
    add(
        _result(
            f"view() + copy, {size >> 20} MiB",
            gb / best["view"],
            gb / best["baseline"],
            "GB/s",
            "higher",
            1.0,
        )
    )

    log("plain values")
    number = 50_000 if quick else 200_000
    raw_read, raw_write = baselines.plain_seconds(number)
    read, write = cases.plain(number)
    add(_result("read_plain 8 bytes", read * 1e6, raw_read * 1e6, "us", "lower", 3.0))
    add(_result("write_plain 8 bytes", write * 1e6, raw_write * 1e6, "us", "lower", 4.0))

    log("faults, in turn with a floor, a thin mapper and the baseline")
    count = 48 if quick else 200
    first = medians(
        _in_turn(
            count,
            membacking=cases.first_faults(count),
            thin=cases.first_faults(count, thin=True),
            floor=floors.fault(with_fd=True),
            baseline=baselines.seqpacket_fd_mmap(),
        )
    )
    add(
        _result(
            "first fault (request, fd, mmap, access)",
            first["membacking"] * 1e6,
            first["baseline"] * 1e6,
            "us",
            "lower",
            2.0,
        )
    )
    held = medians(
        _in_turn(
            count,
            membacking=cases.held_faults(count),
            thin=cases.held_faults(count, thin=True),
            floor=floors.fault(with_fd=False, warm=True),
            baseline=baselines.zmq_round_trip(warm=True),
        )
    )
    add(
        _result(
            "fault, fd already held",
            held["membacking"] * 1e6,
            held["baseline"] * 1e6,
            "us",
            "lower",
            1.3,
        )
    )
    breakdowns.append(Breakdown("first fault", **first))
    breakdowns.append(Breakdown("fault, fd already held", **held))

    log("removals, in turn with a floor, thin holders and the raw fan-out")
    rounds = 4 if quick else 16
    for holders in (1, 4, 16) if quick else (1, 4, 16, 64):
        samples = _in_turn(
            rounds,
            membacking=cases.removals(holders),
            thin=cases.removals(holders, thin=True),
            floor=floors.removal(holders),
            baseline=baselines.zmq_fanout(holders),
        )
        removal = {name: Removal.summary(values) for name, values in samples.items()}
        ours, fanout = removal["membacking"], removal["baseline"]
        raw = fanout.seconds * 1e6
        label = f"remove, {plural(holders, 'holder')}:"
        add(_result(f"{label} inside the manager", ours.seconds * 1e6, raw, "us", "lower", 1.5))
        add(
            _result(
                f"{label} control client's view", ours.client_seen * 1e6, raw, "us", "lower", None
            )
        )
        add(
            _result(
                f"{label} CPU per holder process",
                ours.holder_cpu * 1e6,
                fanout.holder_cpu * 1e6,
                "us",
                "lower",
                None,
            )
        )
        add(
            _result(
                f"{label} CPU of the manager",
                ours.server_cpu * 1e6,
                fanout.server_cpu * 1e6,
                "us",
                "lower",
                None,
            )
        )
        breakdowns.append(
            Breakdown(
                f"remove, {plural(holders, 'holder')} (inside)",
                **{name: r.seconds for name, r in removal.items()},
            )
        )

    log("parallel faults")
    per = 25 if quick else 100
    # each variant is a batch (its own manager or server and 8 processes): run in turn, the
    # order rotated, and the median of each taken (one turn in the quick run: each batch
    # starts 8 processes)
    parallel = in_turn(
        {
            "membacking": lambda: cases.parallel_faults(8, per),
            "thin": lambda: cases.parallel_faults(8, per, thin=True),
            "floor": lambda: floors.parallel(8, per),
            "baseline": lambda: baselines.zmq_parallel_rate(8, per),
        },
        1 if quick else 3,
    )
    rates = medians({name: [r for r, _ in runs] for name, runs in parallel.items()})
    cpus = medians({name: [c for _, c in runs] for name, runs in parallel.items()})
    rate, cpu = rates["membacking"], cpus["membacking"]
    raw_rate, raw_cpu = rates["baseline"], cpus["baseline"]
    breakdowns.append(
        Breakdown("8 in parallel: wall per fault", **{n: 1 / r for n, r in rates.items()})
    )
    breakdowns.append(Breakdown("8 in parallel: CPU per fault", **cpus))
    add(_result("faults per second, 8 mappers in parallel", rate, raw_rate, "/s", "higher", 0.5))
    add(
        _result(
            "CPU per fault, 8 mappers in parallel", cpu * 1e6, raw_cpu * 1e6, "us", "lower", None
        )
    )

    log("many regions, faulted in turn with few")
    regions = 1000 if quick else 10_000
    probes_count = 30 if quick else 100
    few = probes_count + 1  # the faulted regions themselves, and ram0
    among = medians(
        _in_turn(
            probes_count,
            few=cases.first_faults(probes_count),
            many=cases.first_faults(probes_count, regions=regions),
        )
    )
    add(
        _result(
            f"fault latency with {regions} regions vs {few}",
            among["many"] * 1e6,
            among["few"] * 1e6,
            "us",
            "lower",
            1.2,
        )
    )

    log("unmap_range in a region with many holes, in turn with few")
    holes = 1000 if quick else 10_000
    changes = 30 if quick else 100
    cut = medians(
        _in_turn(
            changes,
            few=cases.unmap_ranges(10, changes),
            many=cases.unmap_ranges(holes, changes),
        )
    )
    add(
        _result(
            f"unmap_range with {holes} holes vs 10",
            cut["many"] * 1e6,
            cut["few"] * 1e6,
            "us",
            "lower",
            1.5,
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

    regions, mappers = (200, 4) if quick else (1000, 16)
    log(f"service gaps: a handover and a crash, {regions} regions, {mappers} busy mappers")
    gap = gaps.measure(regions, mappers)
    shape = f"{regions} regions, {mappers} mappers"
    log(f"  failed accesses {gap.failed_accesses}, old daemon's exit {gap.old_exit_status}")
    ms = 1e3
    handover = _result(
        f"handover gap, {shape}, {gap.failed_accesses} failed accesses",
        gap.handover_gap * ms,
        gap.handover_baseline * ms,
        "ms",
        "lower",
        None,
        gaps.HANDOVER_LIMIT * ms,
    )
    # a handover that lost an access, or whose old daemon did not exit 0, is a miss whatever
    # its gap
    handover.met = bool(handover.met and not gap.failed_accesses and gap.old_exit_status == 0)
    add(handover)
    for what, seconds, limit in (
        ("restart", gap.restart_to_served, gaps.RESTART_LIMIT * ms),
        ("ready", gap.ready_to_served, None),
    ):
        add(
            _result(
                f"crash: {what} -> every mapper served, {shape}",
                seconds * ms,
                gap.restart_baseline * ms,
                "ms",
                "lower",
                None,
                limit,
            )
        )
    return results, breakdowns


def _fmt(value: float, unit: str) -> str:
    if unit == "GB/s":
        return f"{value:.2f} GB/s"
    if unit == "us":
        return f"{value:.2f} us" if value < 10 else f"{value:.0f} us"
    if unit == "ms":
        return f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"
    if unit == "/s":
        return f"{value:,.0f}/s"
    return f"{value / 1024:,.1f} KiB"


def table(results: list[Result], out: TextIO) -> None:
    rows = [["what", "membacking", "baseline", "ratio", "target", "met"]]
    for r in results:
        if r.limit is not None:
            target = f"<= {_fmt(r.limit, r.unit)}"
        elif r.target is None:
            target = "report"
        else:
            target = f"{'>=' if r.better == 'higher' else '<='} {r.target:g}x"
        # memory rows have no raw twin: their baseline (the manager's RSS before them) is
        # shown in the legend, not beside a per-region growth it cannot be compared with
        memory = r.unit == "bytes"
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None and not memory else "-"
        met = "-" if r.met is None else ("yes" if r.met else "NO")
        baseline = "-" if memory else _fmt(r.baseline, r.unit)
        rows.append([r.what, _fmt(r.ours, r.unit), baseline, ratio, target, met])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        out.write(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n"
        )
        if i == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")
    out.write(LEGEND)
    rss = next((r.baseline for r in results if r.unit == "bytes"), None)
    if rss is not None:
        out.write(
            f"manager memory rows: growth of the manager's RSS per region and per attached\n"
            f"mapper (no raw baseline; the manager's RSS before them was {_fmt(rss, 'bytes')}).\n"
        )


LEGEND = """
membacking: the operation through membacking. baseline: the same operation done raw in the
same run, without membacking (each row's baseline: docs/PERFORMANCE.md, "The baselines").
ratio: membacking / baseline, so for times lower is better and for rates (/s) higher is;
target: the bound the ratio should meet ("report": no bound), or for the service gaps (in ms)
the bound on the time itself; met: whether it did.
"""


def load_note(before: float, after: float, cores: int) -> str:
    """The load average around the run, and a warning when the machine was busy before it
    started (other work then takes CPU from the variants unevenly and the ratios drift)."""
    text = f"load average {before:.2f} before the run, {after:.2f} after ({cores} cores)"
    if before >= 0.5 * cores:
        text += (
            f"\nWARNING: the machine was busy before the run (load {before:.2f} on {cores} "
            "cores): ratios may be off; run again when it is idle"
        )
    return text + "\n"


def breakdown_table(rows: list[Breakdown], out: TextIO) -> None:
    """Where each missed path's time goes: the shape of the service, the manager's code, the
    mapper's code (ratios multiply to membacking/baseline)."""
    head = ["path", "baseline", "floor", "thin mapper", "membacking"]
    head += ["shape", "manager", "mapper"]
    lines = [head]
    for row in rows:
        times = (row.baseline, row.floor, row.thin, row.membacking)
        lines.append(
            [row.path]
            + [_fmt(t * 1e6, "us") for t in times]
            + [f"{r:.2f}x" for r in row.ratios.values()]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for i, line in enumerate(lines):
        out.write(
            "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() + "\n"
        )
        if i == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")
    out.write(
        "\nfloor: membacking's hops with the least Python at both ends; thin mapper: the real\n"
        "manager with a mapper doing only what the protocol asks. shape = floor/baseline,\n"
        "manager = thin/floor, mapper = membacking/thin; they multiply to membacking/baseline.\n"
        "8 in parallel: wall per fault is 1 / the rate, so its product is the inverse of the\n"
        "main table's rate ratio; CPU per fault is every process's CPU over the faults.\n"
    )
    by_path = {row.path: row for row in rows}
    for path, bound in CODE_TARGETS.items():
        if path in by_path:
            code = by_path[path].ratios["manager"] * by_path[path].ratios["mapper"]
            met = "yes" if code <= bound else "NO"
            out.write(
                f"code factor (manager x mapper), {path}: {code:.2f}, target <= {bound}: {met}\n"
            )


def main(quick: bool = False, json_path: Path | None = None, out: TextIO = sys.stdout) -> int:
    started = time.time()
    load_before = os.getloadavg()[0]
    results, breakdowns = run(quick, lambda line: print(line, file=sys.stderr, flush=True))
    load_after = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    out.write(
        f"\nmembacking benchmark ({'quick' if quick else 'full'}), {cores} cores, "
        f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M')}\n"
        + load_note(load_before, load_after, cores)
        + "\n"
    )
    table(results, out)
    out.write("\nwhere the time goes, path by path (same run)\n\n")
    breakdown_table(breakdowns, out)
    if json_path is not None:
        json_path.write_text(
            json.dumps(
                {
                    "quick": quick,
                    "started": started,
                    "seconds": time.time() - started,
                    "cores": os.cpu_count(),
                    "load_average": [load_before, load_after],
                    "python": platform.python_version(),
                    "results": [asdict(r) for r in results],
                    "breakdown": [{**asdict(b), "ratios": b.ratios} for b in breakdowns],
                },
                indent=2,
            )
            + "\n"
        )
    return 0
