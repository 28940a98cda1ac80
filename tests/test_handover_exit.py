"""A daemon that handed over exits 0 at once, its log flushed, without its interpreter's
teardown (which freed the whole state on the cores its successor and the mappers registering
again need); a daemon stopped otherwise exits as before."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from membacking.manager.statedir import default_state_dir
from membacking.runtime import RuntimePaths

from conftest import RunningManager, cli_env, short_tmpdir

#: `python -m membacking`, with an exit handler that leaves a file behind when the
#: interpreter's own exit runs (os._exit skips it)
WRAPPER = (
    "import atexit, pathlib, runpy, sys; "
    "atexit.register(pathlib.Path(sys.argv.pop(1)).touch); "
    "runpy.run_module('membacking', run_name='__main__')"
)


def _start(runtime: Path, marker: Path, log: Path) -> subprocess.Popen[bytes]:
    args = ["manager", "run", "--runtime-dir", str(runtime), "--region", "ram0=0:1M"]
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", WRAPPER, str(marker), *args],
            stdout=subprocess.PIPE,
            stderr=err,
            env=cli_env(),
        )
    assert proc.stdout is not None
    assert b"membacking manager ready" in proc.stdout.readline()
    return proc


def test_a_daemon_that_handed_over_skips_its_teardown(
    start_manager: Callable[..., RunningManager],
) -> None:
    runtime, logs = short_tmpdir(), short_tmpdir("mblog-")
    try:
        # stopped for good: its exit handlers run (the wrapper's marker shows they would)
        stopped = _start(runtime, logs / "stopped", logs / "stopped.log")
        stopped.send_signal(signal.SIGTERM)
        assert stopped.wait(15) == 0
        assert (logs / "stopped").exists()
        old = _start(runtime, logs / "old", logs / "old.log")
        new = start_manager("--region", "ram0=0:1M", "--takeover", runtime_dir=runtime)
        assert f"took-over-from={old.pid}" in new.ready_line
        assert old.wait(15) == 0
        assert not (logs / "old").exists()  # no teardown after the handover
        assert "membacking manager stopped" in (logs / "old.log").read_text()  # flushed
        assert new.client().regions()[0]["name"] == "ram0"
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)
        shutil.rmtree(default_state_dir(RuntimePaths.resolve(runtime)), ignore_errors=True)
