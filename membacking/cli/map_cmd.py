"""`membacking map`: a picture of the guest address space: regions along the GPA axis with names,
sizes, read-only marks and holes, and for each mapper which parts it has mapped. Beyond `--rows`
lines, neighbouring regions are grouped, so 1 region and 1,000 both read well.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from .. import units
from ..control_client import ControlClient
from .common import echo_json, json_option, runtime_dir_option

FULL, PART, NONE = "█", "▒", "·"
MAX_MAPPER_COLUMNS = 8


@dataclass
class Row:
    start: int
    end: int
    label: str
    count: int  # regions in the row (0: a hole)
    readonly: int  # of which read-only


def _coverage(held: list[tuple[int, int]], start: int, end: int) -> float:
    """Fraction of [start, end) inside the sorted, non-overlapping `held` ranges."""
    if end <= start:
        return 0.0
    i = max(0, bisect.bisect_right(held, (start, float("inf"))) - 1)
    covered = 0
    while i < len(held) and held[i][0] < end:
        lo, hi = max(held[i][0], start), min(held[i][1], end)
        covered += max(0, hi - lo)
        i += 1
    return covered / (end - start)


def _rows(regions: list[dict[str, Any]], max_rows: int) -> list[Row]:
    rows: list[Row] = []
    cursor: int | None = None
    for r in regions:
        if cursor is not None and r["gpa"] > cursor:
            rows.append(Row(cursor, r["gpa"], "(hole)", 0, 0))
        ro = "" if r["writable"] else " [ro]"
        rows.append(
            Row(r["gpa"], r["gpa"] + r["size"], f"{r['name']}{ro}", 1, 0 if r["writable"] else 1)
        )
        cursor = r["gpa"] + r["size"] if cursor is None else max(cursor, r["gpa"] + r["size"])
    if len(rows) <= max_rows:
        return rows
    per = -(-len(rows) // max_rows)  # rows per group, rounded up
    grouped = []
    for i in range(0, len(rows), per):
        part = rows[i : i + per]
        names = [row.label.split()[0] for row in part if row.count]
        count = sum(row.count for row in part)
        label = (
            f"{count} regions {names[0]} .. {names[-1]}"
            if count > 1
            else names[0]
            if names
            else "(hole)"
        )
        holes = sum(1 for row in part if not row.count)
        if holes and count:
            label += f", {holes} hole{'s' if holes > 1 else ''}"
        readonly = sum(row.readonly for row in part)
        if readonly:
            label += f" [{readonly} ro]"
        grouped.append(Row(part[0].start, part[-1].end, label, count, readonly))
    return grouped


def _axis(regions: list[dict[str, Any]], lo: int, hi: int, width: int) -> str:
    cells = []
    span = hi - lo
    starts = [r["gpa"] for r in regions]
    for i in range(width):
        a, b = lo + span * i // width, lo + span * (i + 1) // width
        j = max(0, bisect.bisect_right(starts, b) - 1)
        hit = [
            r for r in regions[max(0, j - 64) : j + 1] if r["gpa"] < b and r["gpa"] + r["size"] > a
        ]
        if not hit:
            cells.append(NONE)
        else:
            cells.append(FULL if any(r["writable"] for r in hit) else PART)
    return "".join(cells)


def render_map(
    regions: list[dict[str, Any]],
    mappers: list[dict[str, Any]],
    width: int = 64,
    max_rows: int = 40,
) -> list[str]:
    """The picture as lines of text (pure: tests call it directly)."""
    placed = sorted(
        (r for r in regions if r["gpa"] is not None and r["active"]), key=lambda r: r["gpa"]
    )
    if not placed:
        return ["no visible regions"]
    lo, hi = placed[0]["gpa"], max(r["gpa"] + r["size"] for r in placed)
    total = sum(r["size"] for r in placed)
    lines = [
        f"guest address space {lo:#x}-{hi:#x}: {len(placed)} visible region"
        f"{'s' if len(placed) != 1 else ''}, {units.format_size(total)} mapped, "
        f"{len(mappers)} mapper{'s' if len(mappers) != 1 else ''}",
        f"  {lo:#x} {_axis(placed, lo, hi, width)} {hi:#x}",
        f"  {FULL} read-write  {PART} read-only  {NONE} hole",
        "",
    ]
    rows = _rows(placed, max_rows)
    shown = mappers[:MAX_MAPPER_COLUMNS]
    held = {p["id"]: sorted((s, s + n) for s, n in p.get("held", [])) for p in shown}
    gpa_w = max(len(f"{row.start:#x}-{row.end:#x}") for row in rows)
    label_w = min(48, max(len(row.label) for row in rows))
    header = f"  {'GPA'.ljust(gpa_w)}  {'SIZE':>9}  {'REGION'.ljust(label_w)}"
    header += "".join(f"  m{p['id']:<3}" for p in shown)
    lines.append(header.rstrip())
    for row in rows:
        cells = ""
        for p in shown:
            fraction = _coverage(held[p["id"]], row.start, row.end) if row.count else 0.0
            mark = FULL if fraction >= 0.999 else PART if fraction > 0 else NONE
            cells += f"  {mark:<4}"
        span = f"{row.start:#x}-{row.end:#x}"
        label = row.label if len(row.label) <= label_w else row.label[: label_w - 1] + "…"
        line = f"  {span.ljust(gpa_w)}  {units.format_size(row.end - row.start):>9}  "
        lines.append((line + label.ljust(label_w) + cells).rstrip())
    if len(mappers) > len(shown):
        lines.append(
            f"  ... and {len(mappers) - len(shown)} more mappers (see `membacking mappers`)"
        )
    if shown:
        lines.append(
            "  mapper columns: "
            + ", ".join(f"m{p['id']}={p['name']}" for p in shown)
            + f"  ({FULL} all mapped, {PART} partly, {NONE} not)"
        )
    return lines


@click.command("map")
@runtime_dir_option
@json_option
@click.option(
    "--rows",
    type=click.IntRange(min=4),
    default=40,
    show_default=True,
    help="Group neighbouring regions beyond this many lines.",
)
@click.option(
    "--width",
    type=click.IntRange(min=16, max=400),
    default=64,
    show_default=True,
    help="Width of the address-space bar.",
)
def map_cmd(runtime_dir: Path | None, as_json: bool, rows: int, width: int) -> None:
    """Draw the guest address space: regions, holes, and what each mapper has mapped."""
    client = ControlClient(runtime_dir)
    regions, mappers = client.regions(), client.mappers()
    if as_json:
        echo_json({"regions": regions, "mappers": mappers})
        return
    for line in render_map(regions, mappers, width=width, max_rows=rows):
        click.echo(line)
