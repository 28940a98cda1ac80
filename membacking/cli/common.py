"""Shared pieces of the command line: the error-mapping group, size parameters, options, tables.

Every command module imports from here; nothing here talks to the manager.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import click

from .. import units
from ..control_client import ControlClient
from ..errors import MembackingError
from ..runtime import CONFIG_ENV_VAR, choose_runtime_dir

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


RUNTIME_DIR_HELP = (
    "Runtime directory of the manager. First match wins: this option, $MEMBACKING_RUNTIME_DIR, "
    "the configuration file's runtime_dir, $XDG_RUNTIME_DIR/membacking, /tmp/membacking-<uid>."
)


def runtime_dir_param(fn: F) -> F:
    """The bare --runtime-dir option (its value is resolved by `runtime.choose_runtime_dir`)."""
    decorated: F = click.option(
        "--runtime-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help=RUNTIME_DIR_HELP,
    )(fn)
    return decorated


def config_param(help: str) -> Callable[[F], F]:
    """--config FILE (or $MEMBACKING_CONFIG): the daemon's TOML configuration file."""
    return click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar=CONFIG_ENV_VAR,
        default=None,
        help=help + " [env MEMBACKING_CONFIG]",
    )


def client_runtime_dir(option: Path | None, config_path: Path | None) -> Path:
    """The runtime directory a client command talks to: the same rule as the daemon's."""
    from ..manager.config import load_config

    from_config = load_config(config_path).get("runtime_dir") if config_path else None
    return choose_runtime_dir(option, from_config)[0]


def runtime_dir_option(fn: F) -> F:
    """--runtime-dir and --config, passed on to the command as one `runtime_dir` Path."""

    @functools.wraps(fn)
    def wrapper(*args: Any, config_path: Path | None, **kwargs: Any) -> Any:
        kwargs["runtime_dir"] = client_runtime_dir(kwargs.get("runtime_dir"), config_path)
        return fn(*args, **kwargs)

    decorated = config_param(
        "The daemon's configuration file: use its runtime_dir (see --runtime-dir)."
    )(wrapper)
    return runtime_dir_param(cast(F, decorated))


def timeout_option(shown: str = "10, or 120 for changes") -> Callable[[F], F]:
    """--timeout SECONDS: how long a client command waits for the manager (None: the
    command's own default, described by `shown`)."""
    return click.option(
        "--timeout",
        type=click.FloatRange(min=0.1),
        default=None,
        help=f"Seconds to wait for the manager's answer [default: {shown}].",
    )


def control_client(runtime_dir: Path, timeout: float | None) -> ControlClient:
    """A control client that waits `timeout` seconds for any answer (default: 10 s for
    questions, longer for changes that wait on every mapper)."""
    if timeout is None:
        return ControlClient(runtime_dir)
    return ControlClient(runtime_dir, timeout=timeout, long_timeout=timeout)


def json_option(fn: F) -> F:
    decorated: F = click.option(
        "--json", "as_json", is_flag=True, help="Print JSON instead of text."
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
