"""`membacking regions`, `mappers`, `stats`: what the daemon holds, as tables or JSON."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
import psutil

from .. import units
from .common import (
    control_client,
    echo_json,
    json_option,
    runtime_dir_option,
    table,
    timeout_option,
)


@click.command("regions")
@runtime_dir_option
@timeout_option()
@json_option
def regions_cmd(runtime_dir: Path, timeout: float | None, as_json: bool) -> None:
    """List the regions of guest memory. BACKING is where each region's memory lives: shm (a
    file in the manager's state directory, which outlives it), memfd (without one: --no-state),
    file, hugetlb or private."""
    regions = control_client(runtime_dir, timeout).regions()
    if as_json:
        echo_json(regions)
        return
    if not regions:
        click.echo("no regions")
        return
    rows = []
    for r in regions:
        placed = r["gpa"] is not None
        rows.append(
            [
                r["name"],
                f"{r['gpa']:#x}" if placed else "-",
                f"{r['gpa'] + r['size']:#x}" if placed else "-",
                units.format_size(r["size"]),
                "rw" if r["writable"] else "ro",
                str(r["priority"]),
                r.get("memory", r["backing"]),
                ",".join(map(str, r["holders"])) or "-",
                r["state"],
            ]
        )
    table(["NAME", "GPA", "END", "SIZE", "MODE", "PRIO", "BACKING", "HOLDERS", "STATE"], rows)


def _process(pid: int) -> tuple[str | None, int | None]:
    """(process name, RSS in bytes) of a local pid, or None where psutil cannot see it."""
    if pid == 0:  # in a pid namespace the manager cannot see into
        return None, None
    try:
        proc = psutil.Process(pid)
        return proc.name(), int(proc.memory_info().rss)
    except (psutil.Error, OSError):
        return None, None


def add_process(mappers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give each mapper of a listing `process` (its process name) and `rss` (its resident
    bytes), as this host sees its pid (None where it cannot: gone, or another pid namespace);
    `mappers` and `map` show the same."""
    for p in mappers:
        p["process"], p["rss"] = _process(p["pid"])
    return mappers


def _ago(now: float, then: float) -> str:
    seconds = max(0.0, now - then)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.0f}h ago"


def _unmapping(p: dict[str, Any], shown: str) -> str:
    """` (+N unmapping)` beside what a mapper holds while Unmaps to it await its answer."""
    return f" (+{shown} unmapping)" if p.get("unmapping_ranges") else ""


@click.command("mappers")
@runtime_dir_option
@timeout_option()
@json_option
def mappers_cmd(runtime_dir: Path, timeout: float | None, as_json: bool) -> None:
    """List the attached mappers (`+N unmapping`: ranges it was told to unmap and has not
    yet acknowledged; a change such as `region remove` waits on them)."""
    mappers = add_process(control_client(runtime_dir, timeout).mappers())
    if as_json:
        echo_json(mappers)
        return
    if not mappers:
        click.echo("no mappers")
        return
    now = time.time()
    table(
        [
            "ID",
            "NAME",
            "PID",
            "PROCESS",
            "RSS",
            "MODE",
            "RANGES",
            "MAPPED",
            "FDS",
            "CONNECTED",
            "LAST SEEN",
        ],
        [
            [
                str(p["id"]),
                p["name"],
                str(p["pid"]),
                p["process"] or "?",
                "?" if p["rss"] is None else units.format_size(p["rss"]),
                p["mode"] if p.get("attached", True) else "registering",
                str(p["ranges"]) + _unmapping(p, str(p.get("unmapping_ranges", 0))),
                units.format_size(p["bytes"])
                + _unmapping(p, units.format_size(p.get("unmapping_bytes", 0))),
                str(p["fds"]),
                _ago(now, p["connected_at"]),
                _ago(now, p["last_seen"]),
            ]
            for p in mappers
        ],
    )
    for p in mappers:  # why a change waits on a mapper
        if p.get("unmapping_ranges"):
            click.echo(
                f"mapper {p['id']} ({p['name']}) has not yet acknowledged the unmapping of "
                f"{units.plural(p['unmapping_ranges'], 'range')} "
                f"({units.format_size(p['unmapping_bytes'])}): a change waits on it"
            )
    for p in mappers:  # what a mapper lent to another process (a VM) and pinned
        if p.get("pin"):
            pin = p["pin"]
            lent = ", ".join(pin["regions"])
            click.echo(
                f"mapper {p['id']} ({p['name']}) lends {lent} to {pin['label']}, pid {pin['pid']}"
            )


@click.command("stats")
@runtime_dir_option
@timeout_option()
@json_option
def stats_cmd(runtime_dir: Path, timeout: float | None, as_json: bool) -> None:
    """Show the manager's counters (`rejected`: peers that broke the protocol; `refused`:
    requests turned down by a limit or a policy)."""
    stats = control_client(runtime_dir, timeout).stats()
    if as_json:
        echo_json(stats)
        return
    by_reason = {key: stats.pop(key, {}) for key in ("rejected", "refused")}
    width = max(len(k) for k in [*stats, *by_reason])
    for key in sorted(stats):
        value = stats[key]
        if key in ("region_bytes", "address_space"):
            value = units.format_size(value)
        elif key == "uptime":
            value = units.format_duration(value)
        elif key == "invalidation_us_total":
            value = f"{value} µs"
        click.echo(f"{key.ljust(width)}  {value}")
    for key, counts in by_reason.items():
        detail = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
        total = sum(counts.values())
        click.echo(f"{key.ljust(width)}  {total}" + (f" ({detail})" if detail else ""))
