"""`membacking region ...`: add, remove, enable, disable, move regions and change their
backing ranges."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .. import units
from ..control_client import ControlClient
from .common import ADDRESS, SIZE, Group, runtime_dir_option


@click.group(cls=Group)
def region() -> None:
    """Add, remove, enable, disable and move regions."""


def _describe(r: dict[str, Any]) -> str:
    where = f"{r['gpa']:#x}-{r['gpa'] + r['size']:#x}" if r["gpa"] is not None else "(no GPA)"
    mode = "rw" if r["writable"] else "ro"
    extra = f", priority {r['priority']}" if r["priority"] else ""
    return f"{r['name']} at {where} ({units.format_size(r['size'])}, {mode}, {r['backing']}" + (
        f"{extra}, {r['state']})"
    )


def _region_name(ctx: click.Context, param: click.Parameter, name: str) -> str:
    """NAME of every region command: the name rule is checked before the manager is asked."""
    try:
        return units.check_name(name, "region name")
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


@region.command("add")
@runtime_dir_option
@click.argument("name", callback=_region_name)
@click.argument("gpa", type=ADDRESS)
@click.argument("size", type=SIZE)
@click.option("--readonly", is_flag=True, help="Mappers may only read this region.")
@click.option(
    "--priority",
    type=click.IntRange(0, 255),
    default=0,
    show_default=True,
    help="Higher priorities hide lower ones nested inside them.",
)
@click.option(
    "--file",
    "path",
    type=click.Path(dir_okay=True, path_type=Path),
    default=None,
    help="Back the region with this file (created if missing; kept after exit).",
)
@click.option("--hugetlb", is_flag=True, help="Back the region with huge pages.")
@click.option(
    "--private", is_flag=True, help="Private RAM: anonymous memory of the single attached mapper."
)
@click.option("--disabled", is_flag=True, help="Add it without making it visible yet.")
def region_add(
    runtime_dir: Path | None,
    name: str,
    gpa: int,
    size: int,
    readonly: bool,
    priority: int,
    path: Path | None,
    hugetlb: bool,
    private: bool,
    disabled: bool,
) -> None:
    """Add a region NAME of SIZE bytes at guest address GPA."""
    r = ControlClient(runtime_dir).add_region(
        name,
        gpa,
        size,
        readonly,
        priority=priority,
        disabled=disabled,
        file=path,
        hugetlb=hugetlb,
        private=private,
    )
    click.echo(f"added region {_describe(r)}")


@region.command("remove")
@runtime_dir_option
@click.argument("name", callback=_region_name)
def region_remove(runtime_dir: Path | None, name: str) -> None:
    """Remove region NAME; returns once every mapper holding it has unmapped it."""
    result = ControlClient(runtime_dir).remove_region(name)
    holders = ", ".join(map(str, result["unmapped_from"])) or "no mapper"
    click.echo(f"removed region {result['name']} (unmapped from {holders})")


@region.command("enable")
@runtime_dir_option
@click.argument("name", callback=_region_name)
@click.argument("gpa", type=ADDRESS, required=False)
def region_enable(runtime_dir: Path | None, name: str, gpa: int | None) -> None:
    """Make region NAME visible (at GPA, if given)."""
    click.echo(f"enabled region {_describe(ControlClient(runtime_dir).enable_region(name, gpa))}")


@region.command("disable")
@runtime_dir_option
@click.argument("name", callback=_region_name)
def region_disable(runtime_dir: Path | None, name: str) -> None:
    """Hide region NAME; the best region beneath it shows through again."""
    click.echo(f"disabled region {_describe(ControlClient(runtime_dir).disable_region(name))}")


@region.command("move")
@runtime_dir_option
@click.argument("name", callback=_region_name)
@click.argument("gpa", type=ADDRESS)
def region_move(runtime_dir: Path | None, name: str, gpa: int) -> None:
    """Move region NAME to guest address GPA, keeping its contents (private RAM cannot move)."""
    click.echo(f"moved region {_describe(ControlClient(runtime_dir).move_region(name, gpa))}")


@region.command("map")
@runtime_dir_option
@click.argument("name", callback=_region_name)
@click.argument("offset", type=ADDRESS)
@click.argument("size", type=SIZE)
@click.option(
    "--file",
    "path",
    type=click.Path(path_type=Path),
    default=None,
    help="Back the range with this file instead of new zeroed memory.",
)
@click.option("--file-offset", type=SIZE, default=0, help="Where in the file the range starts.")
@click.option("--readonly", is_flag=True, help="Map the new backing read-only.")
def region_map(
    runtime_dir: Path | None,
    name: str,
    offset: int,
    size: int,
    path: Path | None,
    file_offset: int,
    readonly: bool,
) -> None:
    """Replace OFFSET..OFFSET+SIZE of region NAME with a new backing (atomic for readers)."""
    r = ControlClient(runtime_dir).map_range(
        name, offset, size, file=path, file_offset=file_offset, readonly=readonly
    )
    click.echo(f"mapped {units.format_size(size)} at offset {offset:#x} of region {_describe(r)}")


@region.command("unmap")
@runtime_dir_option
@click.argument("name", callback=_region_name)
@click.argument("offset", type=ADDRESS)
@click.argument("size", type=SIZE)
def region_unmap(runtime_dir: Path | None, name: str, offset: int, size: int) -> None:
    """Remove OFFSET..OFFSET+SIZE of region NAME's backing, leaving a hole."""
    r = ControlClient(runtime_dir).unmap_range(name, offset, size)
    click.echo(f"unmapped {units.format_size(size)} at offset {offset:#x} of region {_describe(r)}")
