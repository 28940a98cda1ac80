"""`membacking manager run`: the daemon in the foreground."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from .. import units
from ..manager.state import Limits
from .common import SIZE, Group, runtime_dir_option, spec_callback


@click.group(cls=Group)
def manager() -> None:
    """Run the manager daemon."""


@manager.command("run")
@runtime_dir_option
@click.option(
    "--region",
    "regions",
    multiple=True,
    callback=spec_callback(units.parse_region_spec),
    metavar="NAME=GPA:SIZE[:ro]",
    help="Create a region at start (repeatable).",
)
@click.option(
    "--address-space",
    type=SIZE,
    default="1T",
    show_default=True,
    help="Size of the guest-physical address space.",
)
@click.option(
    "--unmap-timeout",
    type=click.FloatRange(min=0.1),
    default=30.0,
    show_default=True,
    help="Seconds a mapper may take to acknowledge an Unmap before it is evicted.",
)
@click.option(
    "--max-mappers",
    type=click.IntRange(min=1),
    default=Limits.max_mappers,
    show_default=True,
    help="Refuse mappers beyond this many.",
)
@click.option(
    "--max-regions",
    type=click.IntRange(min=1),
    default=Limits.max_regions,
    show_default=True,
    help="Refuse regions beyond this many.",
)
@click.option(
    "--max-fds-per-mapper",
    type=click.IntRange(min=1),
    default=Limits.max_fds_per_mapper,
    show_default=True,
    help="Deny a mapper fds beyond this many.",
)
@click.option(
    "--allow-uid",
    "allow_uids",
    type=int,
    multiple=True,
    help="Also accept mappers running as this uid (repeatable; default: own uid, root).",
)
@click.option(
    "--allow-gid",
    "allow_gids",
    type=int,
    multiple=True,
    help="Also accept mappers whose primary gid is this (repeatable).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
def manager_run(
    runtime_dir: Path | None,
    regions: list[tuple[str, int, int, bool]],
    address_space: int,
    unmap_timeout: float,
    max_mappers: int,
    max_regions: int,
    max_fds_per_mapper: int,
    allow_uids: tuple[int, ...],
    allow_gids: tuple[int, ...],
    log_level: str,
) -> None:
    """Run the manager in the foreground until SIGINT or SIGTERM."""
    from ..manager import Daemon, ManagerConfig, RegionSpec
    from ..manager.errors import Refused

    logging.basicConfig(
        level=log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    config = ManagerConfig(
        runtime_dir=runtime_dir,
        address_space=address_space,
        regions=[RegionSpec(*spec) for spec in regions],
        unmap_timeout=unmap_timeout,
        allow_uids=frozenset(allow_uids),
        allow_gids=frozenset(allow_gids),
        limits=Limits(max_mappers, max_regions, max_fds_per_mapper),
    )
    daemon = Daemon(config)

    def ready(d: Daemon) -> None:
        click.echo(
            f"membacking manager ready: runtime-dir={d.paths.root} pid={os.getpid()} "
            f"regions={len(d.state.regions)} address-space={units.format_size(address_space)}"
        )
        sys.stdout.flush()

    try:
        daemon.run(on_ready=ready)
    except Refused as exc:
        raise click.ClickException(f"cannot create the initial regions: {exc}") from None
    click.echo("membacking manager stopped", err=True)
