"""A command loads what it needs: a control command does not import the daemon, the
conformance checker or QEMU's launcher (each import is paid by every command an operator types
and every script that calls one)."""

from __future__ import annotations

import subprocess
import sys

from conftest import short_tmpdir

#: prints the membacking modules loaded once the command line has run (it always exits)
_RUN = """
import atexit, sys
loaded = lambda: sorted(m for m in sys.modules if m.startswith("membacking"))
atexit.register(lambda: print(" ".join(loaded())))
sys.argv = ["membacking", *sys.argv[1:]]
from membacking.cli import main
main()
"""


def _loaded(*args: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", _RUN, *args], capture_output=True, text=True, timeout=60
    )
    return set(done.stdout.split())


def test_a_control_command_loads_neither_the_daemon_nor_the_other_commands() -> None:
    loaded = _loaded("regions", "--runtime-dir", str(short_tmpdir() / "none"))
    assert "membacking.cli.inspect_cmd" in loaded
    for module in (
        "membacking.manager.daemon",
        "membacking.manager.state",
        "membacking.cli.manager_cmd",
        "membacking.cli.conformance_cmd",
        "membacking.conformance",
        "membacking.cli.qemu_cmd",
        "membacking.cli.bench_cmd",
    ):
        assert module not in loaded, module


def test_every_command_is_listed_and_runs_its_help() -> None:
    listed = subprocess.run(
        [sys.executable, "-m", "membacking", "--help"], capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0
    names = [line.split()[0] for line in listed.stdout.split("Commands:")[1].splitlines() if line]
    assert names == sorted(
        {"bench", "conformance", "manager", "map", "mapper", "mappers", "mem", "qemu"}
        | {"region", "regions", "stats", "status", "watch"}
    )
    assert "membacking.cli.manager_cmd" in _loaded("manager", "state", "list", "--help")
    for args in (["manager", "state", "list"], ["qemu", "run"], ["mem", "read"]):
        done = subprocess.run(
            [sys.executable, "-m", "membacking", *args, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0 and "Usage: membacking " + " ".join(args) in done.stdout
    unknown = subprocess.run(
        [sys.executable, "-m", "membacking", "region", "ad"], capture_output=True, text=True
    )
    assert unknown.returncode == 2 and "add" in unknown.stderr
    typo = subprocess.run(
        [sys.executable, "-m", "membacking", "statu"], capture_output=True, text=True
    )
    assert typo.returncode == 2 and "Did you mean" in typo.stderr and "status" in typo.stderr


def test_the_daemon_loads_prometheus_client_only_to_serve_metrics() -> None:
    """`manager run` without --metrics-port: nothing of prometheus-client (nor its HTTP
    server) is imported, about a fifth of a daemon's start."""
    code = (
        "import sys, membacking.cli.manager_cmd, membacking.manager.daemon\n"
        "from membacking.manager import Daemon, startup, control\n"
        "print(sorted(m for m in sys.modules if m.startswith(('prometheus', 'wsgiref'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
