"""`attach()`: connect this process to a manager as a mapper and return its `GuestMemory`."""

from __future__ import annotations

import os

from .. import units
from ..errors import ArgumentTypeError, ArgumentValueError
from ..runtime import RuntimePaths
from .core import VaMapper
from .link import ManagerLink
from .memory import GuestMemory


def attach(
    runtime_dir: str | os.PathLike[str] | None = None,
    name: str | None = None,
    *,
    eager: bool = False,
    timeout: float = 10.0,
    fault_timeout: float = 30.0,
    reconnect_timeout: float = 30.0,
    fresh_start: str = "raise",
) -> GuestMemory:
    """Attach this process to the manager serving `runtime_dir` as a mapper named `name`.

    If the connection to the manager is lost (it crashed, or announced a restart), the mapper
    keeps every mapping and registers again with the manager that comes back on `runtime_dir`
    within `reconnect_timeout` seconds; faults in the meantime wait for it. If none does (or at
    once with 0), it drops every mapping (accesses raise MappingsDroppedError): a manager
    started later could remove or move that memory without reaching this mapper. If the
    manager that comes back serves other memory (started with `--no-state` or `--fresh`), the
    guest memory this mapper used is gone: with `fresh_start="raise"` (the default) it drops
    every mapping and leaves that manager, and accesses raise MappingsDroppedError saying so;
    with `fresh_start="follow"` it goes on as a new mapper of the new memory
    (`GuestMemory.on_registered_again` hooks are told, `kept` False).

    The GuestMemory belongs to this process: in a child forked from it every access raises
    DetachedError at once (the child maps none of its memory); the child attaches again.

    An argument of the wrong type raises ArgumentTypeError (a TypeError), a bad value
    ArgumentValueError (a ValueError); both are MembackingErrors."""
    if name is None:
        name = f"mapper-{os.getpid()}"
    _check_arguments(runtime_dir, name, eager, timeout, fault_timeout, reconnect_timeout)
    if type(fresh_start) is not str:
        raise ArgumentTypeError(f"fresh_start must be a str, got {fresh_start!r}")
    if fresh_start not in ("raise", "follow"):
        raise ArgumentValueError(f"fresh_start must be 'raise' or 'follow', got {fresh_start!r}")
    link = ManagerLink(RuntimePaths.resolve(runtime_dir), name, timeout)
    try:
        mapper = VaMapper(
            link,
            fault_timeout=fault_timeout,
            reconnect_timeout=reconnect_timeout,
            follow_fresh=fresh_start == "follow",
        )
    except BaseException:
        link.close()
        raise
    memory = GuestMemory(mapper, name)
    if eager:
        try:
            mapper.set_eager(timeout)
        except BaseException:
            memory.detach()
            raise
    return memory


def _check_arguments(
    runtime_dir: object,
    name: object,
    eager: object,
    timeout: object,
    fault_timeout: object,
    reconnect_timeout: object,
) -> None:
    """ArgumentTypeError for an argument of `attach()` of the wrong type (a bool is no number
    of seconds), ArgumentValueError for a bad value."""
    if runtime_dir is not None and not isinstance(runtime_dir, str | os.PathLike):
        raise ArgumentTypeError(
            f"runtime_dir must be a path (str or os.PathLike) or None, got {runtime_dir!r}"
        )
    if type(name) is not str:
        raise ArgumentTypeError(f"name must be a str, got {type(name).__name__} {name!r}")
    try:
        units.check_name(name)
    except ValueError as exc:
        raise ArgumentValueError(str(exc)) from None
    if type(eager) is not bool:
        raise ArgumentTypeError(f"eager must be True or False, got {eager!r}")
    for what, value, zero_ok in (
        ("timeout", timeout, False),
        ("fault_timeout", fault_timeout, False),
        ("reconnect_timeout", reconnect_timeout, True),
    ):
        wanted = "a number of seconds >= 0" if zero_ok else "a positive number of seconds"
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ArgumentTypeError(f"{what} must be {wanted}, got {value!r}")
        if not (value >= 0 if zero_ok else value > 0):  # NaN is neither
            raise ArgumentValueError(f"{what} must be {wanted}, got {value!r}")
