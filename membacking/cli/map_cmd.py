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
from .common import (
    Whole,
    control_client,
    echo_json,
    json_option,
    runtime_dir_option,
    timeout_option,
)
from .inspect_cmd import add_process

FULL, PART, NONE = "█", "▒", "·"
MAX_MAPPER_COLUMNS = 8


@dataclass
class Row:
    start: int
    end: int
    label: str
    regions: int  # regions that begin in the row
    backed: bool  # False: a hole (between regions, or a part of one left unbacked)
    readonly: int  # read-only pieces in the row
    names: tuple[str, ...] = ()  # the regions the row shows (none for a hole between them)


def _pieces(region: dict[str, Any]) -> list[tuple[int, int, bool]]:
    """(start, end, writable) of what backs a region, in address order."""
    gpa = region["gpa"]
    mappings = region.get("mappings")
    if mappings is None:  # a whole region
        return [(gpa, gpa + region["size"], bool(region["writable"]))]
    return sorted(
        (gpa + s["offset"], gpa + s["offset"] + s["size"], region["writable"] and s["writable"])
        for s in mappings
    )


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
            rows.append(Row(cursor, r["gpa"], "(hole)", 0, False, 0))
        name = (r["name"],)
        first = True
        at = r["gpa"]
        for start, end, writable in _pieces(r):
            if start > at:
                label = f"(unbacked part of {r['name']})"
                rows.append(Row(at, start, label, int(first), False, 0, name))
                first = False
            ro = "" if writable else " [ro]"
            rows.append(
                Row(start, end, f"{r['name']}{ro}", int(first), True, int(not writable), name)
            )
            first, at = False, end
        end = r["gpa"] + r["size"]
        if end > at:
            label = f"(unbacked part of {r['name']})"
            rows.append(Row(at, end, label, int(first), False, 0, name))
        cursor = end if cursor is None else max(cursor, end)
    if len(rows) <= max_rows:
        return rows
    per = -(-len(rows) // max_rows)  # rows per group, rounded up
    grouped = []
    for i in range(0, len(rows), per):
        part = rows[i : i + per]
        names = [n for row in part for n in row.names]
        names = [n for j, n in enumerate(names) if j == 0 or names[j - 1] != n]
        count = sum(row.regions for row in part)
        if count > 1 or len(names) > 1:
            label = f"{max(count, len(names))} regions {names[0]} .. {names[-1]}"
        else:
            label = names[0] if names else "(hole)"
        holes = sum(1 for row in part if not row.backed)
        if holes and names:
            label += f", {holes} hole{'s' if holes > 1 else ''}"
        readonly = sum(row.readonly for row in part)
        if readonly:
            label += f" [{readonly} ro]"
        backed = any(row.backed for row in part)
        grouped.append(
            Row(part[0].start, part[-1].end, label, count, backed, readonly, tuple(names))
        )
    return grouped


def _axis(pieces: list[tuple[int, int, bool]], lo: int, hi: int, width: int) -> str:
    cells = []
    span = hi - lo
    starts = [p[0] for p in pieces]
    for i in range(width):
        a, b = lo + span * i // width, lo + span * (i + 1) // width
        j = max(0, bisect.bisect_right(starts, b) - 1)
        hit = [p for p in pieces[max(0, j - 64) : j + 1] if p[0] < b and p[1] > a]
        if not hit:
            cells.append(NONE)
        else:
            cells.append(FULL if any(p[2] for p in hit) else PART)
    return "".join(cells)


def _visible(regions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The placed, active regions, by guest address."""
    return sorted(
        (r for r in regions if r["gpa"] is not None and r["active"]), key=lambda r: r["gpa"]
    )


def regions_span(regions: list[dict[str, Any]]) -> tuple[int, int] | None:
    """[start, end) from the lowest visible region to the end of the highest (None: none)."""
    return _span(_visible(regions))


def _span(placed: list[dict[str, Any]]) -> tuple[int, int] | None:
    """[start, end) of the visible regions `placed` (by guest address; None: none)."""
    if not placed:
        return None
    return placed[0]["gpa"], max(r["gpa"] + r["size"] for r in placed)


def _space_text(address_space: int | None) -> str:
    """`guest address space 0x0-0x10000000000 (1 TiB)`: what the manager serves."""
    if address_space is None:  # a manager that does not say
        return "guest address space"
    return f"guest address space 0x0-{address_space:#x} ({units.format_size(address_space)})"


def render_map(
    regions: list[dict[str, Any]],
    mappers: list[dict[str, Any]],
    width: int = 64,
    max_rows: int = 40,
    address_space: int | None = None,
) -> list[str]:
    """The picture as lines of text (pure: tests call it directly). The header states the
    address space the manager serves; the bar and the table span the visible regions."""
    placed = _visible(regions)
    space = _space_text(address_space)
    extent = _span(placed)
    if extent is None:
        return [f"{space}: no visible regions"]
    lo, hi = extent
    pieces = [piece for r in placed for piece in _pieces(r)]
    backed = sum(end - start for start, end, _ in pieces)
    lines = [
        f"{space}: {len(placed)} visible region{'s' if len(placed) != 1 else ''} in "
        f"{lo:#x}-{hi:#x}, {units.format_size(backed)} backed, "
        f"{len(mappers)} mapper{'s' if len(mappers) != 1 else ''}",
        f"  {lo:#x} {_axis(pieces, lo, hi, width)} {hi:#x}",
        f"  {FULL} read-write  {PART} read-only  {NONE} hole",
        "",
    ]
    rows = _rows(placed, max_rows)
    shown = mappers[:MAX_MAPPER_COLUMNS]
    held = {p["id"]: sorted((s, s + n) for s, n in p.get("held", [])) for p in shown}
    gpa_w = max(len(f"{row.start:#x}-{row.end:#x}") for row in rows)
    label_w = min(48, max(len(row.label) for row in rows))
    col_w = max([4] + [len(f"m{p['id']}") for p in shown])
    header = f"  {'GPA'.ljust(gpa_w)}  {'SIZE':>9}  {'REGION'.ljust(label_w)}"
    header += "".join(f"  {('m' + str(p['id'])).ljust(col_w)}" for p in shown)
    lines.append(header.rstrip())
    for row in rows:
        cells = ""
        for p in shown:
            fraction = _coverage(held[p["id"]], row.start, row.end) if row.backed else 0.0
            mark = FULL if fraction >= 0.999 else PART if fraction > 0 else NONE
            cells += f"  {mark.ljust(col_w)}"
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
@timeout_option()
@json_option
@click.option(
    "--rows",
    type=Whole("rows", "ROWS", min=4),
    default=40,
    show_default=True,
    help="Group neighbouring regions beyond this many lines.",
)
@click.option(
    "--width",
    type=Whole("width", "COLUMNS", min=16, max=400),
    default=64,
    show_default=True,
    help="Width of the address-space bar.",
)
def map_cmd(runtime_dir: Path, timeout: float | None, as_json: bool, rows: int, width: int) -> None:
    """Draw the guest address space: regions, holes, and what each mapper has mapped.

    The first line states the address space the manager serves and the span its visible regions
    cover; the bar and the table show that span. With --json: address_space (bytes),
    regions_span ([start, end], null without visible regions), regions, and mappers as
    `membacking mappers --json` lists them (with process and rss)."""
    client = control_client(runtime_dir, timeout)
    address_space = client.stats().get("address_space")
    regions, mappers = client.regions(), client.mappers()
    if as_json:
        span = regions_span(regions)
        echo_json(
            {
                "address_space": address_space,
                "regions_span": None if span is None else list(span),
                "regions": regions,
                "mappers": add_process(mappers),
            }
        )
        return
    lines = render_map(regions, mappers, width=width, max_rows=rows, address_space=address_space)
    for line in lines:
        click.echo(line)
