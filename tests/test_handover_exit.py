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


def test_memory_descriptors_are_left_to_the_exit_of_a_process_that_handed_over(
    tmp_path: Path,
) -> None:
    """A daemon whose process ends right after a handover (`manager run`) leaves closing its
    memory descriptors to the kernel; any other closes them as it stops."""
    import os

    from membacking.manager.daemon import Daemon
    from membacking.manager.persist import PersistConfig
    from membacking.manager.settings import ManagerConfig

    for exiting, handing_over in ((True, True), (False, True), (True, False)):
        runtime = short_tmpdir()
        state_dir = tmp_path / f"s{exiting}{handing_over}"
        config = ManagerConfig(runtime_dir=runtime, persist=PersistConfig(state_dir=state_dir))
        daemon = Daemon(config)
        daemon.exit_after_handover = exiting
        daemon.start()
        daemon.state.add_region("r", 0, 1 << 20, True)
        fds = [fd for fd, _ in daemon.store.fd_table().values()]
        if handing_over:
            daemon.handing_over = (False, False)
        daemon._close_all()
        left = [fd for fd in fds if _is_open(fd)]
        assert left == (fds if exiting and handing_over else []), (exiting, handing_over)
        for fd in left:
            os.close(fd)
        shutil.rmtree(runtime, ignore_errors=True)


def _is_open(fd: int) -> bool:
    import os

    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
