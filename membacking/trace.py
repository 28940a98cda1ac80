"""Phase marks for measuring a planned handover across processes: with MEMBACKING_TRACE=<file>
in the environment, `mark(phase)` appends `<CLOCK_MONOTONIC seconds> <pid> <process CPU ms>
<phase>` to that file (one write per line, O_APPEND); without it, a mark costs one test of a
module constant. The CPU time (every thread of the process) tells work from waiting for a core.
"""

from __future__ import annotations

import contextlib
import os
import time

#: the environment variable naming the file the marks are appended to
ENV_VAR = "MEMBACKING_TRACE"
_PATH = os.environ.get(ENV_VAR) or None
#: (pid, fd) of the file, opened at the first mark of a process (an open per mark cost about
#: 80 us on a disk file system: more than what some marked phases take)
_open: tuple[int, int] | None = None


def mark(phase: str) -> None:
    """Note that this process reached `phase` now (a word without spaces, and details)."""
    global _open
    if _PATH is None:
        return
    cpu = time.process_time() * 1e3
    line = f"{time.monotonic():.6f} {os.getpid()} {cpu:.3f} {phase}\n".encode()
    if _open is None or _open[0] != os.getpid():  # (a child of a fork opens its own)
        try:
            fd = os.open(_PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return
        _open = (os.getpid(), fd)
    with contextlib.suppress(OSError):
        os.write(_open[1], line)
