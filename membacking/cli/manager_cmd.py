"""`membacking manager run`: the daemon in the foreground."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from .. import units
from ..manager.config import MIN_UNMAP_TIMEOUT
from ..manager.state import Limits
from .common import SIZE, Group, runtime_dir_option, spec_callback


def _check_address_space(value: int | None) -> int | None:
    if value is None:
        return None
    try:
        return units.check_address_space(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


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
    callback=lambda ctx, param, value: _check_address_space(value),
    default="1T",
    show_default=True,
    help="Size of the guest-physical address space.",
)
@click.option(
    "--unmap-timeout",
    type=click.FloatRange(min=MIN_UNMAP_TIMEOUT),
    default=30.0,
    show_default=True,
    help="Seconds a mapper may take to acknowledge an Unmap before it is evicted.",
)
@click.option(
    "--evict-kill/--no-evict-kill",
    default=False,
    show_default=True,
    help="Also SIGKILL a mapper evicted for not acknowledging an Unmap (enforces removal on a "
    "stopped or hung holder at once; without it, it drops its mappings when it runs again).",
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
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Log lines as text or as one JSON object each.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve Prometheus metrics on this port (0 picks a free one).",
)
@click.option(
    "--metrics-addr",
    default="127.0.0.1",
    show_default=True,
    help="Address the metrics endpoint listens on.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="TOML file with any of these settings; options given here override it.",
)
@click.pass_context
def manager_run(ctx: click.Context, /, config_path: Path | None, **options: Any) -> None:
    """Run the manager in the foreground until SIGINT or SIGTERM."""
    from .. import logs
    from ..manager import Daemon, ManagerConfig, RegionSpec
    from ..manager.config import load_config
    from ..manager.errors import Refused

    if config_path is not None:
        for key, value in load_config(config_path).items():
            # only the command line overrides the file (an ambient environment variable does not)
            if ctx.get_parameter_source(key) in (
                None,
                ParameterSource.DEFAULT,
                ParameterSource.ENVIRONMENT,
            ):
                options[key] = value
    logs.configure(options["log_level"], options["log_format"])
    address_space = options["address_space"]
    config = ManagerConfig(
        runtime_dir=options["runtime_dir"],
        address_space=address_space,
        regions=[
            RegionSpec(**spec) if isinstance(spec, dict) else RegionSpec(*spec)
            for spec in options["regions"]
        ],
        unmap_timeout=options["unmap_timeout"],
        evict_kill=options["evict_kill"],
        allow_uids=frozenset(options["allow_uids"]),
        allow_gids=frozenset(options["allow_gids"]),
        limits=Limits(
            options["max_mappers"], options["max_regions"], options["max_fds_per_mapper"]
        ),
        metrics_port=options["metrics_port"],
        metrics_addr=options["metrics_addr"],
    )
    daemon = Daemon(config)

    def ready(d: Daemon) -> None:
        metrics = f" metrics=http://{config.metrics_addr}:{d.metrics_port}/metrics"
        click.echo(
            f"membacking manager ready: runtime-dir={d.paths.root} pid={os.getpid()} "
            f"regions={len(d.state.regions)} address-space={units.format_size(address_space)}"
            + (metrics if d.metrics_port is not None else "")
        )
        sys.stdout.flush()

    try:
        daemon.run(on_ready=ready)
    except Refused as exc:
        raise click.ClickException(f"cannot create the initial regions: {exc}") from None
    logging.getLogger("membacking.manager").info("membacking manager stopped")
