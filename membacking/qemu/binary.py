"""Finding the QEMU binary and checking that it is recent enough for membacking's options."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

from ..errors import MembackingError

DEFAULT_BINARY = "qemu-system-x86_64"
#: `-machine memory-backend=` (boot RAM from a named backend) arrived in QEMU 5.0
MIN_VERSION = (5, 0)


class QemuError(MembackingError):
    """QEMU is missing, too old, or cannot run the requested layout."""


def find_qemu(binary: str | None = None) -> tuple[str, tuple[int, int, int]]:
    """The path and version of QEMU (`binary`, else qemu-system-x86_64 on PATH)."""
    name = binary or DEFAULT_BINARY
    path = shutil.which(name) if os.sep not in name else name
    if path is None or not os.access(path, os.X_OK):
        raise QemuError(
            f"QEMU not found: {name!r} is not an executable"
            + ("" if binary else " on PATH (install qemu-system-x86, or give --qemu PATH)")
        )
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=20, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise QemuError(f"cannot run {path} --version: {exc}") from None
    found = re.search(r"QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?", out)
    if found is None:
        first = out.strip().splitlines()[0][:80] if out.strip() else ""
        raise QemuError(f"{path} does not look like QEMU (its --version says {first!r})")
    version = (int(found[1]), int(found[2]), int(found[3] or 0))
    if version[:2] < MIN_VERSION:
        raise QemuError(
            f"{path} is QEMU {'.'.join(map(str, version))}; membacking needs QEMU "
            f"{'.'.join(map(str, MIN_VERSION))} or newer (-machine memory-backend=)"
        )
    return path, version
