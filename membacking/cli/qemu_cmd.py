"""`membacking qemu run|migrate`: a QEMU VM on the manager's regions, and its migration."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from .. import units
from ..qemu.launcher import VmOptions, qmp_path, run_vm
from ..qemu.migration import migrate
from ..qemu.qmp import Qmp
from .common import SECONDS, Group, runtime_dir_option


def _vm_name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        units.check_name(f"qemu-{value}")  # the launcher's mapper name
        return units.check_name(value)
    except ValueError:
        raise click.BadParameter(
            f"invalid name {value!r}: use 1 to 59 letters, digits, '_', '-' or '.'", ctx, param
        ) from None


@click.group(cls=Group)
def qemu() -> None:
    """Run QEMU with its guest RAM backed by the manager's regions."""


class _AfterDashes(click.Command):
    """`qemu run`: QEMU's arguments come only after `--`. Before it, anything that is not one
    of the command's own options is a usage mistake (status 2): click would read `-nographic`
    as a cluster holding `-h` and print the help, or pass `-S`, `-kernel` on to QEMU unseen."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not ctx.resilient_parsing:  # shell completion parses half-typed lines
            _refuse_before_dashes(self, ctx, args)
        return super().parse_args(ctx, args)

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        return [self.options_metavar or "[OPTIONS]", "--", "[QEMU_ARGS]..."]


def _refuse_before_dashes(command: click.Command, ctx: click.Context, args: list[str]) -> None:
    takes_value = {
        name: not (param.is_flag or param.count)
        for param in command.get_params(ctx)
        if isinstance(param, click.Option)
        for name in (*param.opts, *param.secondary_opts)
    }
    i = 0
    while i < len(args) and args[i] != "--":
        name, equals, _ = args[i].partition("=") if args[i].startswith("--") else (args[i], "", "")
        if name not in takes_value:
            raise click.UsageError(
                f"{args[i]!r} is not an option of qemu run: QEMU's arguments go after -- "
                f"(membacking qemu run [OPTIONS] -- {args[i]} ...)",
                ctx,
            )
        i += 2 if takes_value[name] and not equals else 1


@qemu.command(
    "run",
    cls=_AfterDashes,
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@runtime_dir_option
@click.option("--name", default="vm", show_default=True, callback=_vm_name, help="The VM's name.")
@click.option("--qemu", "binary", default=None, help="QEMU binary [default: qemu-system-x86_64].")
@click.option(
    "--region",
    "regions",
    multiple=True,
    help="Lend only this region (repeatable) [default: every active region].",
)
@click.option(
    "--accel",
    type=click.Choice(["auto", "kvm", "tcg", "none"]),
    default="auto",
    show_default=True,
    help="auto: KVM where /dev/kvm is usable, else TCG; none: leave it to QEMU-ARGS.",
)
@click.option("--incoming", default=None, help="Wait for a migration on this QEMU URI.")
@click.option(
    "--machine-opt", "machine_opts", multiple=True, help="KEY=VALUE for -machine (repeatable)."
)
@click.argument("qemu_args", nargs=-1, type=click.UNPROCESSED)
def qemu_run(
    runtime_dir: Path | None,
    name: str,
    binary: str | None,
    regions: tuple[str, ...],
    accel: str,
    incoming: str | None,
    machine_opts: tuple[str, ...],
    qemu_args: tuple[str, ...],
) -> None:
    """Start QEMU on the regions: the region at GPA 0 is its boot RAM, regions at or above
    4 GiB are pc-dimm devices. Regions lent stay pinned until QEMU exits. The QMP monitor
    listens on RUNTIME-DIR/qemu-NAME.qmp. QEMU's own arguments go after --."""
    options = VmOptions(
        name,
        runtime_dir,
        binary,
        regions,
        accel,
        incoming,
        machine_opts,
        tuple(a for a in qemu_args),
    )
    code = run_vm(options, lambda text: click.echo(f"membacking: {text}", err=True))
    sys.exit(code)


@qemu.command("migrate")
@runtime_dir_option
@click.argument("name")
@click.argument("uri")
@click.option("--timeout", type=SECONDS, default=300.0, show_default=True, help="Seconds to wait.")
@click.option(
    "--quit",
    "quit_after",
    is_flag=True,
    help="Stop the source VM once the destination has loaded it.",
)
def qemu_migrate(
    runtime_dir: Path | None, name: str, uri: str, timeout: float, quit_after: bool
) -> None:
    """Migrate VM NAME to URI (e.g. tcp:HOST:PORT, where a `qemu run --incoming` waits)."""
    deadline = time.monotonic() + timeout
    path = qmp_path(runtime_dir, name)
    if not path.exists():
        raise click.ClickException(f"no VM named {name!r} here ({path} does not exist)")
    with Qmp(path, timeout=timeout) as qmp:
        outcome = migrate(qmp, uri, deadline, timeout, confirm=quit_after)
        info = outcome.info
        ram = info.get("ram", {})
        click.echo(
            f"migrated {name} to {uri}: {ram.get('transferred', 0)} bytes in "
            f"{info.get('total-time', 0)} ms (downtime {info.get('downtime', 0)} ms)"
        )
        if quit_after and not outcome.confirmed:
            raise click.ClickException(
                f"not stopping the source VM {name}: whether the destination loaded the "
                f"migration cannot be known ({outcome.unconfirmed}); the source stays paused: "
                "check the destination, then `quit` or `cont` on the source's monitor"
            )
        if quit_after:
            qmp.execute("quit")
            click.echo(f"stopped the source VM {name} (the destination loaded it)")
