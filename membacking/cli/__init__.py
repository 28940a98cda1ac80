"""The `membacking` command line: run the manager, attach mappers, inspect and change the daemon.

Exit status: 2 for a mistake in what was given, found before the daemon is asked (an unknown
option, a malformed or out-of-range value, a size or address that is not a page multiple, a bad
or missing `--config` file), 1 for what the daemon or the system refuses (no daemon, unknown
region, overlap); either way one line on stderr, never a traceback. docs/CLI.md states the rule.
Each group of commands lives in its own module.
"""

from __future__ import annotations

import sys

import click

from .bench_cmd import bench_cmd
from .common import Group
from .conformance_cmd import conformance_cmd
from .inspect_cmd import mappers_cmd, regions_cmd, stats_cmd
from .manager_cmd import manager
from .map_cmd import map_cmd
from .mapper_cmd import mapper
from .mem_cmd import mem
from .qemu_cmd import qemu
from .region_cmd import region
from .state_cmd import state
from .status_cmd import status_cmd
from .watch_cmd import watch_cmd


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="membacking")
def cli() -> None:
    """One shared guest-physical address space for many processes."""


for command in (
    manager,
    mapper,
    regions_cmd,
    mappers_cmd,
    stats_cmd,
    status_cmd,
    region,
    mem,
    map_cmd,
    watch_cmd,
    bench_cmd,
    conformance_cmd,
    qemu,
):
    cli.add_command(command)
manager.add_command(state)


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
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
