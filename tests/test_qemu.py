"""Real QEMU on membacking regions: `membacking qemu run` boots SeaBIOS on the manager's memory,
mappers and QEMU see the same bytes at the same GPAs, lent regions stay pinned while the VM runs,
either side dying takes the other down, and a guest migrates between two managers.

KVM is used where /dev/kvm is usable, TCG otherwise. Skipped only where QEMU is not installed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from membacking.control_client import ControlError
from membacking.mapper import attach
from membacking.qemu import Qmp
from membacking.qemu.binary import find_qemu
from membacking.qemu.launcher import qmp_path

from conftest import RunningManager, cli_env, run_cli

try:
    find_qemu()
    MISSING = ""
except Exception as exc:  # any reason QEMU cannot run is the skip reason
    MISSING = str(exc)

pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"no usable QEMU: {MISSING}")

MiB = 1 << 20
BIOS_WINDOW = (0xE0000, 0x20000)
BOOT_TIMEOUT = 20.0
#: no devices, no display, no monitor on stdio: only what these tests talk to (QMP)
QUIET = ("-nodefaults", "-display", "none", "-serial", "none")


class Vm:
    """`membacking qemu run` in a subprocess."""

    def __init__(self, runtime_dir: Path, name: str, *args: str, qemu_args: tuple[str, ...] = ()):
        self.runtime_dir, self.name = runtime_dir, name
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "membacking", "qemu", "run"),
                *("--runtime-dir", str(runtime_dir), "--name", name, *args),
                *("--", *(QUIET if "-serial" not in qemu_args else QUIET[:3]), *qemu_args),
            ],
            env=cli_env(),
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
        )
        assert self.proc.stderr is not None
        self.stderr = b""  # the launcher's and QEMU's, up to the launcher's announcement
        fd = self.proc.stderr.fileno()
        deadline = time.monotonic() + 40
        while (found := re.search(rb"membacking: VM .* pid (\d+) .*\n", self.stderr)) is None:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(fd, 65536) if ready else b""
            if not chunk:  # the launcher ended (or said nothing in 40 s)
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError(f"the VM did not start: {self.stderr.decode()}")
            self.stderr += chunk
        self.announce = found[0].decode()
        self.qemu_pid = int(found[1])
        self.qmp = Qmp.wait(qmp_path(runtime_dir, name), 10, lambda: self.proc.poll() is None)

    def wait(self, timeout: float = 15.0) -> tuple[int, str]:
        assert self.proc.stderr is not None
        code = self.proc.wait(timeout)
        return code, (self.stderr + self.proc.stderr.read()).decode(errors="replace")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.qmp.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.qemu_pid, signal.SIGKILL)


@pytest.fixture
def start_vm() -> Iterator[Callable[..., Vm]]:
    started: list[Vm] = []

    def start(manager: RunningManager, name: str, *args: str, **kw: tuple[str, ...]) -> Vm:
        vm = Vm(manager.runtime_dir, name, *args, **kw)
        started.append(vm)
        return vm

    yield start
    for vm in started:
        vm.close()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def gone_within(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def find_rsdp(runtime_dir: Path) -> int:
    """Wait for SeaBIOS to publish the ACPI RSDP (paragraph aligned, its 20 bytes summing to
    0: complete); found through membacking, not QEMU."""
    with attach(runtime_dir, name="rsdp-finder") as memory:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            gpa = memory.find(b"RSD PTR ", *BIOS_WINDOW)
            if gpa is not None and gpa % 16 == 0 and sum(memory.read_at(gpa, 20)) % 256 == 0:
                return gpa
            assert time.monotonic() < deadline, "no RSDP: the firmware did not come up"
            time.sleep(0.05)


#: guest RAM the firmware leaves alone (32 MiB): below 1 MiB SeaBIOS and its boot attempts
#: write as the guest runs (0x7000 read back zeros within 5 s), at the top of RAM its tables
QUIET_GPA = 0x2000000


def xp(qmp: Qmp, gpa: int, n: int) -> bytes:
    """Bytes at a GPA as QEMU itself reads them (HMP `xp`)."""
    text = qmp.hmp(f"xp /{n}xb {gpa:#x}")
    return bytes(int(b, 16) for b in re.findall(r"0x([0-9a-f]{2})\b", text.split(":", 1)[1]))


def test_guest_boots_and_shares_ram_both_ways(
    start_manager: Callable[..., RunningManager], start_vm: Callable[..., Vm]
) -> None:
    manager = start_manager("--region", "ram=0:64M", "--region", "hi=4G:16M")
    vm = start_vm(manager, "boot")
    assert "ram (64 MiB at 0x0), hi (16 MiB at 0x100000000)" in vm.announce
    rsdp = find_rsdp(manager.runtime_dir)  # written by the guest, read by a mapper
    assert xp(vm.qmp, rsdp, 8) == b"RSD PTR "
    marker = os.urandom(16)
    with attach(manager.runtime_dir, name="writer") as memory:
        memory.write_at(QUIET_GPA, marker)  # boot RAM
        memory.write_at((4 << 30) + 0x1000, marker[::-1])  # the pc-dimm
    assert xp(vm.qmp, QUIET_GPA, 16) == marker
    assert xp(vm.qmp, (4 << 30) + 0x1000, 16) == marker[::-1]
    dimms = vm.qmp.execute("query-memory-devices")
    assert [(d["data"]["addr"], d["data"]["size"]) for d in dimms] == [(4 << 30, 16 * MiB)]
    (entry,) = [e for e in manager.client().mappers() if e["name"] == "qemu-boot"]
    assert entry["pin"] == {"label": "VM 'boot'", "pid": vm.qemu_pid, "regions": ["hi", "ram"]}
    listed = run_cli("mappers", runtime_dir=manager.runtime_dir)
    assert f"(qemu-boot) lends hi, ram to VM 'boot', pid {vm.qemu_pid}" in listed.stdout
    with open(f"/proc/{vm.qemu_pid}/cmdline", "rb") as handle:
        cmdline = handle.read()
    assert b"qemu-system" in cmdline and b"mem-path=/proc/self/fd/" in cmdline


def test_lent_regions_are_pinned_until_the_vm_exits(
    start_manager: Callable[..., RunningManager], start_vm: Callable[..., Vm]
) -> None:
    manager = start_manager("--region", "ram=0:64M", "--region", "spare=1G:4M")
    vm = start_vm(manager, "pinned", "--region", "ram")
    client = manager.client()
    for attempt in (
        lambda: client.remove_region("ram"),
        lambda: client.disable_region("ram"),
        lambda: client.move_region("ram", 2 << 30),
    ):
        with pytest.raises(ControlError) as refused:
            attempt()
        assert refused.value.code == "pinned" and "VM 'pinned'" in str(refused.value)
    text = run_cli("region", "remove", "ram", runtime_dir=manager.runtime_dir)
    assert text.returncode == 1 and "lent to VM 'pinned'" in text.stderr
    client.remove_region("spare")  # not lent: free
    vm.qmp.execute("quit")
    code, _ = vm.wait()
    assert code == 0
    assert not qmp_path(manager.runtime_dir, "pinned").exists()
    client.remove_region("ram")


def test_qemu_killed_launcher_exits_with_its_status(
    start_manager: Callable[..., RunningManager], start_vm: Callable[..., Vm]
) -> None:
    manager = start_manager("--region", "ram=0:32M")
    vm = start_vm(manager, "victim")
    os.kill(vm.qemu_pid, signal.SIGKILL)
    code, _ = vm.wait()
    assert code == 128 + signal.SIGKILL
    manager.client().remove_region("ram")  # the pin went with the launcher


def test_signals_are_forwarded(
    start_manager: Callable[..., RunningManager], start_vm: Callable[..., Vm]
) -> None:
    manager = start_manager("--region", "ram=0:32M")
    vm = start_vm(manager, "term")
    vm.proc.send_signal(signal.SIGTERM)
    code, err = vm.wait()
    assert code == 0 and "terminating on signal 15" in err  # QEMU's own clean exit
    assert not alive(vm.qemu_pid)


def test_launcher_killed_leaves_no_orphan(
    start_manager: Callable[..., RunningManager], start_vm: Callable[..., Vm]
) -> None:
    manager = start_manager("--region", "ram=0:32M")
    vm = start_vm(manager, "orphan")
    vm.proc.kill()
    vm.proc.wait(10)
    assert gone_within(vm.qemu_pid, 10), "QEMU outlived its launcher"
    deadline = time.monotonic() + 10
    while True:  # the manager notices the mapper's socket closing, then the pin is gone
        try:
            manager.client().remove_region("ram")
            break
        except ControlError as exc:
            assert exc.code == "pinned" and time.monotonic() < deadline
            time.sleep(0.1)
    # the dead launcher's monitor socket is left behind; a new VM of that name clears it
    assert qmp_path(manager.runtime_dir, "orphan").exists()
    manager.client().add_region("ram", 0, 32 * MiB)
    again = start_vm(manager, "orphan")
    assert again.qmp.execute("query-name") == {"name": "orphan"}


def test_vm_outlives_its_manager_and_says_so(
    start_manager: Callable[..., RunningManager], start_vm: Callable[..., Vm]
) -> None:
    manager = start_manager("--region", "ram=0:32M")
    vm = start_vm(manager, "lonely")
    find_rsdp(manager.runtime_dir)
    manager.stop()
    assert vm.proc.stderr is not None
    deadline = time.monotonic() + 10
    while b"lost the manager" not in vm.stderr:
        ready, _, _ = select.select([vm.proc.stderr], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no warning: {vm.stderr.decode()}"
        vm.stderr += os.read(vm.proc.stderr.fileno(), 65536)
    assert b"the regions it lent are no longer pinned" in vm.stderr
    assert vm.qmp.execute("query-status")["status"] == "running"  # the guest runs on
    vm.qmp.execute("quit")
    assert vm.wait()[0] == 0


@pytest.mark.parametrize(
    ("regions", "args", "message"),
    [
        (["ram=0:32M", "rom=4G:1M:ro"], [], "region 'rom' is read-only"),
        (["ram=0:32M", "low=1G:1M"], [], "region 'low' lies at GPA 0x40000000, below 4 GiB"),
        (["hi=4G:1M"], [], "no region at GPA 0"),
        (["ram=0:32M"], ["--region", "nope"], "no region named 'nope'"),
        (["ram=0:32M"], ["--qemu", "/nonexistent/qemu"], "QEMU not found"),
        (["ram=0:32M"], ["--", "-m", "1G"], "-m is set by membacking"),
        (["ram=0:32M"], ["--", "--m", "1G"], "--m is set by membacking"),
        (["ram=0:32M"], ["--", "-S", "-daemonize"], "-daemonize is refused: QEMU would fork"),
        (["ram=0:32M"], ["--", "--daemonize"], "--daemonize is refused: QEMU would fork"),
        (["ram=0:32M"], ["--", "-runas", "nobody"], "-runas is refused: changing QEMU's user"),
        (["ram=0:32M"], ["--", "-async-teardown"], "-async-teardown is refused: QEMU's teardown"),
        *(
            (
                ["ram=0:32M"],
                ["--", "-run-with", spelled],
                "-run-with async-teardown=on is refused: QEMU's teardown",
            )
            for spelled in ("async-teardown=on", "chroot=/x,async-teardown=yes", "async-teardown")
        ),
    ],
)
def test_refusals_are_one_clear_line(
    start_manager: Callable[..., RunningManager],
    regions: list[str],
    args: list[str],
    message: str,
) -> None:
    manager = start_manager(*(a for r in regions for a in ("--region", r)))
    result = run_cli("qemu", "run", *args, runtime_dir=manager.runtime_dir, timeout=30)
    assert result.returncode == 1, result
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert all(not e["name"].startswith("qemu-") for e in manager.client().mappers())
    manager.client().remove_region(regions[0].split("=")[0])  # nothing stayed pinned


def test_too_old_qemu_is_refused(
    start_manager: Callable[..., RunningManager], tmp_path: Path
) -> None:
    old = tmp_path / "qemu-system-x86_64"
    old.write_text("#!/bin/sh\necho 'QEMU emulator version 4.2.1'\n")
    old.chmod(0o755)
    manager = start_manager("--region", "ram=0:32M")
    result = run_cli("qemu", "run", "--qemu", str(old), runtime_dir=manager.runtime_dir)
    assert result.returncode == 1
    assert "is QEMU 4.2.1; membacking needs QEMU 5.0 or newer" in result.stderr


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def ram_digest(runtime_dir: Path, size: int) -> str:
    with attach(runtime_dir, name="digest") as memory:
        return hashlib.sha256(memory.read_at(0, size)).hexdigest()


def test_migration_between_managers(
    start_manager: Callable[..., RunningManager], start_vm: Callable[..., Vm]
) -> None:
    # TCG on both sides: under KVM the host kernel itself rewrites the guest's kvmclock
    # structure (SeaBIOS enables it) on the destination, so one 32-byte record would differ.
    source = start_manager("--region", "ram=0:64M")
    target = start_manager("--region", "ram=0:64M")
    vm_a = start_vm(source, "mig", "--accel", "tcg")
    find_rsdp(source.runtime_dir)
    marker = os.urandom(32)
    with attach(source.runtime_dir, name="marker") as memory:
        memory.write_at(0x123000, marker)
    port = free_port()
    vm_b = start_vm(
        target, "mig", "--accel", "tcg", "--incoming", f"tcp:127.0.0.1:{port}", qemu_args=("-S",)
    )
    vm_a.qmp.close()  # QEMU's monitor serves one client at a time
    result = run_cli(
        "qemu", "migrate", "mig", f"tcp:127.0.0.1:{port}", runtime_dir=source.runtime_dir
    )
    assert result.returncode == 0, result.stderr
    assert "migrated mig" in result.stdout
    vm_a.qmp = Qmp(qmp_path(source.runtime_dir, "mig"))
    # both guests are paused now (source: postmigrate, target: -S): their RAM must be equal
    assert vm_a.qmp.execute("query-status")["status"] == "postmigrate"
    deadline = time.monotonic() + 10
    while (status := vm_b.qmp.execute("query-status")["status"]) == "inmigrate":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert status == "paused"  # the incoming state is loaded; -S keeps it from running
    assert ram_digest(target.runtime_dir, 64 * MiB) == ram_digest(source.runtime_dir, 64 * MiB)
    with attach(target.runtime_dir, name="check") as memory:
        assert memory.read_at(0x123000, 32) == marker
    with pytest.raises(ControlError):
        source.client().remove_region("ram")  # the source VM still holds it
    vm_a.qmp.execute("quit")
    assert vm_a.wait()[0] == 0
    source.client().remove_region("ram")
    vm_b.qmp.execute("cont")
    assert vm_b.qmp.execute("query-status")["status"] == "running"


def test_linux_command_line_found_in_guest_ram(
    start_manager: Callable[..., RunningManager], start_vm: Callable[..., Vm], tmp_path: Path
) -> None:
    """A real Linux kernel boots (until it finds no root file system) on membacking RAM; its
    command line, with a random marker, is found in guest RAM by a mapper: QEMU's loader copy and
    the kernel's own copies."""
    kernel = os.environ.get("MEMBACKING_TEST_KERNEL") or next(
        (str(p) for p in sorted(Path("/boot").glob("vmlinuz-*"))), None
    )
    if kernel is None or not os.path.exists(kernel):
        pytest.skip("no Linux kernel: set MEMBACKING_TEST_KERNEL or install a linux-image package")
    manager = start_manager("--region", "ram=0:256M")
    marker = f"membacking.marker={os.urandom(8).hex()}".encode()
    serial = tmp_path / "serial.log"
    # TCG: KVM inside a nested host may lack CPU features the kernel expects
    start_vm(
        manager,
        "linux",
        "--accel",
        "tcg",
        qemu_args=(
            "-serial",
            f"file:{serial}",
            "-kernel",
            kernel,
            "-append",
            f"console=ttyS0 {marker.decode()}",
        ),
    )
    deadline = time.monotonic() + 30
    with attach(manager.runtime_dir, name="cmdline-finder") as memory:
        while len(found := list(memory.find_all(marker, 0, 256 * MiB))) < 2:
            assert time.monotonic() < deadline, f"kernel's copy not found (only {found})"
            time.sleep(0.2)
    while not re.search(rb"Kernel command line: .*" + marker, serial.read_bytes()):
        assert time.monotonic() < deadline, "the kernel did not print its command line"
        time.sleep(0.1)


def test_migrate_errors_are_one_clear_line(
    start_manager: Callable[..., RunningManager], start_vm: Callable[..., Vm]
) -> None:
    manager = start_manager("--region", "ram=0:32M")
    missing = run_cli("qemu", "migrate", "nope", "tcp:127.0.0.1:1", runtime_dir=manager.runtime_dir)
    assert missing.returncode == 1 and "no VM named 'nope' here" in missing.stderr
    vm = start_vm(manager, "stay")
    vm.qmp.close()  # the monitor serves one client at a time
    port = free_port()  # nobody listens there
    failed = run_cli(
        "qemu", "migrate", "stay", f"tcp:127.0.0.1:{port}", runtime_dir=manager.runtime_dir
    )
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert "migration failed" in failed.stderr or "QEMU refused migrate" in failed.stderr
    vm.qmp = Qmp(qmp_path(manager.runtime_dir, "stay"))
    assert vm.qmp.execute("query-status")["status"] == "running"  # the source runs on
