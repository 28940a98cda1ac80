"""The manager daemon: owns guest memory as memfd-backed regions and answers mappers.

`state` holds every decision (sans-I/O); `daemon` is the socket loop around it; `backing` creates
the memfds; `rundir` claims the runtime directory.
"""

from .daemon import Daemon
from .settings import ManagerConfig, RegionSpec
from .state import ManagerState

__all__ = ["Daemon", "ManagerConfig", "ManagerState", "RegionSpec"]
