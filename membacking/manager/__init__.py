"""The manager daemon: owns guest memory as memfd-backed regions and answers mappers.

`state` holds every decision (sans-I/O); `daemon` is the socket loop around it; `backing` creates
the memfds; `rundir` claims the runtime directory.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .daemon import Daemon
    from .settings import ManagerConfig, RegionSpec
    from .state import ManagerState

__all__ = ["Daemon", "ManagerConfig", "ManagerState", "RegionSpec"]

#: where each name of __all__ lives: imported when first asked for, so that a command line
#: that only reads the configuration (every control client) does not load the daemon
_HOMES = {"Daemon": "daemon", "ManagerConfig": "settings", "RegionSpec": "settings"}
_HOMES["ManagerState"] = "state"


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{home}", __name__), name)
