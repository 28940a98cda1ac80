"""`membacking status`: whether a manager serves here, which one, and whether it is well."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .. import units
from .common import control_client, echo_json, json_option, runtime_dir_option, timeout_option


@click.command("status")
@runtime_dir_option
@timeout_option()
@json_option
def status_cmd(runtime_dir: Path, timeout: float | None, as_json: bool) -> None:
    """Show the serving manager: pid, version, uptime, runtime directory, state directory
    (and whether a clean stop keeps it), counts, resources, limits (and where each was set),
    --evict-kill, the metrics URL and health (exit 0 while it answers, even degraded; 1 if no
    manager answers)."""
    client = control_client(runtime_dir, timeout)
    status = client.status()
    status["runtime_dir"] = str(client.paths.root)
    if as_json:
        echo_json(status)
        return
    limit = status["max_fds"]
    rows = [
        ("pid", str(status["pid"])),
        ("version", _version_text(status)),
        ("uptime", units.format_duration(status["uptime"])),
        ("runtime dir", status["runtime_dir"]),
        ("state", _state_text(status)),
        ("regions", str(status["regions"])),
        *(
            [("address space", units.format_size(space))]
            if (space := status.get("address_space"))
            else []
        ),
        ("mappers", str(status["mappers"])),
        ("open fds", f"{status['open_fds']} of {limit if limit else 'unlimited'}"),
        ("memory", f"{units.format_size(status['rss_bytes'])} resident"),
        ("mappings", f"{status['vmas']} VMAs"),
        ("unmap timeout", units.format_duration(status["unmap_timeout"])),
        *_settings_rows(status),
    ]
    awaited = status.get("awaited") or []  # mappers of the manager before, not back yet
    if awaited:
        pids = ", ".join(str(a["pid"]) for a in awaited)
        left = units.format_duration(awaited[0]["seconds_left"])
        deferred = status.get("deferred", 0)
        rows.append(("awaited back", f"pids {pids} (at most {left} more; {deferred} changes wait)"))
    if status.get("not_back"):  # their wait ran out; they may still map removed memory
        rows.append(("not back", "pids " + ", ".join(map(str, status["not_back"]))))
    for vm in status.get("vms") or ():  # regions lent to a running VM: kept from change
        since = "; pinned before a restart" if vm.get("journaled") else ""
        rows.append(("VM", f"{vm['label']} (pid {vm['pid']}) on {', '.join(vm['regions'])}{since}"))
    click.echo(f"membacking manager: {status['health']}")
    for problem in status["problems"]:
        click.echo(f"  ! {problem}")
    for key, value in rows:
        click.echo(f"  {key:<14}{value}")


def _version_text(status: dict[str, Any]) -> str:
    """The package version, and the versions of what the daemon speaks and writes (a manager
    of an earlier release does not say them)."""
    versions = status.get("versions")
    if not isinstance(versions, dict):
        return str(status["version"])
    return (
        f"{status['version']} (protocol {versions.get('protocol')}, features "
        f"{versions.get('features', 0):#x}, handover {versions.get('handover')}, journal "
        f"{versions.get('journal')})"
    )


def _state_text(status: dict[str, Any]) -> str:
    """Where guest memory outlives the daemon, and what a clean stop does with it (a manager
    of an earlier release does not say: `unknown`)."""
    if "state_dir" not in status:
        return "unknown (the manager does not say)"
    where = status["state_dir"] or "none (--no-state)"
    if status.get("fd_store"):
        where += ", and systemd's fd store"
    stop = "kept at a clean stop" if status.get("keep_state") else "ended at a clean stop"
    return f"{where}; {stop}" if status["state_dir"] or status.get("fd_store") else where


#: the prealloc row, off and on (`manager run --prealloc`)
_PREALLOC = (
    "off: RAM is allocated as it is first touched",
    "on: each RAM region's memory is allocated when it is made",
)

#: the status rows of the limits: (label, key, what is counted)
_LIMIT_ROWS = (
    ("max mappers", "max_mappers", ""),
    ("max regions", "max_regions", ""),
    ("max fds", "max_fds_per_mapper", " per mapper"),
)


def _settings_rows(status: dict[str, Any]) -> list[tuple[str, str]]:
    """The limits (and where each was set), --evict-kill, --prealloc and the metrics URL (a
    manager of an earlier release does not say: no rows)."""
    rows = []
    limits, origins = status.get("limits") or {}, status.get("limit_origins") or {}
    for label, key, unit in _LIMIT_ROWS:
        if key in limits:
            origin = f" ({origins[key]})" if key in origins else ""
            rows.append((label, f"{limits[key]}{unit}{origin}"))
    if "evict_kill" in status:
        kill = "on: a mapper evicted for not answering is also killed"
        rows.append(("evict kill", kill if status["evict_kill"] else "off"))
    if "prealloc" in status:
        rows.append(("prealloc", _PREALLOC[bool(status["prealloc"])]))
    if "metrics" in status:
        rows.append(("metrics", status["metrics"] or "not served"))
    return rows
