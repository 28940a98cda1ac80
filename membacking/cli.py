"""The `membacking` command line: run the manager, attach mappers, inspect and change the daemon.

Operator mistakes (no daemon, unknown region, bad size, overlap) end with one line on stderr and
exit status 1, never a traceback.
"""

from __future__ import annotations

import binascii
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from . import units
from .control_client import ControlClient
from .errors import MembackingError
from .manager.state import Limits
from .protocol.ranges import MemoryRange

F = TypeVar("F", bound=Callable[..., Any])


class _Group(click.Group):
    """A group that turns membacking's operator-facing errors into one clean line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MembackingError as exc:
            raise click.ClickException(str(exc)) from None


class _Size(click.ParamType[int]):
    name = "size"

    def __init__(self, what: str = "size") -> None:
        self.what = what

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return units.parse_size(str(value), self.what)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


SIZE = _Size()
ADDRESS = _Size("address")


def _spec(parser: Callable[[str], Any]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def callback(ctx: click.Context, param: click.Parameter, values: Any) -> Any:
        try:
            return [parser(v) for v in values]
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx, param) from None

    return callback


def runtime_dir_option(fn: F) -> F:
    decorated: F = click.option(
        "--runtime-dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="MEMBACKING_RUNTIME_DIR",
        default=None,
        help="Runtime directory of the manager [env MEMBACKING_RUNTIME_DIR; default "
        "$XDG_RUNTIME_DIR/membacking, else /tmp/membacking-<uid>].",
    )(fn)
    return decorated


def json_option(fn: F) -> F:
    decorated: F = click.option(
        "--json", "as_json", is_flag=True, help="Print JSON instead of a table."
    )(fn)
    return decorated


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="membacking")
def cli() -> None:
    """One shared guest-physical address space for many processes."""


# ---- manager ------------------------------------------------------------------------------------


@cli.group(cls=_Group)
def manager() -> None:
    """Run the manager daemon."""


@manager.command("run")
@runtime_dir_option
@click.option(
    "--region",
    "regions",
    multiple=True,
    callback=_spec(units.parse_region_spec),
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
    from .manager import Daemon, ManagerConfig, RegionSpec
    from .manager.errors import Refused

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
            f"membacking manager ready: runtime-dir={d.paths.root} pid={_pid()} "
            f"regions={len(d.state.regions)} address-space={units.format_size(address_space)}"
        )
        sys.stdout.flush()

    try:
        daemon.run(on_ready=ready)
    except Refused as exc:
        raise click.ClickException(f"cannot create the initial regions: {exc}") from None
    click.echo("membacking manager stopped", err=True)


def _pid() -> int:
    import os

    return os.getpid()


# ---- mapper -------------------------------------------------------------------------------------


@cli.group(cls=_Group)
def mapper() -> None:
    """Attach mapper processes."""


@mapper.command("attach")
@runtime_dir_option
@click.option("--name", default=None, help="Mapper name shown by `membacking mappers`.")
@click.option(
    "--prefault",
    "prefaults",
    multiple=True,
    callback=_spec(units.parse_range_spec),
    metavar="GPA:SIZE",
    help="Map this range right away (repeatable).",
)
def mapper_attach(
    runtime_dir: Path | None, name: str | None, prefaults: list[tuple[int, int]]
) -> None:
    """Attach a mapper and stay attached until SIGINT or SIGTERM."""
    from .mapper import attach

    if name is not None:
        try:
            units.check_name(name)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--name") from None
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with attach(runtime_dir, name=name) as memory:
        for gpa, size in prefaults:
            try:
                rng = MemoryRange.bounding(gpa, gpa + size)
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint="--prefault") from None
            memory.ensure_mapped(rng)
        click.echo(f"mapper {memory.mapper_id} attached as {memory.name} (pid {_pid()})")
        sys.stdout.flush()
        while not stop.wait(0.5):
            pass
    click.echo("mapper detached", err=True)


# ---- inspection ---------------------------------------------------------------------------------


def _table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    click.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


@cli.command("regions")
@runtime_dir_option
@json_option
def regions_cmd(runtime_dir: Path | None, as_json: bool) -> None:
    """List the regions of guest memory."""
    regions = ControlClient(runtime_dir).regions()
    if as_json:
        _echo_json(regions)
        return
    if not regions:
        click.echo("no regions")
        return
    _table(
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


@cli.command("mappers")
@runtime_dir_option
@json_option
def mappers_cmd(runtime_dir: Path | None, as_json: bool) -> None:
    """List the attached mappers."""
    mappers = ControlClient(runtime_dir).mappers()
    if as_json:
        _echo_json(mappers)
        return
    if not mappers:
        click.echo("no mappers")
        return
    now = time.time()
    _table(
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


@cli.command("stats")
@runtime_dir_option
@json_option
def stats_cmd(runtime_dir: Path | None, as_json: bool) -> None:
    """Show the manager's counters."""
    stats = ControlClient(runtime_dir).stats()
    if as_json:
        _echo_json(stats)
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


# ---- regions ------------------------------------------------------------------------------------


@cli.group(cls=_Group)
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


# ---- memory -------------------------------------------------------------------------------------


@cli.group(cls=_Group)
def mem() -> None:
    """Read and write guest memory through a short-lived mapper."""


@mem.command("read")
@runtime_dir_option
@click.argument("gpa", type=ADDRESS)
@click.argument("length", type=SIZE)
@click.option(
    "--format", "fmt", type=click.Choice(["hex", "raw"]), default="hex", show_default=True
)
def mem_read(runtime_dir: Path | None, gpa: int, length: int, fmt: str) -> None:
    """Read LENGTH bytes at guest address GPA."""
    from .mapper import attach

    with attach(runtime_dir, name="cli-mem-read") as memory:
        data = memory.read_at(gpa, length)
    if fmt == "raw":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        click.echo(data.hex())


@mem.command("write")
@runtime_dir_option
@click.argument("gpa", type=ADDRESS)
@click.option("--hex", "hex_data", default=None, help="Bytes to write, as hex digits.")
@click.option(
    "--file",
    "path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Write the contents of this file.",
)
def mem_write(runtime_dir: Path | None, gpa: int, hex_data: str | None, path: Path | None) -> None:
    """Write bytes at guest address GPA."""
    from .mapper import attach

    if (hex_data is None) == (path is None):
        raise click.UsageError("give exactly one of --hex or --file")
    if hex_data is not None:
        try:
            data = binascii.unhexlify(hex_data.replace(" ", "").removeprefix("0x"))
        except (binascii.Error, ValueError):
            raise click.BadParameter(
                f"{hex_data!r} is not an even number of hex digits", param_hint="--hex"
            ) from None
    else:
        assert path is not None
        data = path.read_bytes()
    with attach(runtime_dir, name="cli-mem-write") as memory:
        memory.write_at(gpa, data)
    click.echo(f"wrote {len(data)} bytes at {gpa:#x}")


def main() -> None:
    cli(prog_name="membacking")
