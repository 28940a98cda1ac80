"""Phase marks for measuring a planned handover across processes: with MEMBACKING_TRACE=<file>
in the environment, `mark(phase)` appends `<CLOCK_MONOTONIC seconds> <pid> <phase>` to that
file (one write per line, O_APPEND); without it, a mark costs one test of a module constant.
"""

from __future__ import annotations

import os
import time

#: the environment variable naming the file the marks are appended to
ENV_VAR = "MEMBACKING_TRACE"
_PATH = os.environ.get(ENV_VAR) or None


def mark(phase: str) -> None:
    """Note that this process reached `phase` now (a word without spaces, and details)."""
    if _PATH is None:
        return
    line = f"{time.monotonic():.6f} {os.getpid()} {phase}\n".encode()
    try:
        fd = os.open(_PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    try:
        os.write(fd, line)
    except OSError:
        pass
    finally:
        os.close(fd)
