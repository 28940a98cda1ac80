"""`membacking manager run`: the daemon in the foreground; `manager stop`: ask it to stop."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from .. import units
from ..errors import MembackingError
from ..manager.config import MIN_UNMAP_TIMEOUT
from ..manager.model import LIMIT_FLAGS
from ..manager.state import Limits
from .common import (
    SIZE,
    Decimal,
    Group,
    Whole,
    checked_runtime_dir,
    config_param,
    control_client,
    echo_json,
    json_option,
    runtime_dir_option,
    runtime_dir_param,
    spec_callback,
    timeout_option,
)


def _check_address_space(value: int | None) -> int | None:
    if value is None:
        return None
    try:
        return units.check_address_space(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _check_ids(ctx: click.Context, param: click.Parameter, values: Any) -> Any:
    from ..manager.config import check_id

    try:
        return tuple(check_id(v) for v in values)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


@click.group(cls=Group)
def manager() -> None:
    """Run the manager daemon, stop it, and list or remove the state it keeps."""


#: options whose value, typed on the command line, also sets aside the config file's value of
#: these others (the two cannot go together)
_RIVALS = {
    "no_state": ("state_dir",),
    "state_dir": ("no_state",),
    "no_metrics": ("metrics_port",),
}


def _typed(ctx: click.Context, key: str) -> bool:
    """Whether option `key` was given on the command line (not a default, nor the environment)."""
    return ctx.get_parameter_source(key) not in (
        None,
        ParameterSource.DEFAULT,
        ParameterSource.ENVIRONMENT,
    )


def _limit_origins(
    typed: set[str], from_file: dict[str, Any], config_path: Path | None
) -> dict[str, str]:
    """Where each limit set comes from, for the messages that name it: its option typed, or
    its key in the configuration file (a limit in neither is its default)."""
    origins = {key: flag for key, flag in LIMIT_FLAGS.items() if key in typed}
    for key in LIMIT_FLAGS:
        if key not in origins and key in from_file:
            origins[key] = f"limits.{key} in {config_path}"
    return origins


@manager.command("run")
@runtime_dir_param
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
    type=Decimal("seconds", "SECONDS", min=MIN_UNMAP_TIMEOUT),
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
    "--prealloc/--no-prealloc",
    default=False,
    show_default=True,
    help="Allocate each RAM region's memory when it is created (fallocate): a region there is "
    "no room for is refused then, and no first touch can find the state directory's file "
    "system full (which kills the process making it with SIGBUS). The memory is used at once.",
)
@click.option(
    "--max-mappers",
    type=Whole("limit", min=1),
    default=Limits.max_mappers,
    show_default=True,
    help="Refuse mappers beyond this many.",
)
@click.option(
    "--max-regions",
    type=Whole("limit", min=1),
    default=Limits.max_regions,
    show_default=True,
    help="Refuse regions beyond this many.",
)
@click.option(
    "--max-fds-per-mapper",
    type=Whole("limit", min=1),
    default=Limits.max_fds_per_mapper,
    show_default=True,
    help="Deny a mapper fds beyond this many.",
)
@click.option(
    "--allow-uid",
    "allow_uids",
    type=int,
    multiple=True,
    callback=_check_ids,
    help="Also accept mappers running as this uid (repeatable; default: own uid, root).",
)
@click.option(
    "--allow-gid",
    "allow_gids",
    type=int,
    multiple=True,
    callback=_check_ids,
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
    type=Whole("TCP port", "PORT", min=0, max=65535),
    default=None,
    help="Serve Prometheus metrics on this port (0 picks a free one).",
)
@click.option(
    "--no-metrics",
    is_flag=True,
    help="Serve no metrics (over a metrics_port set in the config file).",
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
    "--keep-state/--no-keep-state",
    default=False,
    help="A clean stop (SIGTERM/SIGINT) keeps the state for the next start instead of "
    "ending guest memory (with --no-state: in systemd's fd store).",
)
@click.option(
    "--fd-store",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    show_default=True,
    help="Keep memfd and hugetlb memory (and, with --no-state, the region journal) in the "
    "systemd service manager's fd store, so it survives a crash of the manager; auto: when "
    "NOTIFY_SOCKET is set (see FileDescriptorStoreMax= in docs/membacking.service).",
)
@click.option(
    "--takeover",
    is_flag=True,
    help="Take over from the manager running on this runtime directory: it journals its "
    "state and exits 0, this one adopts the state (with --no-state: the state and memory it "
    "sends); mappers stay attached (see docs/OPERATIONS.md).",
)
@config_param("TOML file with any of these settings; options given here override it.")
@click.pass_context
def manager_run(ctx: click.Context, /, config_path: Path | None, **options: Any) -> None:
    """Run the manager in the foreground until SIGINT or SIGTERM."""
    from .. import logs
    from ..manager import Daemon, ManagerConfig, RegionSpec
    from ..manager.config import load_config
    from ..manager.errors import Refused
    from ..manager.fdstore import use_fd_store
    from ..manager.persist import PersistConfig
    from ..manager.procinfo import metrics_url
    from ..runtime import choose_runtime_dir

    from_file = load_config(config_path) if config_path is not None else {}
    typed = {key for key in options if _typed(ctx, key)}
    # the command line overrides the file, also where the file sets a rival of an option typed
    # (--state-dir over no_state, ...); the runtime directory follows the one rule every
    # command follows (runtime.choose_runtime_dir)
    overridden = typed | {rival for key in typed for rival in _RIVALS.get(key, ())}
    for key, value in from_file.items():
        if key != "runtime_dir" and key not in overridden:
            options[key] = value

    def spelled(key: str) -> str:  # an option as it was given: on the command line, or in the file
        flag = "--" + key.replace("_", "-")
        return flag if key in typed or config_path is None else f"{key} in {config_path}"

    if options["no_metrics"] and "metrics_port" in typed:
        raise click.UsageError("--no-metrics and --metrics-port cannot go together")
    if options.pop("no_metrics"):
        options["metrics_port"] = None
    elif options["metrics_port"] is None and _typed(ctx, "metrics_addr"):
        raise click.UsageError("--metrics-addr needs --metrics-port (or metrics_port in --config)")
    options["runtime_dir"] = checked_runtime_dir(
        choose_runtime_dir(options["runtime_dir"], from_file.get("runtime_dir")), config_path
    )
    logs.configure(options["log_level"], options["log_format"])
    address_space = options["address_space"]
    names = [spec["name"] if isinstance(spec, dict) else spec[0] for spec in options["regions"]]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:  # (a config file's are checked as it is read)
        raise click.BadParameter(f"region {twice[0]!r} is given twice", param_hint="'--region'")
    config = ManagerConfig(
        runtime_dir=options["runtime_dir"],
        address_space=address_space,
        regions=[
            RegionSpec(**spec) if isinstance(spec, dict) else RegionSpec(*spec)
            for spec in options["regions"]
        ],
        unmap_timeout=options["unmap_timeout"],
        evict_kill=options["evict_kill"],
        prealloc=options["prealloc"],
        allow_uids=frozenset(options["allow_uids"]),
        allow_gids=frozenset(options["allow_gids"]),
        limits=Limits(
            options["max_mappers"],
            options["max_regions"],
            options["max_fds_per_mapper"],
            origins=_limit_origins(typed, from_file, config_path),
        ),
        metrics_port=options["metrics_port"],
        metrics_addr=options["metrics_addr"],
        persist=PersistConfig(
            state_dir=options["state_dir"],
            enabled=not options["no_state"],
            fresh=options["fresh"],
            keep=options["keep_state"],
            fd_store=options["fd_store"],
        ),
        takeover=options["takeover"],
    )
    if options["takeover"] and options["fresh"]:
        raise click.UsageError(
            "--takeover adopts the running manager's state: it cannot go with --fresh"
        )
    if options["no_state"] and options["state_dir"] is not None:
        raise click.UsageError(
            f"{spelled('no_state')} and {spelled('state_dir')} cannot go together"
        )
    if options["state_dir"] is not None:
        from ..runtime import RuntimePaths

        state = os.path.realpath(options["state_dir"])
        runtime = os.path.realpath(RuntimePaths.resolve(options["runtime_dir"]).root)
        if runtime == state or runtime.startswith(state.rstrip("/") + "/"):
            raise click.UsageError(
                f"--state-dir {options['state_dir']} is (or holds) the runtime directory "
                f"{runtime}: a clean stop removes the state directory; choose another one"
            )
    if options["no_state"] and options["keep_state"] and not use_fd_store(options["fd_store"]):
        raise click.UsageError(
            f"{spelled('keep_state')} with {spelled('no_state')} keeps memory in systemd's fd "
            "store only, and there is none here (NOTIFY_SOCKET unset, or --fd-store off)"
        )
    if options["no_state"]:
        from ..manager.statedir import left_behind
        from ..runtime import RuntimePaths

        warning = left_behind(RuntimePaths.resolve(options["runtime_dir"]))
        if warning is not None:
            logging.getLogger("membacking.manager").warning(warning)
    daemon = Daemon(config)
    daemon.exit_after_handover = True  # (_exit_now)

    def ready(d: Daemon) -> None:
        fields: dict[str, Any] = {
            "runtime_dir": str(d.paths.root),
            "pid": os.getpid(),
            "regions": len(d.state.regions),
            "address_space": address_space,
        }
        fields["state_dir"] = str(d.persist.dir.root) if d.persist is not None else None
        if d.persist is not None:
            fields["adopted"] = d.persist.adopted
        if d.handed_over is not None:
            fields["took_over_from"] = d.handed_over["pid"]
        if d.fdstore is not None:
            fields["fd_store"] = "on"
            if d.persist is None:
                fields["adopted"] = d.fdstore.adopted
        if d.metrics_port is not None:
            fields["metrics"] = metrics_url(config.metrics_addr, d.metrics_port)
        click.echo(logs.ready_line(options["log_format"], fields))
        sys.stdout.flush()

    try:
        try:
            daemon.run(on_ready=ready)
        except Refused as exc:
            raise click.ClickException(f"cannot create the initial regions: {exc}") from None
        except MembackingError as exc:
            raise click.ClickException(str(exc)) from None
    except click.ClickException as exc:
        if options["log_format"] != "json":
            raise
        # with JSON logs, the reason it stopped is one more JSON record on stderr
        logging.getLogger("membacking.manager").error(
            exc.format_message(), extra={"fatal": True, "exit_code": exc.exit_code}
        )
        raise _AlreadyLogged(exc.format_message()) from None
    logging.getLogger("membacking.manager").info("membacking manager stopped")
    if daemon.handing_over is not None:
        _exit_now()


def _exit_now() -> None:
    """Exit 0 at once, after what it wrote is flushed: a daemon that handed over has released
    everything its successor needs, and its interpreter's teardown (a collection and the
    freeing of the whole state: 40 to 105 ms of CPU with 1,000 regions and 16 mappers) would
    run on the cores that successor and the mappers registering with it need, in the
    handover's gap."""
    logging.shutdown()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    os._exit(0)


