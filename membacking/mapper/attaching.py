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
) -> GuestMemory:
    """Attach this process to the manager serving `runtime_dir` as a mapper named `name`."""
    if name is None:
        name = f"mapper-{os.getpid()}"
    for what, value in (("timeout", timeout), ("fault_timeout", fault_timeout)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise MembackingError(f"{what} must be a positive number of seconds, got {value!r}")
    try:
        units.check_name(name)
    except ValueError as exc:
        raise MembackingError(str(exc)) from None
    link = ManagerLink(RuntimePaths.resolve(runtime_dir), name, timeout)
    try:
        mapper = VaMapper(link, fault_timeout=fault_timeout)
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
