"""`membacking mapper attach`: a mapper that stays attached until SIGINT or SIGTERM (or until it
loses its manager: then it exits with status 1 and says why, once); `mapper evict ID`: cut one
off."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import click

from .. import units
from ..protocol.ranges import MemoryRange
from .common import (
    PROGRESS_STEP,
    Group,
    NumericArgs,
    Whole,
    control_client,
    echo_json,
    json_option,
    progress,
    runtime_dir_option,
    spec_callback,
    timeout_option,
)


@click.group(cls=Group)
def mapper() -> None:
    """Attach mapper processes, or evict one."""


@mapper.command("attach")
@runtime_dir_option
@timeout_option("10")
@click.option("--name", default=None, help="Mapper name shown by `membacking mappers`.")
@click.option(
    "--prefault",
    "prefaults",
    multiple=True,
    callback=spec_callback(units.parse_range_spec),
    metavar="GPA:SIZE",
    help="Map this range right away (repeatable).",
)
@click.option(
    "--eager", is_flag=True, help="Be sent every mapping now and every new one when it is added."
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="error",
    show_default=True,
    help="Show the mapper's own log lines from this level up (why it stops is printed anyway).",
)
def mapper_attach(
    runtime_dir: Path,
    timeout: float | None,
    name: str | None,
    prefaults: list[tuple[int, int]],
    eager: bool,
    log_level: str,
) -> None:
    """Attach a mapper and stay attached until SIGINT or SIGTERM (exit 1 if the manager goes)."""
    from .. import logs
    from ..mapper import attach

    logs.configure(log_level)

    if name is not None:
        try:
            units.check_name(name)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--name") from None
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with attach(runtime_dir, name=name, eager=eager, timeout=timeout or 10.0) as memory:
        for gpa, size in prefaults:
            try:
                rng = MemoryRange.bounding(gpa, gpa + size)
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint="--prefault") from None
            with progress(rng.len, f"prefaulting {rng}") as bar:
                for start in range(rng.start, rng.end, PROGRESS_STEP):
                    step = min(PROGRESS_STEP, rng.end - start)
                    memory.ensure_mapped(start, step)
                    bar.update(step)
        mode = " (eager)" if memory.eager else ""
        click.echo(f"mapper {memory.mapper_id} attached as {memory.name}{mode} (pid {os.getpid()})")
        sys.stdout.flush()
        while not stop.wait(0.5):
            if memory.manager_gone is not None:
                raise click.ClickException(f"mapper {memory.mapper_id}: {memory.manager_gone}")
    click.echo("mapper detached", err=True)


@mapper.command("evict", cls=NumericArgs)
@runtime_dir_option
@timeout_option()
@click.argument("mapper_id", metavar="ID", type=Whole("mapper id", "ID", min=1))
@json_option
def mapper_evict(runtime_dir: Path, timeout: float | None, mapper_id: int, as_json: bool) -> None:
    """Cut mapper ID off (see `membacking mappers`): it is told it was evicted, and what it
    held is released (counted in `stats` as evictions_by_operator). It drops every mapping
    before its next access, which fails (MappingsDroppedError), as do new faults."""
    evicted = control_client(runtime_dir, timeout).evict_mapper(mapper_id)
    if as_json:
        echo_json(evicted)
        return
    click.echo(f"evicted mapper {evicted['id']} ({evicted['name']}, pid {evicted['pid']})")
    pin = evicted.get("pin")
    if pin:  # what a VM runs on is no longer guarded: a change to it reaches the running guest
        regions = ", ".join(pin["regions"])
        click.echo(
            f"warning: it lent {regions} to {pin['label']} (pid {pin['pid']}), which runs "
            "on: they are no longer pinned, and removing, moving or unmapping them now changes "
            "a running guest's RAM under it",
            err=True,
        )
