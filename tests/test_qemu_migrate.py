"""`membacking qemu migrate` and what it may conclude: the source is stopped (`--quit`) only
once the destination has loaded the migration, which QEMU's return path tells; a destination
that rejects the stream leaves the source running, and a URI with nobody to answer leaves it
paused. A monitor held by another client is named as the reason when it does not greet.

Real QEMU under TCG and real daemons; skipped only without QEMU.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_qemu import MISSING, Vm, free_port, start_vm

from membacking.qemu import Qmp
from membacking.qemu.launcher import qmp_path

from conftest import RunningManager, run_cli

pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"no usable QEMU: {MISSING}")
__all__ = ["start_vm"]  # the fixture, shared with test_qemu


def _migrate_with_quit(
    start_manager: Callable[..., RunningManager],
    start_vm: Callable[..., Vm],
    name: str,
    more: tuple[str, ...] = (),
) -> tuple[RunningManager, Vm, Vm, subprocess.CompletedProcess[str]]:
    """VM `name` on a manager with 32 MiB of RAM, migrated with `--quit` into one waiting on
    a manager with that RAM and `more` regions: (source manager, source VM, destination VM,
    what `qemu migrate` did)."""
    source = start_manager("--region", "ram=0:32M")
    target = start_manager("--region", "ram=0:32M", *more)
    port = free_port()
    vm_b = start_vm(target, name, "--accel", "tcg", "--incoming", f"tcp:127.0.0.1:{port}")
    vm_a = start_vm(source, name, "--accel", "tcg")
    vm_a.qmp.close()  # the monitor serves one client at a time
    result = run_cli(
        "qemu", "migrate", name, f"tcp:127.0.0.1:{port}", "--quit", runtime_dir=source.runtime_dir
    )
    return source, vm_a, vm_b, result


def test_quit_keeps_the_source_when_the_destination_rejects_the_stream(
    start_manager: Callable[..., RunningManager], start_vm: Callable[..., Vm]
) -> None:
    """The destination has a pc-dimm the source lacks: it fails to load the stream. `--quit`
    must not stop the source then (the source's QEMU reports `completed` once everything is
    sent unless the destination's verdict comes back on the return path)."""
    source, vm_a, vm_b, result = _migrate_with_quit(
        start_manager, start_vm, "rej", ("--region", "more=4G:16M")
    )
    code, err = vm_b.wait(60)
    assert code != 0 and "load of migration failed" in err  # QEMU's own word on the destination
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "migration failed" in result.stderr and "Traceback" not in result.stderr
    assert "stopped the source" not in result.stdout
    assert vm_a.proc.poll() is None, "the source VM was stopped"
    vm_a.qmp = Qmp(qmp_path(source.runtime_dir, "rej"))
    assert vm_a.qmp.execute("query-status")["status"] == "running"  # it runs on


def test_quit_stops_the_source_once_the_destination_runs(
    start_manager: Callable[..., RunningManager], start_vm: Callable[..., Vm]
) -> None:
    """With the return path on, a good migration still completes: the destination runs the
    guest and `--quit` stops the source."""
    source, vm_a, vm_b, result = _migrate_with_quit(start_manager, start_vm, "good")
    assert result.returncode == 0, result.stderr
    assert "stopped the source VM good (the destination loaded it)" in result.stdout
    assert vm_a.wait(30)[0] == 0
    deadline = time.monotonic() + 10
    while (status := vm_b.qmp.execute("query-status")["status"]) == "inmigrate":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert status == "running"
    source.client().remove_region("ram")  # the source's pin went with its QEMU


def test_quit_keeps_the_source_when_no_destination_can_answer(
    start_manager: Callable[..., RunningManager], start_vm: Callable[..., Vm], tmp_path: Path
) -> None:
    """An `exec:` URI writes the stream to a command, which cannot say whether a QEMU loaded
    it: the migration completes, but `--quit` says so and keeps the source."""
    manager = start_manager("--region", "ram=0:32M")
    vm = start_vm(manager, "tofile", "--accel", "tcg")
    vm.qmp.close()  # the monitor serves one client at a time
    saved = tmp_path / "stream"
    result = run_cli(
        "qemu",
        "migrate",
        "tofile",
        f"exec:cat > {saved}",
        "--quit",
        runtime_dir=manager.runtime_dir,
    )
    assert result.returncode == 1 and "migrated tofile" in result.stdout, result
    assert (
        "not stopping the source VM tofile" in result.stderr and "cannot be known" in result.stderr
    )
    assert saved.stat().st_size > 0
    vm.qmp = Qmp(qmp_path(manager.runtime_dir, "tofile"))
    assert vm.qmp.execute("query-status")["status"] == "postmigrate"  # kept, paused


def test_migrate_while_another_client_holds_the_monitor(
    start_manager: Callable[..., RunningManager], start_vm: Callable[..., Vm]
) -> None:
    """QEMU greets one monitor client at a time: `qemu migrate` waits no longer than its
    --timeout for the greeting, and says who may be in the way."""
    manager = start_manager("--region", "ram=0:32M")
    vm = start_vm(manager, "held")  # vm.qmp stays connected
    result = run_cli(
        *("qemu", "migrate", "held", f"tcp:127.0.0.1:{free_port()}", "--timeout", "1"),
        runtime_dir=manager.runtime_dir,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result
    assert "did not answer in 1s: another client may hold it" in result.stderr
    assert vm.qmp.execute("query-migrate") == {}  # nothing was started


def test_the_return_path_is_set_back_after_a_migration(
    start_manager: Callable[..., RunningManager], start_vm: Callable[..., Vm], tmp_path: Path
) -> None:
    """QEMU keeps capabilities between migrations. A `--quit` to a `tcp:` URI that failed
    (nobody listening) left the return path on, and a later `exec:` migration of the same VM
    then waited for an answer no command can give: the guest stayed paused until the
    timeout, and the migration could not even be cancelled. Without `--quit` the return path
    is not asked for at all (a `tcp:` peer saving the stream never answers)."""
    manager = start_manager("--region", "ram=0:32M")
    vm = start_vm(manager, "twice", "--accel", "tcg")
    vm.qmp.close()  # the monitor serves one client at a time
    refused = run_cli(
        *("qemu", "migrate", "twice", f"tcp:127.0.0.1:{free_port()}", "--quit"),
        runtime_dir=manager.runtime_dir,
    )
    assert refused.returncode == 1 and "migration failed" in refused.stderr, refused
    with Qmp(qmp_path(manager.runtime_dir, "twice")) as qmp:
        capabilities = qmp.execute("query-migrate-capabilities")
        assert not any(c["capability"] == "return-path" and c["state"] for c in capabilities)
    saved = tmp_path / "stream"
    started = time.monotonic()
    result = run_cli(
        *("qemu", "migrate", "twice", f"exec:cat > {saved}", "--timeout", "20"),
        runtime_dir=manager.runtime_dir,
    )
    assert result.returncode == 0 and "migrated twice" in result.stdout, result
    assert saved.stat().st_size > 0 and time.monotonic() - started < 20
