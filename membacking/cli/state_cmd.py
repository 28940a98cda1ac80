"""`membacking manager state list|remove`: the state directories a manager killed or stopped with
--keep-state left on this machine (guest memory held in RAM), and their removal once nothing
will use them again.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from ..units import format_size
from .common import Group, echo_json, json_option, table


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


@click.group("state", cls=Group)
def state() -> None:
    """State directories: guest memory kept for a manager's restart (see docs/OPERATIONS.md)."""


@state.command("list")
@click.option(
    "--state-dir",
    "state_dirs",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Also look at this state directory (repeatable; those in the default place, "
    "/dev/shm/membacking-<uid>-*, are always listed).",
)
@json_option
def state_list(state_dirs: tuple[Path, ...], as_json: bool) -> None:
    """List state directories: the runtime directory each keeps memory for, its status (held:
    a manager runs on it; kept: a manager started on its runtime directory adopts it; stale:
    no manager will use it again; new: no journal yet; unreadable: a journal this release
    cannot read), its
    regions, its guest memory in RAM and its age. Exit 1 if a --state-dir given is not a state
    directory."""
    from ..manager.statelist import survey

    found, errors = survey(list(state_dirs))
    if as_json:
        echo_json([info.as_json() for info in found])
    elif found:
        rows = []
        for info in found:
            status = info.status + (f" (pid {info.holder})" if info.holder else "")
            runtime = info.runtime_dir or "?"
            if info.runtime_dir is not None and not info.runtime_exists:
                runtime += " (gone)"
            elif info.pointer is not None and info.status == "stale":
                runtime += " (uses another)"
            rows.append(
                [
                    str(info.path),
                    status,
                    runtime,
                    "?" if info.regions is None else str(info.regions),
                    format_size(info.memory_used),
                    _age(info.age),
                ]
            )
        # the RAM its memory files use (written pages), not the guest memory's size
        table(["STATE DIR", "STATUS", "RUNTIME DIR", "REGIONS", "RAM USED", "AGE"], rows)
        for info in found:  # why a state cannot be read: in the text too, not only --json
            if info.problem is not None:
                click.echo(f"{info.path}: {info.status}: {info.problem}")
        stale = [i for i in found if i.status == "stale"]
        if stale:
            freed = format_size(sum(i.memory_used for i in stale))
            # a stale one found only because it was named is found again only so
            named = {p.resolve() for p in state_dirs}
            more = "".join(
                f" --state-dir {shlex.quote(str(i.path))}"
                for i in stale
                if i.path.resolve() in named
            )
            click.echo(
                f"{len(stale)} stale, {freed} of RAM: `membacking manager state remove --stale"
                f"{more}` frees them"
            )
    else:
        click.echo("no state directories")
    for _, error in errors:
        click.echo(f"Error: {error}", err=True)
    if errors:
        raise SystemExit(1)


@state.command("remove")
@click.argument("paths", nargs=-1, metavar="[DIR]...", type=click.Path(path_type=Path))
@click.option("--stale", is_flag=True, help="Remove every stale state directory.")
@click.option(
    "--state-dir",
    "state_dirs",
    multiple=True,
    type=click.Path(path_type=Path),
    help="With --stale: also look at this state directory (repeatable).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Also remove one a manager holds or a restart would adopt (its guest memory is lost).",
)
@json_option
def state_remove(
    paths: tuple[Path, ...], stale: bool, state_dirs: tuple[Path, ...], force: bool, as_json: bool
) -> None:
    """Remove state directories (their guest memory is freed once no mapper maps it): those
    given, or with --stale every stale one. One a manager holds, or one whose runtime
    directory still names it (a killed manager's memory that a restart adopts), is kept
    unless --force; a directory that is not a membacking state directory never is removed.
    Exit 1 if any given was not removed (with --stale: if a --state-dir given is not a state
    directory)."""
    from ..manager.statelist import STALE, NotStateDir, RemovalRefused, remove, survey

    if stale and paths:
        raise click.UsageError("give state directories to remove or --stale, not both")
    if not stale and not paths:
        raise click.UsageError("give state directories to remove, or --stale for every stale one")
    if state_dirs and not stale:
        raise click.UsageError("--state-dir goes with --stale (give the directory itself)")
    if any(not str(p) or str(p) == "." for p in paths):
        raise click.UsageError("an empty path (or '.') names no state directory: give its path")
    targets = list(paths)
    failed: list[tuple[Path, str]] = []
    if stale:
        # a --state-dir that is no state directory is an error, as with `state list`: the
        # stale ones found are removed all the same
        found, failed = survey(list(state_dirs))
        failed = [(path, f"{why}: not looked at") for path, why in failed]
        targets = [i.path for i in found if i.status == STALE]
    removed = []
    for target in targets:
        try:
            info = remove(target, force=force)
        except NotStateDir as exc:
            failed.append((target, f"{exc}: not removed"))
            continue
        except RemovalRefused as exc:
            failed.append((target, str(exc)))
            continue
        removed.append(info)
        if not as_json:
            click.echo(
                f"removed {info.path} ({info.status}, "
                f"{info.runtime_dir or 'runtime directory unknown'}): "
                f"{format_size(info.memory_used)} of RAM, freed once no process maps it"
            )
    if as_json:
        echo_json(
            {
                "removed": [i.as_json() for i in removed],
                "refused": [{"path": str(p), "reason": r} for p, r in failed],
            }
        )
    elif stale and not targets:
        click.echo("no stale state directories")
    elif len(removed) > 1:
        total = format_size(sum(i.memory_used for i in removed))
        click.echo(
            f"{len(removed)} state directories removed: {total} of RAM, freed once no process "
            "maps it"
        )
    for _, reason in failed:
        click.echo(f"Error: {reason}", err=True)
    if failed:
        raise SystemExit(1)
