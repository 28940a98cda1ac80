"""`membacking regions`, `mappers`, `stats`: what the daemon holds, as tables or JSON."""

from __future__ import annotations

import time
from pathlib import Path

import click

from .. import units
from ..control_client import ControlClient
from .common import echo_json, json_option, runtime_dir_option, table


@click.command("regions")
@runtime_dir_option
@json_option
def regions_cmd(runtime_dir: Path | None, as_json: bool) -> None:
    """List the regions of guest memory."""
    regions = ControlClient(runtime_dir).regions()
    if as_json:
        echo_json(regions)
        return
    if not regions:
        click.echo("no regions")
        return
    table(
        ["NAME", "GPA", "END", "SIZE", "MODE", "HOLDERS", "STATE"],
        [
            [
                r["name"],
                f"{r['gpa']:#x}",
                f"{r['gpa'] + r['size']:#x}",
                units.format_size(r["size"]),
                "rw" if r["writable"] else "ro",
                ",".join(map(str, r["holders"])) or "-",
                r["state"],
            ]
            for r in regions
        ],
    )


@click.command("mappers")
@runtime_dir_option
@json_option
def mappers_cmd(runtime_dir: Path | None, as_json: bool) -> None:
    """List the attached mappers."""
    mappers = ControlClient(runtime_dir).mappers()
    if as_json:
        echo_json(mappers)
        return
    if not mappers:
        click.echo("no mappers")
        return
    now = time.time()
    table(
        ["ID", "NAME", "PID", "RANGES", "MAPPED", "FDS", "ATTACHED"],
        [
            [
                str(p["id"]),
                p["name"],
                str(p["pid"]),
                str(p["ranges"]),
                units.format_size(p["bytes"]),
                str(p["fds"]),
                f"{now - p['connected_at']:.0f}s ago",
            ]
            for p in mappers
        ],
    )


@click.command("stats")
@runtime_dir_option
@json_option
def stats_cmd(runtime_dir: Path | None, as_json: bool) -> None:
    """Show the manager's counters."""
    stats = ControlClient(runtime_dir).stats()
    if as_json:
        echo_json(stats)
        return
    rejected = stats.pop("rejected", {})
    width = max(len(k) for k in stats)
    for key in sorted(stats):
        value = stats[key]
        if key in ("region_bytes", "address_space"):
            value = units.format_size(value)
        click.echo(f"{key.ljust(width)}  {value}")
    total = sum(rejected.values())
    detail = ", ".join(f"{k}={v}" for k, v in sorted(rejected.items()))
    click.echo(f"{'rejected'.ljust(width)}  {total}" + (f" ({detail})" if detail else ""))
