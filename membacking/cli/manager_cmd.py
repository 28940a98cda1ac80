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
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep guest memory and the region journal here, so they survive the manager "
    "(default: /dev/shm/membacking-<uid>-<hash of the runtime directory>; put it on a tmpfs).",
)
@click.option(
    "--no-state",
    is_flag=True,
    help="No state directory: RAM is sealed memfds that end with the manager process "
    "(a crash or restart loses every region).",
)
@click.option(
    "--fresh",
    is_flag=True,
    help="Discard a state left in the state directory (its guest memory is lost) instead "
    "of adopting it.",
)
@click.option(
    "--keep-state",
    is_flag=True,
    help="A clean stop (SIGTERM/SIGINT) keeps the state for the next start instead of "
    "ending guest memory.",
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
    from ..manager.persist import PersistConfig

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
        allow_uids=frozenset(options["allow_uids"]),
        allow_gids=frozenset(options["allow_gids"]),
        limits=Limits(
            options["max_mappers"], options["max_regions"], options["max_fds_per_mapper"]
        ),
        metrics_port=options["metrics_port"],
        metrics_addr=options["metrics_addr"],
        persist=PersistConfig(
            state_dir=options["state_dir"],
            enabled=not options["no_state"],
            fresh=options["fresh"],
            keep=options["keep_state"],
        ),
    )
    if options["no_state"] and (options["keep_state"] or options["state_dir"] is not None):
        raise click.UsageError("--no-state cannot go with --state-dir or --keep-state")
    daemon = Daemon(config)

    def ready(d: Daemon) -> None:
        metrics = f" metrics=http://{config.metrics_addr}:{d.metrics_port}/metrics"
        click.echo(
            f"membacking manager ready: runtime-dir={d.paths.root} pid={os.getpid()} "
            f"regions={len(d.state.regions)} address-space={units.format_size(address_space)}"
            + (
                f" state-dir={d.persist.dir.root} adopted={d.persist.adopted}"
                if d.persist is not None
                else " state-dir=none"
            )
            + (metrics if d.metrics_port is not None else "")
        )
        sys.stdout.flush()

    try:
        daemon.run(on_ready=ready)
    except Refused as exc:
        raise click.ClickException(f"cannot create the initial regions: {exc}") from None
    logging.getLogger("membacking.manager").info("membacking manager stopped")
