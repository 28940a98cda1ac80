"""`membacking region ...`: add, remove, enable, disable, move regions and change their
backing ranges."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import click
from click.shell_completion import CompletionItem

from .. import units
from ..control_client import ControlClient
from ..errors import MembackingError
from ..manager.model import evictions, removal_summary
from .common import (
    FILE_OFFSET,
    PAGE_ADDRESS,
    PAGE_OFFSET,
    PAGE_SIZE,
    Group,
    NumericArgs,
    Whole,
    client_runtime_dir,
    control_client,
    echo_json,
    json_option,
    runtime_dir_option,
    timeout_option,
)


@click.group(cls=Group)
def region() -> None:
    """Add, remove, enable, disable and move regions."""


def _describe(r: dict[str, Any]) -> str:
    where = f"{r['gpa']:#x}-{r['gpa'] + r['size']:#x}" if r["gpa"] is not None else "(no GPA)"
    mode = "rw" if r["writable"] else "ro"
    extra = f", priority {r['priority']}" if r["priority"] else ""
    memory = r.get("memory", r["backing"])  # where it lives (a daemon before 'memory': the kind)
    return f"{r['name']} at {where} ({units.format_size(r['size'])}, {mode}, {memory}" + (
        f"{extra}, {r['state']})"
    )


def complete_region_name(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Shell completion of NAME: the regions of the daemon the command line points at."""
    try:
        runtime_dir = client_runtime_dir(
            ctx.params.get("runtime_dir"), ctx.params.get("config_path")
        )
        regions = ControlClient(runtime_dir, timeout=1.0).regions()
    except (MembackingError, OSError):
        return []
    return [
        CompletionItem(
            r["name"], help=f"{units.format_size(r['size'])} {r.get('memory', r['backing'])}"
        )
        for r in regions
        if r["name"].startswith(incomplete)
    ]


def _done(result: dict[str, Any], text: str, as_json: bool) -> None:
    """Print what a command did: a sentence, or with --json the daemon's answer."""
    if as_json:
        echo_json(result)
        return
    evicted = evictions(result)
    if evicted and " evicted " not in text:  # a removal's sentence says so already
        text += f" ({'; '.join(evicted)})"
    click.echo(text)


def _region_name(ctx: click.Context, param: click.Parameter, name: str) -> str:
    """NAME of every region command: the name rule is checked before the manager is asked."""
    try:
        return units.check_name(name, "region name")
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


