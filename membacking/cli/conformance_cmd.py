"""`membacking conformance -- COMMAND...`: check a mapper of your own against docs/PROTOCOL.md
with a scripted manager; prints each case passed and each clause violated."""

from __future__ import annotations

import sys

import click

from ..conformance import CLAUSES, run
from .common import Decimal


@click.command("conformance", context_settings={"ignore_unknown_options": True})
@click.option(
    "--timeout",
    type=Decimal("seconds", "SECONDS", min=0.5, max=120),
    default=5.0,
    show_default=True,
    help="Seconds to wait for each answer of the mapper.",
)
@click.option("--clauses", "list_clauses", is_flag=True, help="List the clauses checked and exit.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def conformance_cmd(timeout: float, list_clauses: bool, command: tuple[str, ...]) -> None:
    """Check the mapper that COMMAND starts against the protocol specification.

    COMMAND runs with $MEMBACKING_RUNTIME_DIR (and any `{runtime_dir}` in its arguments) set to
    a private runtime directory served by a scripted manager. It must speak the conformance
    driver protocol of docs/PROTOCOL.md on stdin/stdout. Exit status 1 if a clause is violated.
    """
    if list_clauses:
        for clause, text in CLAUSES.items():
            click.echo(f"{clause:15} {text}")
        return
    if not command:
        raise click.UsageError("give the command that starts the mapper, after --")
    try:
        report = run(command, timeout)
    except OSError as exc:  # the command cannot be started: a mistake in what was given
        raise click.ClickException(f"cannot start {command[0]}: {exc.strerror or exc}") from None
    for case in report.passed:
        click.echo(f"pass  {case}")
    for violation in report.violations:
        click.echo(f"FAIL  {violation.clause}: {violation.detail}")
    if not report.ok:
        tail = "".join(report.stderr)[-2000:]
        if tail.strip():
            click.echo(f"--- the mapper's stderr (end) ---\n{tail}", err=True)
        sys.exit(1)
    click.echo(f"conforms: {len(report.passed)} cases, {len(CLAUSES)} clauses")
