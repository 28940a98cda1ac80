"""A running guest rides through a manager killed with SIGKILL and restarted on the same runtime
directory: QEMU keeps its memory, mappers and QEMU see the same bytes before and after, the
launcher registers again and pins the regions it lent again.

Real QEMU (KVM where usable, TCG otherwise) and real daemons; skipped only without QEMU.
"""

from __future__ import annotations

import os
import re
import select
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
from reliability.test_faults import record
from test_qemu import MISSING, QUIET_GPA, Vm, alive, find_rsdp, start_vm, xp

from membacking.control_client import ControlError
from membacking.mapper import attach
from membacking.qemu.launcher import qmp_path

from conftest import RunningManager, run_cli

pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"no usable QEMU: {MISSING}")
__all__ = ["start_vm"]  # the fixture, shared with test_qemu

MiB = 1 << 20
Start = Callable[..., RunningManager]


def launcher_entry(manager: RunningManager, name: str) -> dict[str, Any] | None:
    found = [e for e in manager.client().mappers() if e["name"] == f"qemu-{name}"]
    return found[0] if found else None


def wait_for_pin(manager: RunningManager, name: str, timeout: float = 15.0) -> dict[str, Any]:
    """The launcher's mapper entry once it is registered with `manager` and has pinned."""
    deadline = time.monotonic() + timeout
    while (entry := launcher_entry(manager, name)) is None or entry.get("pin") is None:
        assert time.monotonic() < deadline, f"the launcher did not pin again: {entry}"
        time.sleep(0.05)
    return entry


def read_stderr_until(vm: Vm, needle: bytes, timeout: float = 10.0) -> None:
    assert vm.proc.stderr is not None
    deadline = time.monotonic() + timeout
    while needle not in vm.stderr:
        left = max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([vm.proc.stderr], [], [], left)
        assert ready, f"the launcher did not say {needle!r}: {vm.stderr.decode()}"
        vm.stderr += os.read(vm.proc.stderr.fileno(), 65536)


def test_guest_runs_on_across_a_manager_restart(start_manager: Start, start_vm: Any) -> None:
    first = start_manager("--region", "ram=0:64M")
    vm: Vm = start_vm(first, "survivor")
    find_rsdp(first.runtime_dir)
    before = wait_for_pin(first, "survivor")
    marker = os.urandom(16)
    with attach(first.runtime_dir, name="writer") as memory:
        memory.write_at(QUIET_GPA, marker)
    assert xp(vm.qmp, QUIET_GPA, 16) == marker

    first.stop(signal.SIGKILL)
    # no manager: the guest runs on its mapped memory, and its monitor answers
    assert vm.qmp.execute("query-status")["status"] == "running"
    assert alive(vm.qemu_pid) and vm.proc.poll() is None

    second = start_manager("--region", "ram=0:64M", runtime_dir=first.runtime_dir)
    ready = time.monotonic()
    # pinned from the start: by the journaled pin, or by the launcher's own once it is back
    with pytest.raises(ControlError) as refused:
        second.client().remove_region("ram")
    assert refused.value.code == "pinned" and "VM 'survivor'" in str(refused.value)
    after = wait_for_pin(second, "survivor")
    back_ms = (time.monotonic() - ready) * 1000
    assert after["id"] != before["id"]  # registered again, under a new mapper id
    assert after["pin"] == {"label": "VM 'survivor'", "pid": vm.qemu_pid, "regions": ["ram"]}
    assert vm.qmp.execute("query-status")["status"] == "running"

    # the restarted manager serves the same memory QEMU runs on, both ways
    read = run_cli("mem", "read", hex(QUIET_GPA), "16", runtime_dir=second.runtime_dir)
    assert read.returncode == 0, read.stderr
    assert read.stdout.strip() == marker.hex() == xp(vm.qmp, QUIET_GPA, 16).hex()
    again = os.urandom(16)
    with attach(second.runtime_dir, name="writer-after") as memory:
        memory.write_at(QUIET_GPA + 0x1000, again)
        assert memory.find(b"RSD PTR ", 0xE0000, 0x20000) is not None  # the firmware's tables
    assert xp(vm.qmp, QUIET_GPA + 0x1000, 16) == again
    saved = second.runtime_dir / "saved"
    # QEMU's own copy
    vm.qmp.execute("pmemsave", val=QUIET_GPA + 0x1000, size=16, filename=str(saved))
    assert saved.read_bytes() == again

    # the pin came back with the launcher: the VM's region cannot be removed under it
    with pytest.raises(ControlError) as refused:
        second.client().remove_region("ram")
    assert refused.value.code == "pinned" and "VM 'survivor'" in str(refused.value)
    read_stderr_until(vm, b"pinned again")
    assert b"no longer pinned" not in vm.stderr

    vm.qmp.execute("quit")
    assert vm.wait()[0] == 0
    assert not qmp_path(second.runtime_dir, "survivor").exists()
    second.client().remove_region("ram")  # the VM is gone: so is its pin
    record(
        "QEMU guest running on membacking RAM; manager SIGKILLed and restarted on the same "
        "directory",
        1,
        "guest kept running (QMP answered throughout); removal of its region refused from the "
        "new daemon's first request on; the launcher registered again and pinned anew "
        f"{back_ms:.0f} ms after the new daemon was ready; bytes written by mappers before "
        "and after the restart read the same through QMP and membacking; removal allowed once "
        "QEMU quit",
        "nothing",
        (0, 0),
        (0, 0),
    )


