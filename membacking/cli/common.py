"""Shared pieces of the command line: the error-mapping group, size parameters, options, tables.

Every command module imports from here; nothing here talks to the manager.
"""

from __future__ import annotations

import functools
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import click

from .. import units
from ..control_client import ControlClient
from ..errors import MembackingError
from ..manager.config import ConfigError
from ..runtime import CONFIG_ENV_VAR, MAX_SOCKET_PATH, RuntimePaths, choose_runtime_dir

F = TypeVar("F", bound=Callable[..., Any])


class Group(click.Group):
    """A group that turns membacking's operator-facing errors into one clean line: a mistake
    in the configuration file named on the command line is a usage mistake (status 2), like
    the same mistake typed as an option; anything else refused is status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            raise UsageMistake(str(exc)) from None
        except MembackingError as exc:
            raise click.ClickException(str(exc)) from None


#: what a negative number typed for an argument looks like to click: an option (`-1`, `-0x10`)
_NEGATIVE = re.compile(r"-[0-9]")


class NumericArgs(click.Command):
    """A command with numeric arguments (addresses, sizes, ids). Click reads `-1` or `-0x10`
    typed for one as an unknown option ("No such option: -1"); here it is that argument's value,
    which its type refuses as negative (status 2). An unknown option typed before any such
    number keeps click's error (one after it is taken as an argument: still status 2)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, list(args))
        except click.NoSuchOption as exc:
            if not _NEGATIVE.match(exc.option_name):
                raise
        # the first unknown "option" is a negative number: parse again with unknown options
        # kept as arguments, in their places (click's parser stopped before taking any value)
        ignoring = ctx.ignore_unknown_options
        ctx.ignore_unknown_options = True
        try:
            return super().parse_args(ctx, list(args))
        finally:
            ctx.ignore_unknown_options = ignoring


class UsageMistake(click.ClickException):
    """A mistake in what the operator gave (a value, a configuration file): one line, status 2."""

    exit_code = 2


class _Size(click.ParamType[int]):
    name = "size"

    def __init__(self, what: str = "size", page: bool = False, nonzero: bool = False) -> None:
        self.what = what
        self.page = page
        self.nonzero = nonzero

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            number = value if isinstance(value, int) else units.parse_size(str(value), self.what)
            if self.page:
                units.check_pages(number, self.what, self.nonzero)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return number


SIZE = _Size()
ADDRESS = _Size("address")
#: a region's size or a change's size: a non-zero multiple of the page
PAGE_SIZE = _Size("size", page=True, nonzero=True)
#: a region's guest address or an offset in it: a multiple of the page
PAGE_ADDRESS = _Size("address", page=True)
PAGE_OFFSET = _Size("offset", page=True)
FILE_OFFSET = _Size("file offset", page=True)
#: `mem fill`'s BYTE (the command checks that it is 0-255)
BYTE = _Size("byte")


def _expected(noun: str, low: float | None, high: float | None) -> str:
    """`a whole number from 0 to 255`, `a number of at least 0.1`: what a bounded option takes."""
    if low is not None and high is not None:
        return f"{noun} from {low:g} to {high:g}"
    if low is not None:
        return f"{noun} of at least {low:g}"
    return f"{noun} of at most {high:g}" if high is not None else noun


class Whole(click.IntRange):
    """A whole number in a range whose errors say what it is and what is expected:
    `mapper id must be a whole number of at least 1, got 'abc'`."""

    def __init__(
        self, what: str, metavar: str = "N", min: int | None = None, max: int | None = None
    ) -> None:
        super().__init__(min=min, max=max)
        self.what, self.metavar = what, metavar

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str:
        return self.metavar

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            number: int = super().convert(value, param, ctx)
        except click.BadParameter:
            expected = _expected("a whole number", self.min, self.max)
            self.fail(f"{self.what} must be {expected}, got {value!r}", param, ctx)
        return number


