"""A QEMU that runs but never opens its monitor: the launcher says so once its wait is over,
instead of staying silent for as long as QEMU runs. No real QEMU needed: a script stands in."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from conftest import RunningManager, cli_env

_RUN = """
import sys
import membacking.qemu.launcher as launcher
launcher.MONITOR_WAIT = 0.5
sys.argv = ["membacking", *sys.argv[1:]]
from membacking.cli import main
main()
"""


def test_a_qemu_without_a_monitor_is_said_to_be_unreachable(
    start_manager: Callable[..., RunningManager], tmp_path: Path
) -> None:
    manager = start_manager("--region", "ram=0:64M")
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text(
        '#!/bin/sh\n[ "$1" = --version ] && { echo "QEMU emulator version 7.2.22"; exit 0; }\n'
        "sleep 3\n"
    )
    fake.chmod(0o755)
    args = ["qemu", "run", "--name", "mute", "--qemu", str(fake), "--accel", "tcg", "--", "-S"]
    done = subprocess.run(
        [sys.executable, "-c", _RUN, *args],
        env=cli_env(manager.runtime_dir),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "has not opened its monitor" in done.stderr and "within 0.5s" in done.stderr, done
