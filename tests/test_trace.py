"""membacking.trace: phase marks appended to the MEMBACKING_TRACE file, one line each, by every
process (a forked child marks with its own pid), the file opened once per process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import os
from membacking import trace
opened = []
real_open = os.open
os.open = lambda *a, **k: opened.append(a[0]) or real_open(*a, **k)
for i in range(3):
    trace.mark(f"parent.{i}")
pid = os.fork()
if pid == 0:
    trace.mark("child.0")
    os._exit(0)
os.waitpid(pid, 0)
trace.mark("parent.3")
print(len(opened))
"""


def test_marks_are_appended_per_process_and_the_file_opened_once(tmp_path: Path) -> None:
    out = tmp_path / "marks"
    env = dict(os.environ, MEMBACKING_TRACE=str(out))
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True
    )
    assert run.stdout.strip() == "1"  # the parent opened the file once for its four marks
    lines = [line.split(" ", 3) for line in out.read_text().splitlines()]
    phases = [phase for _, _, _, phase in lines]
    assert phases == ["parent.0", "parent.1", "parent.2", "child.0", "parent.3"]
    pids = {phase: int(pid) for _, pid, _, phase in lines}
    assert pids["child.0"] != pids["parent.0"] == pids["parent.3"]
    times = [float(at) for at, _, _, _ in lines]
    assert times == sorted(times)
    cpu = {phase: float(ms) for _, _, ms, phase in lines}  # the process's CPU time, growing
    assert 0 < cpu["parent.0"] <= cpu["parent.2"] <= cpu["parent.3"]


def test_without_the_variable_nothing_is_written(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MEMBACKING_TRACE"}
    run = subprocess.run(
        [sys.executable, "-c", "from membacking import trace; trace.mark('x'); print(trace._PATH)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    assert run.stdout.strip() == "None" and list(tmp_path.iterdir()) == []
