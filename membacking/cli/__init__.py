"""The `membacking` command line: run the manager, attach mappers, inspect and change the daemon.

Exit status: 2 for a mistake in what was given, found before the daemon is asked (an unknown
option, a malformed or out-of-range value, a size or address that is not a page multiple, a bad
or missing `--config` file), 1 for what the daemon or the system refuses (no daemon, unknown
region, overlap); either way one line on stderr, never a traceback. docs/CLI.md states the rule.
Each group of commands lives in its own module.
"""

from __future__ import annotations

import importlib
import sys

import click

from .common import Group

#: each command: the module that defines it and its name there, imported when the command is
#: run or listed, so that a command does not load what only the others need (the daemon, the
#: conformance checker, QEMU's launcher)
_COMMANDS = {
    "manager": ("manager_cmd", "manager"),
    "mapper": ("mapper_cmd", "mapper"),
    "regions": ("inspect_cmd", "regions_cmd"),
    "mappers": ("inspect_cmd", "mappers_cmd"),
    "stats": ("inspect_cmd", "stats_cmd"),
    "status": ("status_cmd", "status_cmd"),
    "region": ("region_cmd", "region"),
    "mem": ("mem_cmd", "mem"),
    "map": ("map_cmd", "map_cmd"),
    "watch": ("watch_cmd", "watch_cmd"),
    "bench": ("bench_cmd", "bench_cmd"),
    "conformance": ("conformance_cmd", "conformance_cmd"),
    "qemu": ("qemu_cmd", "qemu"),
}


class _Commands(Group):
    """The top-level group: its commands are loaded when first asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in _COMMANDS:
            module, name = _COMMANDS[cmd_name]
            command = getattr(importlib.import_module(f".{module}", __name__), name)
            if cmd_name == "manager":
                from .state_cmd import state

                command.add_command(state)
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0] not in _COMMANDS:  # a mistake: click suggests from those loaded
            for name in _COMMANDS:
                self.get_command(ctx, name)
        return super().resolve_command(ctx, args)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="membacking")
def cli() -> None:
    """One shared guest-physical address space for many processes."""


def main() -> None:
    try:
        code = cli.main(prog_name="membacking", standalone_mode=False)
    except click.MissingParameter as exc:  # a usage mistake: keep click's usage hint
        exc.show()
        sys.exit(exc.exit_code)
    except click.BadParameter as exc:  # a bad value (size, name, spec): one line, status 2
        click.echo(f"Error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:  # usage mistakes keep click's usage hint
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("Aborted.", err=True)
        _interrupted_change()
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def _interrupted_change() -> None:
    """Say that a change sent to the manager goes on there, when its wait was interrupted."""
    from ..control_client import READ_ONLY_OPS, ControlClient, where_to_look

    op = ControlClient.unanswered
    if op is not None and op not in READ_ONLY_OPS:
        where = where_to_look(op)
        click.echo(
            f"the manager goes on with the {op} already sent{f': {where}' if where else ''}",
            err=True,
        )
