"""Write docs/CLI.md from the click command tree, so the reference always matches the code.

python scripts/gen_cli_doc.py          # rewrite docs/CLI.md
python scripts/gen_cli_doc.py --check  # exit 1 if docs/CLI.md is out of date
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from membacking.cli import cli

DOC = Path(__file__).resolve().parent.parent / "docs" / "CLI.md"
HEADER = """# CLI reference

Generated from the code by `python scripts/gen_cli_doc.py`; a test fails when it is out of date.

Every command that talks to a daemon takes `--runtime-dir` and `--config`. The runtime directory is,
first match wins: `--runtime-dir`, `$MEMBACKING_RUNTIME_DIR`, the `runtime_dir` of the
configuration file given by `--config` (or `$MEMBACKING_CONFIG`), `$XDG_RUNTIME_DIR/membacking`,
`/tmp/membacking-<uid>`; `manager run` follows the same rule. Client commands take `--timeout`
(seconds to wait for the manager). Sizes and addresses accept decimal, `0x` hex and K/M/G/T
suffixes, powers of 1024 however spelled (`64M`, `64MiB`, `64MB` and `64Mi` alike; after a hex
number a `B` is a hex digit). `-h` is short for `--help` everywhere.

Exit status: 2 for a mistake in what was given, found before the daemon is asked anything: an
unknown option; a missing or malformed value (size, address, name, choice, a number out of its
range, a negative number: `mem read -1 4` says the address must not be negative, as an argument is
not taken for an option); a value the command line can check alone (a region's or a change's size
that is 0 or not a multiple of 4096, an address or offset that is not a multiple of 4096, a runtime
directory too long for its sockets' paths: 107 bytes, whether from `--runtime-dir`,
`$MEMBACKING_RUNTIME_DIR` or the configuration file); a `--config` file that is missing,
unreadable, not TOML or has a bad key or value (the same mistake typed as an option exits 2 too);
QEMU's arguments given to `qemu run` before its `--`. 1
for what the daemon or the system refuses: no daemon, an unknown region, overlapping regions, a
size only the daemon can judge (beyond the address space, not a multiple of the huge page), a
timeout, initial regions that cannot be created, a `region unmap` of a range that is a hole already
(nothing changes), a VM layout `qemu run` refuses (its QEMU arguments included: QEMU.md). 0
otherwise. Either way the error is one line on stderr (`Error: ...`; `manager run` with
`--log-format json` writes it as one more JSON record instead, with `"fatal": true` and its
`exit_code`); for a usage mistake (an unknown option, a missing argument, options that do not go
together) click's usage line and a pointer to `--help` come before it.

Shell completion is click's: `eval "$(_MEMBACKING_COMPLETE=bash_source membacking)"` in `~/.bashrc`
(`zsh_source` in `~/.zshrc`, `fish_source` for fish); region names complete from the running daemon.
"""


def _walk(command: click.Command, path: list[str]) -> list[tuple[list[str], click.Command]]:
    out = [(path, command)]
    if isinstance(command, click.Group):
        ctx = click.Context(command)  # the group's listing: its commands load when asked for
        for name in sorted(command.list_commands(ctx)):
            sub = command.get_command(ctx, name)
            assert sub is not None, name
            out.extend(_walk(sub, [*path, name]))
    return out


def render() -> str:
    parts = [HEADER]
    for path, command in _walk(cli, ["membacking"]):
        if isinstance(command, click.Group) and len(path) > 1:
            continue
        ctx = click.Context(
            command,
            info_name=" ".join(path),
            terminal_width=100,
            help_option_names=["-h", "--help"],
        )
        title = " ".join(path)
        parts.append(f"\n## `{title}`\n\n```\n{command.get_help(ctx)}\n```\n")
    return "".join(parts)


def main() -> int:
    text = render()
    if "--check" in sys.argv[1:]:
        if not DOC.exists() or DOC.read_text() != text:
            print(f"{DOC} is out of date: run python scripts/gen_cli_doc.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