def test_a_fresh_manager_is_not_pinned_by_a_vm_on_other_memory(
    start_manager: Start, start_vm: Any
) -> None:
    """A manager that starts without the old state (--no-state) serves other memory: the VM
    keeps running on its own, and the launcher neither pins the new regions nor stays quiet."""
    first = start_manager("--no-state", "--region", "ram=0:32M")
    vm: Vm = start_vm(first, "stranded")
    wait_for_pin(first, "stranded")
    first.stop(signal.SIGKILL)
    second = start_manager("--no-state", "--region", "ram=0:32M", runtime_dir=first.runtime_dir)
    read_stderr_until(vm, b"nothing guards")
    assert re.search(rb"VM 'stranded' keeps running on memory .* no longer", vm.stderr)
    entry = launcher_entry(second, "stranded")
    assert entry is not None and entry.get("pin") is None
    second.client().remove_region("ram")  # not the VM's memory: not pinned
    assert vm.qmp.execute("query-status")["status"] == "running"


def test_a_restarted_manager_keeps_the_pin_before_the_launcher_is_back(
    start_manager: Start, start_vm: Any
) -> None:
    """The pin is journaled: the restarted manager refuses to remove the VM's region at once,
    before the launcher registers again (here it is stopped), while QEMU runs."""
    first = start_manager("--region", "ram=0:32M", "--region", "spare=1G:4M")
    vm: Vm = start_vm(first, "held", "--region", "ram")
    wait_for_pin(first, "held")
    os.kill(vm.proc.pid, signal.SIGSTOP)  # the launcher: QEMU runs on
    try:
        first.stop(signal.SIGKILL)
        second = start_manager(
            "--region",
            "ram=0:32M",
            "--region",
            "spare=1G:4M",
            "--unmap-timeout",
            "3",  # the wait for the stopped launcher, which holds the change to spare below
            runtime_dir=first.runtime_dir,
        )
        assert launcher_entry(second, "held") is None  # not registered again yet
        with pytest.raises(ControlError) as refused:
            second.client().remove_region("ram")
        assert refused.value.code == "pinned"
        assert f"VM 'held' (pid {vm.qemu_pid}, pinned before a restart)" in str(refused.value)
        removed = run_cli("region", "remove", "ram", runtime_dir=second.runtime_dir)
        assert removed.returncode == 1 and "lent to VM 'held'" in removed.stderr
        second.client().remove_region("spare")  # not lent: free
    finally:
        os.kill(vm.proc.pid, signal.SIGCONT)
    assert wait_for_pin(second, "held")["pin"]["pid"] == vm.qemu_pid  # its own pin again
    with pytest.raises(ControlError):
        second.client().disable_region("ram")
    vm.qmp.execute("quit")
    assert vm.wait()[0] == 0
    second.client().remove_region("ram")
