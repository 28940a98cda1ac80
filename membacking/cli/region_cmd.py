"""`membacking region add|remove`: change the regions of guest memory."""

from __future__ import annotations

from pathlib import Path

import click

from .. import units
from ..control_client import ControlClient
from .common import ADDRESS, SIZE, Group, runtime_dir_option


@click.group(cls=Group)
def region() -> None:
    """Add and remove regions."""


@region.command("add")
@runtime_dir_option
@click.argument("name")
@click.argument("gpa", type=ADDRESS)
@click.argument("size", type=SIZE)
@click.option("--readonly", is_flag=True, help="Mappers may only read this region.")
def region_add(runtime_dir: Path | None, name: str, gpa: int, size: int, readonly: bool) -> None:
    """Add a region NAME of SIZE bytes at guest address GPA."""
    try:
        units.check_name(name)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="NAME") from None
    r = ControlClient(runtime_dir).add_region(name, gpa, size, readonly)
    click.echo(
        f"added region {r['name']} at {r['gpa']:#x}-{r['gpa'] + r['size']:#x} "
        f"({units.format_size(r['size'])}, {'rw' if r['writable'] else 'ro'})"
    )


@region.command("remove")
@runtime_dir_option
@click.argument("name")
def region_remove(runtime_dir: Path | None, name: str) -> None:
    """Remove region NAME; returns once every mapper holding it has unmapped it."""
    result = ControlClient(runtime_dir).remove_region(name)
    holders = ", ".join(map(str, result["unmapped_from"])) or "no mapper"
    click.echo(f"removed region {result['name']} (unmapped from {holders})")