class Decimal(click.FloatRange):
    """A finite number in a range whose errors say what it is and what is expected:
    `seconds must be a number of at least 0.1, got 'abc'`."""

    def __init__(
        self, what: str, metavar: str, min: float | None = None, max: float | None = None
    ) -> None:
        super().__init__(min=min, max=max)
        self.what, self.metavar = what, metavar

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str:
        return self.metavar

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        try:
            number: float = super().convert(value, param, ctx)
            if not math.isfinite(number):
                raise click.BadParameter("not finite")
        except click.BadParameter:
            expected = _expected("a number", self.min, self.max)
            self.fail(f"{self.what} must be {expected}, got {value!r}", param, ctx)
        return number


#: seconds to wait for the manager (the same bound as the configuration's timeouts)
SECONDS = Decimal("seconds", "SECONDS", min=0.1)


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
        type=click.Path(file_okay=False, readable=False, path_type=Path),  # (0711 suffices)
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


def _choose(option: Path | None, config_path: Path | None) -> tuple[Path, str]:
    """The runtime directory and where it came from (`runtime.choose_runtime_dir`)."""
    from ..manager.config import load_config

    from_config = load_config(config_path).get("runtime_dir") if config_path else None
    return choose_runtime_dir(option, from_config)


def client_runtime_dir(option: Path | None, config_path: Path | None) -> Path:
    """The runtime directory a client command talks to: the same rule as the daemon's."""
    return _choose(option, config_path)[0]


#: where `choose_runtime_dir` found a runtime directory, as an error names it
_FOUND_IN = {
    "$XDG_RUNTIME_DIR": "$XDG_RUNTIME_DIR/membacking",
    "default": "the default runtime directory",
}


def checked_runtime_dir(chosen: tuple[Path, str], config_path: Path | None) -> Path:
    """The runtime directory `runtime.choose_runtime_dir` chose (directory, where from), if its
    sockets' paths fit in a Unix socket path; else a usage mistake (status 2) that names where
    the directory came from (--runtime-dir, $MEMBACKING_RUNTIME_DIR, the config file) and the
    limit, before anything is tried on it."""
    path, source = chosen
    paths = RuntimePaths.resolve(path)  # (absolute: the length the kernel sees)
    over = paths.too_long()
    if over is None:
        return path
    longest, size = over
    path = paths.root  # named as measured
    where = f"{_FOUND_IN.get(source, source)} {path}"
    if source == "configuration file":
        where = f"runtime_dir {path} in {config_path}"
    raise UsageMistake(
        f"{where} is too long: its socket {longest.name} would have a path of {size} "
        f"bytes, over the limit of {MAX_SOCKET_PATH} bytes for a Unix socket path; choose a "
        "shorter directory"
    )


def runtime_dir_option(fn: F) -> F:
    """--runtime-dir and --config, passed on to the command as one `runtime_dir` Path (one
    too long for its sockets is a usage mistake: `checked_runtime_dir`)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, config_path: Path | None, **kwargs: Any) -> Any:
        chosen = _choose(kwargs.get("runtime_dir"), config_path)
        kwargs["runtime_dir"] = checked_runtime_dir(chosen, config_path)
        return fn(*args, **kwargs)

    decorated = config_param(
        "The daemon's configuration file: use its runtime_dir (see --runtime-dir)."
    )(wrapper)
    return runtime_dir_param(cast(F, decorated))


def timeout_option(shown: str = "10") -> Callable[[F], F]:
    """--timeout SECONDS: how long a client command waits for the manager (None: the
    command's own default, described by `shown`: 10 for a question, 120 for a change that may
    wait on every mapper)."""
    return click.option(
        "--timeout",
        type=SECONDS,
        default=None,
        help=f"Seconds to wait for the manager's answer [default: {shown}].",
    )


def control_client(runtime_dir: Path, timeout: float | None) -> ControlClient:
    """A control client that waits `timeout` seconds for any answer (default: 10 s for
    questions, longer for changes that wait on every mapper)."""
    if timeout is None:
        client = ControlClient(runtime_dir)
    else:
        client = ControlClient(runtime_dir, timeout=timeout, long_timeout=timeout)
    client.on_unjournaled = _warn_unjournaled
    return client


def _warn_unjournaled(op: str, reason: str) -> None:
    if op == "stop":  # (a stop ends the state, or leaves the journal as it stands: said there)
        return
    click.echo(
        f"warning: done, but not journaled ({reason}): a crash of the manager before it can "
        "journal again would lose this change",
        err=True,
    )


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
