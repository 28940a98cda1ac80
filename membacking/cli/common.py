"""Shared pieces of the command line: the error-mapping group, size parameters, options, tables.

Every command module imports from here; nothing here talks to the manager.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from .. import units
from ..errors import MembackingError

F = TypeVar("F", bound=Callable[..., Any])


class Group(click.Group):
    """A group that turns membacking's operator-facing errors into one clean line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MembackingError as exc:
            raise click.ClickException(str(exc)) from None


class _Size(click.ParamType[int]):
    name = "size"

    def __init__(self, what: str = "size") -> None:
        self.what = what

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return units.parse_size(str(value), self.what)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


SIZE = _Size()
ADDRESS = _Size("address")


def spec_callback(
    parser: Callable[[str], Any],
) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def callback(ctx: click.Context, param: click.Parameter, values: Any) -> Any:
        try:
            return [parser(v) for v in values]
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx, param) from None

    return callback


def runtime_dir_option(fn: F) -> F:
    decorated: F = click.option(
        "--runtime-dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="MEMBACKING_RUNTIME_DIR",
        default=None,
        help="Runtime directory of the manager [env MEMBACKING_RUNTIME_DIR; default "
        "$XDG_RUNTIME_DIR/membacking, else /tmp/membacking-<uid>].",
    )(fn)
    return decorated


def json_option(fn: F) -> F:
    decorated: F = click.option(
        "--json", "as_json", is_flag=True, help="Print JSON instead of a table."
    )(fn)
    return decorated


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    click.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


#: Long work advances in steps of this many bytes, with a progress bar on a terminal.
PROGRESS_STEP = 64 << 20


def progress(total: int, label: str) -> Any:
    """A progress bar on stderr for work of `total` bytes (shown only on a terminal and only
    for work of more than one step)."""
    show = sys.stderr.isatty() and total > PROGRESS_STEP
    return click.progressbar(length=total, label=label, file=sys.stderr, hidden=not show)