class _AlreadyLogged(click.ClickException):
    """A fatal error already written as a log record: nothing more to print (exit status 1)."""

    def show(self, file: Any = None) -> None:
        pass


@manager.command("stop")
@runtime_dir_option
@timeout_option("10 to answer, 30 more to stop")
@click.option("--no-wait", is_flag=True, help="Return once the manager agreed to stop.")
@click.option(
    "--keep-state/--no-keep-state",
    default=None,
    help="Keep the state (guest memory and the region table) for the next start, or end it, "
    "whatever `manager run --keep-state` said; mappers then stay attached to the next "
    "manager. Default: as the manager was started.",
)
@json_option
def manager_stop(
    runtime_dir: Path, timeout: float | None, no_wait: bool, keep_state: bool | None, as_json: bool
) -> None:
    """Stop the manager as SIGTERM does (mappers are told, sockets removed), and wait until it
    has released its runtime directory."""
    client = control_client(runtime_dir, timeout)
    agreed = client.stop(keep_state)
    pid = agreed["pid"]
    stopped = no_wait
    deadline = time.monotonic() + (timeout if timeout is not None else 30.0)
    while not stopped and time.monotonic() < deadline:
        running = client.paths.manager_running()
        # a lock this user cannot read: the daemon removes its sockets as it releases the lock
        stopped = running is False or (running is None and not client.paths.control_socket.exists())
        if not stopped:
            time.sleep(0.05)
    client.close()
    if not stopped:
        raise click.ClickException(
            f"the manager (pid {pid}) agreed to stop but still holds {client.paths.root}"
        )
    kept = agreed.get("keep_state")  # (None: a manager of an earlier release does not say)
    if as_json:
        out = {"pid": pid, "runtime_dir": str(client.paths.root), "stopped": not no_wait}
        echo_json(out | {"keep_state": kept, "vms": agreed.get("vms") or []})
        return
    verb = "is stopping" if no_wait else "stopped"
    said = {True: "; its state is kept for the next start", False: "; its state ends"}
    tail = said[kept] if isinstance(kept, bool) else ""
    click.echo(f"manager (pid {pid}) at {client.paths.root} {verb}{tail}")
    if kept and agreed.get("not_journaled"):  # the next start adopts the journal as it stands
        click.echo(
            f"warning: its journal could not be brought up to date ({agreed['not_journaled']}):"
            " the next start adopts the state as last journaled",
            err=True,
        )
    for vm in agreed.get("vms") or ():  # guests that run on: say what guards their RAM now
        lent = f"{vm['label']} (pid {vm['pid']}) runs on {', '.join(vm['regions'])}"
        if kept and vm.get("kept", True):
            click.echo(f"note: {lent}: the next manager started on this state pins it again")
        elif kept:  # (its process cannot be told apart from a later one: not journaled)
            click.echo(
                f"warning: {lent}, whose pin is not kept (its process is not known here): "
                "the next manager does not guard its RAM: stop the VM",
                err=True,
            )
        else:
            click.echo(
                f"warning: {lent}, which no manager serves or guards now: stop the VM",
                err=True,
            )
