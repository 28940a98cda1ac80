"""`membacking watch`: the daemon's counters, refreshed in place until Ctrl-C."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from .. import units
from ..errors import MembackingError
from .common import Decimal, Whole, control_client, json_option, runtime_dir_option, timeout_option

_CLEAR = "\x1b[H\x1b[2J"
_RATES = ("faults", "maps_sent", "unmaps_sent", "fds_sent", "removals")


def watch_rates(
    stats: dict[str, Any], previous: dict[str, Any] | None, elapsed: float
) -> dict[str, float]:
    """Per-second rates of the counters since the previous refresh (none on the first)."""
    if previous is None:
        return {}
    return {k: round((stats[k] - previous[k]) / max(elapsed, 1e-6), 3) for k in _RATES}


def render_watch(
    stats: dict[str, Any],
    previous: dict[str, Any] | None,
    elapsed: float,
    mappers: list[dict[str, Any]],
) -> list[str]:
    """One screen of `watch`, rates over `elapsed` seconds (pure: tests call it directly)."""
    rejected = stats.get("rejected", {})
    lines = [
        f"membacking  up {stats['uptime']:.0f}s  regions {stats['regions']} "
        f"({units.format_size(stats['region_bytes'])})  mappers {stats['mappers']}  "
        f"rejected {sum(rejected.values())}  refused {sum(stats.get('refused', {}).values())}",
        "",
        f"  {'counter':<16}{'total':>12}{'per second':>14}",
    ]
    for key in _RATES:
        rate = ""
        if previous is not None:
            rate = f"{(stats[key] - previous[key]) / max(elapsed, 1e-6):.1f}"
        lines.append(f"  {key:<16}{stats[key]:>12}{rate:>14}")
    if rejected:
        lines.append("  rejected: " + ", ".join(f"{k}={v}" for k, v in sorted(rejected.items())))
    if mappers:
        lines += ["", f"  {'mapper':<24}{'mode':<7}{'ranges':>8}{'mapped':>12}"]
        for p in mappers[:20]:
            lines.append(
                f"  {(str(p['id']) + ' ' + p['name'])[:23]:<24}{p['mode']:<7}"
                f"{p['ranges']:>8}{units.format_size(p['bytes']):>12}"
            )
        if len(mappers) > 20:
            lines.append(f"  ... {len(mappers) - 20} more")
    return lines


@click.command("watch")
@runtime_dir_option
@timeout_option("twice --interval, at least 2")
@click.option(
    "--interval",
    type=Decimal("seconds", "SECONDS", min=0.05),
    default=1.0,
    show_default=True,
    help="Seconds between refreshes.",
)
@click.option(
    "--count",
    type=Whole("count", min=1),
    default=None,
    help="Stop after this many refreshes (default: until Ctrl-C).",
)
@json_option
def watch_cmd(
    runtime_dir: Path, timeout: float | None, interval: float, count: int | None, as_json: bool
) -> None:
    """Show the daemon's counters, refreshing in place until Ctrl-C (with --json, one JSON
    object per refresh and line: stats, per-second rates, mappers)."""
    client = control_client(runtime_dir, timeout or max(2.0, interval * 2))
    previous: dict[str, Any] | None = None
    previous_at = 0.0
    shown = 0
    try:
        while count is None or shown < count:
            stats, now = client.stats(), time.monotonic()
            # rates over the time that really passed (the calls themselves take some)
            mappers = client.mappers()
            if as_json:  # one object per refresh, one line each (JSON Lines)
                rates = watch_rates(stats, previous, now - previous_at)
                click.echo(json.dumps({"stats": stats, "rates": rates, "mappers": mappers}))
            else:
                screen = render_watch(stats, previous, now - previous_at, mappers)
                click.echo(_CLEAR + "\n".join(screen), nl=True)
            previous, previous_at, shown = stats, now, shown + 1
            if count is None or shown < count:
                time.sleep(interval)
    except KeyboardInterrupt:
        pass
    except MembackingError as exc:
        if not shown:  # it never started: the reason alone, as every other command says it
            raise
        raise click.ClickException(f"stopped watching: {exc}") from None