@region.command("add", cls=NumericArgs)
@runtime_dir_option
@timeout_option("120")
@json_option
@click.argument("name", callback=_region_name)
@click.argument("gpa", type=PAGE_ADDRESS)
@click.argument("size", type=PAGE_SIZE)
@click.option("--readonly", is_flag=True, help="Mappers may only read this region.")
@click.option(
    "--priority",
    type=Whole("priority", min=0, max=255),
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
    runtime_dir: Path,
    timeout: float | None,
    as_json: bool,
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
    """Add a region NAME of SIZE bytes at guest address GPA (both multiples of 4096; a
    hugetlb region's, of the huge page size)."""
    chosen = [
        flag
        for flag, on in (("--file", path), ("--hugetlb", hugetlb), ("--private", private))
        if on
    ]
    if len(chosen) > 1:
        raise click.UsageError(f"choose one backing: {' and '.join(chosen)} do not go together")
    client = control_client(runtime_dir, timeout)
    r = _wait_showing_holders(
        client,
        f"adding {name}",
        lambda: client.add_region(
            name,
            gpa,
            size,
            readonly,
            priority=priority,
            disabled=disabled,
            file=path,
            hugetlb=hugetlb,
            private=private,
        ),
    )
    note = ""
    if private:
        note = "; only one mapper may attach while it exists"
    _done(r, f"added region {_describe(r)}{note}", as_json)


@region.command("remove")
@runtime_dir_option
@timeout_option("120")
@json_option
@click.argument("name", callback=_region_name, shell_complete=complete_region_name)
def region_remove(runtime_dir: Path, timeout: float | None, as_json: bool, name: str) -> None:
    """Remove region NAME; returns once every mapper holding it has unmapped it or been
    evicted (after --unmap-timeout), and says which."""
    client = control_client(runtime_dir, timeout)
    result = _wait_showing_holders(
        client, f"removing {name}", lambda: client.remove_region(name), "to unmap it"
    )
    _done(result, f"removed region {result['name']} ({removal_summary(result)})", as_json)


@region.command("enable", cls=NumericArgs)
@runtime_dir_option
@timeout_option("120")
@json_option
@click.argument("name", callback=_region_name, shell_complete=complete_region_name)
@click.argument("gpa", type=PAGE_ADDRESS, required=False)
def region_enable(
    runtime_dir: Path, timeout: float | None, as_json: bool, name: str, gpa: int | None
) -> None:
    """Make region NAME visible (at GPA, if given)."""
    client = control_client(runtime_dir, timeout)
    r = _wait_showing_holders(client, f"enabling {name}", lambda: client.enable_region(name, gpa))
    _done(r, f"enabled region {_describe(r)}", as_json)


@region.command("disable")
@runtime_dir_option
@timeout_option("120")
@json_option
@click.argument("name", callback=_region_name, shell_complete=complete_region_name)
def region_disable(runtime_dir: Path, timeout: float | None, as_json: bool, name: str) -> None:
    """Hide region NAME; the best region beneath it shows through again."""
    client = control_client(runtime_dir, timeout)
    r = _wait_showing_holders(client, f"disabling {name}", lambda: client.disable_region(name))
    _done(r, f"disabled region {_describe(r)}", as_json)


@region.command("move", cls=NumericArgs)
@runtime_dir_option
@timeout_option("120")
@json_option
@click.argument("name", callback=_region_name, shell_complete=complete_region_name)
@click.argument("gpa", type=PAGE_ADDRESS)
def region_move(
    runtime_dir: Path, timeout: float | None, as_json: bool, name: str, gpa: int
) -> None:
    """Move region NAME to guest address GPA, keeping its contents (private RAM cannot move)."""
    client = control_client(runtime_dir, timeout)
    r = _wait_showing_holders(client, f"moving {name}", lambda: client.move_region(name, gpa))
    _done(r, f"moved region {_describe(r)}", as_json)


@region.command("map", cls=NumericArgs)
@runtime_dir_option
@timeout_option("120")
@json_option
@click.argument("name", callback=_region_name, shell_complete=complete_region_name)
@click.argument("offset", type=PAGE_OFFSET)
@click.argument("size", type=PAGE_SIZE)
@click.option(
    "--file",
    "path",
    type=click.Path(path_type=Path),
    default=None,
    help="Back the range with this file instead of new zeroed memory.",
)
@click.option(
    "--file-offset",
    type=FILE_OFFSET,
    default=0,
    help="Where in the file the range starts (a multiple of 4096).",
)
@click.option("--readonly", is_flag=True, help="Map the new backing read-only.")
def region_map(
    runtime_dir: Path,
    timeout: float | None,
    as_json: bool,
    name: str,
    offset: int,
    size: int,
    path: Path | None,
    file_offset: int,
    readonly: bool,
) -> None:
    """Replace OFFSET..OFFSET+SIZE of region NAME with a new backing (atomic for readers)."""
    if file_offset and path is None:
        raise click.UsageError("--file-offset goes with --file (new memory has no offset)")
    client = control_client(runtime_dir, timeout)
    r = _wait_showing_holders(
        client,
        f"mapping into {name}",
        lambda: client.map_range(
            name, offset, size, file=path, file_offset=file_offset, readonly=readonly
        ),
    )
    _done(
        r,
        f"mapped {units.format_size(size)} at offset {units.format_address(offset)} "
        f"of region {_describe(r)}",
        as_json,
    )


@region.command("unmap", cls=NumericArgs)
@runtime_dir_option
@timeout_option("120")
@json_option
@click.argument("name", callback=_region_name, shell_complete=complete_region_name)
@click.argument("offset", type=PAGE_OFFSET)
@click.argument("size", type=PAGE_SIZE)
def region_unmap(
    runtime_dir: Path, timeout: float | None, as_json: bool, name: str, offset: int, size: int
) -> None:
    """Remove OFFSET..OFFSET+SIZE of region NAME's backing, leaving a hole (exit 1 if it is
    a hole already: nothing changes)."""
    client = control_client(runtime_dir, timeout)
    r = _wait_showing_holders(
        client, f"unmapping from {name}", lambda: client.unmap_range(name, offset, size)
    )
    where = f"{units.format_size(size)} at offset {units.format_address(offset)}"
    unmapped = r.get("unmapped_bytes")  # (None from a manager of an earlier release)
    if unmapped == 0:
        if as_json:  # the daemon's answer all the same (unmapped_bytes 0), then the refusal
            echo_json(r)
        raise click.ClickException(
            f"nothing is mapped in the {where} of region {name} (it is a hole already): "
            "nothing changed"
        )
    if unmapped is not None and unmapped < size:
        where = f"{units.format_size(unmapped)} of the {where} (the rest was a hole already)"
    _done(r, f"unmapped {where} of region {_describe(r)}", as_json)


#: Seconds a change may take before the command says whom it waits for, and how often after.
SHOW_AFTER = 1.0


def _wait_showing_holders(
    client: ControlClient, doing: str, call: Any, what: str = "to acknowledge the change"
) -> dict[str, Any]:
    """Run `call` (a change that waits for mappers' acknowledgements: the holders' Unmaps, an
    eager mapper's Maps); while it takes longer than SHOW_AFTER, say on stderr which mappers
    have not answered yet, for how long, and after how long they are evicted."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = call()
        except BaseException as exc:  # handed to the waiting thread
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    worker.start()
    worker.join(SHOW_AFTER)
    watcher: ControlClient | None = None
    while worker.is_alive():
        try:
            if watcher is None:
                watcher = ControlClient(client.paths.root, timeout=2.0)
            status = watcher.status()
            limit = units.format_duration(status["unmap_timeout"])
            holders = ", ".join(
                f"mapper {w['id']} ({w['name']}, pid {w['pid']}, "
                f"{units.format_duration(w['seconds'])})"
                for w in status["waiting_on"]
            )
            waited = units.format_duration(time.monotonic() - started)
            awaited = status.get("awaited") or []
            if awaited and not holders:  # held until the mappers of the manager before are back
                pids = ", ".join(str(a["pid"]) for a in awaited)
                left = units.format_duration(awaited[0]["seconds_left"])
                line = (
                    f"{doing} for {waited}: waiting for the mapper(s) of the manager before "
                    f"the restart (pid {pids}) to come back, at most {left} more"
                )
            else:
                line = (
                    f"{doing} for {waited}: waiting for "
                    f"{holders or 'the last acknowledgement'} {what} "
                    f"(a mapper is evicted after {limit})"
                )
            click.echo(line, err=True)
            sys.stderr.flush()
        except MembackingError:
            pass  # the answer, or its error, comes from `call`
        worker.join(2.0)
    if watcher is not None:
        watcher.close()
    if "error" in outcome:
        raise outcome["error"]
    result: dict[str, Any] = outcome["result"]
    return result
