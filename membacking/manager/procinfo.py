"""What the daemon tells about itself: the version it runs, its resources read from /proc (open
files against the limit, resident memory, memory mappings) and the URL of its metrics. Apart from
`metrics`, so that a daemon that serves no metrics does not load prometheus-client.
"""

from __future__ import annotations

import importlib.metadata
import os
import resource
from typing import Any


def _version() -> str:
    try:
        return importlib.metadata.version("membacking")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown"


#: The version of the running code (the installed distribution's).
VERSION = _version()


def wire_versions() -> dict[str, int]:
    """The versions this daemon speaks and writes, which tell two releases apart where the
    package version does not: the mapper protocol (and its feature bits), the handover, the
    journal."""
    from ..protocol.features import SUPPORTED_FEATURES
    from ..protocol.messages import PROTOCOL_VERSION
    from .handover import HANDOVER_VERSION
    from .journal import FORMAT_VERSION

    return {
        "protocol": PROTOCOL_VERSION,
        "features": SUPPORTED_FEATURES,
        "handover": HANDOVER_VERSION,
        "journal": FORMAT_VERSION,
    }


#: Share of the open-file limit beyond which `status` reports the daemon as degraded.
FD_WARN_SHARE = 0.9


def metrics_url(addr: str, port: int) -> str:
    """The URL of the metrics endpoint (an IPv6 address goes in brackets)."""
    host = f"[{addr}]" if ":" in addr else addr
    return f"http://{host}:{port}/metrics"


def process_info() -> dict[str, Any]:
    """This process's resources an operator watches: open fds against the soft limit, resident
    memory, and the number of memory mappings (VMAs), read from /proc."""
    fds = len(os.listdir("/proc/self/fd"))
    with open("/proc/self/maps", "rb") as maps:
        vmas = sum(1 for _ in maps)
    with open("/proc/self/statm") as statm:
        rss = int(statm.read().split()[1]) * resource.getpagesize()
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return {
        "pid": os.getpid(),
        "open_fds": fds,
        "max_fds": None if limit == resource.RLIM_INFINITY else limit,
        "rss_bytes": rss,
        "vmas": vmas,
    }
