"""`attach()`: connect this process to a manager as a mapper and return its `GuestMemory`."""

from __future__ import annotations

import os

from .. import units
from ..errors import MembackingError
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
) -> GuestMemory:
    """Attach this process to the manager serving `runtime_dir` as a mapper named `name`.

    If the connection to the manager is lost (it crashed, or announced a restart), the mapper
    keeps every mapping and registers again with the manager that comes back on `runtime_dir`
    within `reconnect_timeout` seconds (0: never; faults fail with ManagerGoneError at once);
    faults in the meantime wait for it."""
    if name is None:
        name = f"mapper-{os.getpid()}"
    for what, value in (("timeout", timeout), ("fault_timeout", fault_timeout)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise MembackingError(f"{what} must be a positive number of seconds, got {value!r}")
    if (
        isinstance(reconnect_timeout, bool)
        or not isinstance(reconnect_timeout, int | float)
        or not reconnect_timeout >= 0
    ):
        raise MembackingError(f"reconnect_timeout must be >= 0 seconds, got {reconnect_timeout!r}")
    try:
        units.check_name(name)
    except ValueError as exc:
        raise MembackingError(str(exc)) from None
    link = ManagerLink(RuntimePaths.resolve(runtime_dir), name, timeout)
    try:
        mapper = VaMapper(link, fault_timeout=fault_timeout, reconnect_timeout=reconnect_timeout)
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
