"""`membacking qemu run`: QEMU as a mapper's child, its RAM the manager's regions.

The launcher attaches as mapper `qemu-<name>`, takes the regions' fds (`sharing()`), pins the
regions it lends, starts QEMU with those fds inherited, forwards signals and exits with QEMU's
status. QEMU is killed by the kernel if the launcher dies; the pins go when the mapper does,
and are set again when the mapper registers again with a manager restarted on the same memory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..control_client import ControlClient
from ..ffi import die_with_parent
from ..mapper import GuestMemory, attach
from ..runtime import MAX_SOCKET_PATH, RuntimePaths
from ..units import format_size
from . import layout
from .binary import QemuError, find_qemu

log = logging.getLogger("membacking.qemu")

#: options membacking sets itself from the regions
OWN_OPTIONS = ("-m", "-machine", "-M")
#: options that take QEMU out of the launcher's hands, and why
DETACHING = {
    "-daemonize": "QEMU would fork away from the launcher, which would see it exit, unpin the "
    "regions it lent and remove its monitor socket while the guest runs on; run the launcher "
    "itself in the background instead",
    "-runas": "changing QEMU's user clears its parent-death signal, so QEMU could outlive the "
    "launcher and run on unpinned memory; run the launcher as that user instead",
    "-async-teardown": "QEMU's teardown process would keep the guest's memory mapped after QEMU "
    "exits, when the launcher has unpinned it: a removal would not reach that process",
}
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: seconds QEMU may take to open its monitor before the launcher says it has not
MONITOR_WAIT = 60.0
KVM_GET_API_VERSION = 0xAE00


@dataclass(frozen=True)
class VmOptions:
    name: str
    runtime_dir: Path | None = None
    qemu: str | None = None
    regions: tuple[str, ...] = ()
    accel: str = "auto"
    incoming: str | None = None
    machine_opts: tuple[str, ...] = ()
    qemu_args: tuple[str, ...] = field(default_factory=tuple)


def qmp_path(runtime_dir: Path | str | None, name: str) -> Path:
    """Where the monitor socket of VM `name` lives: in the manager's runtime directory."""
    return RuntimePaths.resolve(runtime_dir).root / f"qemu-{name}.qmp"


def kvm_usable() -> bool:
    """Whether /dev/kvm opens and answers (it may exist and still be unusable)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, KVM_GET_API_VERSION) == 12  # the stable KVM API
    except OSError:
        return False
    finally:
        os.close(fd)


def accel_args(accel: str, qemu_args: Sequence[str]) -> tuple[list[str], str]:
    """QEMU's accelerator options and what was chosen ("auto": KVM where usable, else TCG).
    QemuError for --accel kvm or tcg beside an accelerator in QEMU's own arguments (QEMU would
    have taken the latter, unsaid)."""
    given = [a for a in qemu_args if a in ("-accel", "--accel", "-enable-kvm", "--enable-kvm")]
    if given and accel not in ("auto", "none"):
        raise QemuError(
            f"--accel {accel} and {given[0]} among QEMU's arguments both choose the accelerator: "
            "give one of them"
        )
    if accel == "none" or given:
        return [], "as given"
    if accel == "auto":
        accel = "kvm" if kvm_usable() else "tcg"
    return ["-accel", accel], accel


def _claim_socket(path: Path, name: str) -> None:
    """Refuse a name whose monitor socket answers; remove one left by a VM that died."""
    if len(str(path)) > MAX_SOCKET_PATH:
        raise QemuError(f"monitor socket path {path} is too long for a Unix socket: shorten --name")
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise QemuError(f"cannot check {path}: {exc}") from None
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    finally:
        probe.close()
    raise QemuError(f"a VM named {name!r} already runs here (its monitor {path} answers)")


def _turned_on(value: str, key: str) -> bool:
    """Whether QEMU's option string `value` (KEY=VALUE,...) turns boolean `key` on: a bare key
    does, and so do on, yes, true and y."""
    for part in value.split(","):
        name, eq, setting = part.partition("=")
        if name.strip() == key and (
            not eq or setting.strip().lower() in ("on", "yes", "true", "y")
        ):
            return True
    return False


def _check_args(qemu_args: Sequence[str]) -> None:
    for i, arg in enumerate(qemu_args):
        option = arg[1:] if arg.startswith("--") else arg  # QEMU takes -opt and --opt alike
        if option in OWN_OPTIONS or arg.startswith(("-m=", "-machine=")):
            raise QemuError(
                f"{arg} is set by membacking from the regions (pc machine, boot RAM size); "
                "give machine properties with --machine-opt KEY=VALUE"
            )
        if option in DETACHING:
            raise QemuError(f"{arg} is refused: {DETACHING[option]}")
        if option == "-run-with":
            value = "".join(qemu_args[i + 1 : i + 2])
            if "user=" in value:
                raise QemuError(f"{arg} user= is refused: {DETACHING['-runas']}")
            if _turned_on(value, "async-teardown"):
                refused = DETACHING["-async-teardown"]
                raise QemuError(f"{arg} async-teardown=on is refused: {refused}")


#: -machine properties membacking sets from the regions (layout.py), or that take the memory away
OWN_MACHINE_PROPS = ("type", "memory-backend", "max-ram-below-4g")


def _check_machine_opts(machine_opts: Sequence[str]) -> None:
    """Each --machine-opt is one KEY=VALUE that leaves membacking's own properties alone (a comma
    would smuggle in a second, `memory-backend=` or the machine type)."""
    for opt in machine_opts:
        key, eq, _ = opt.partition("=")
        if not eq or not key.strip() or "," in opt.replace(",,", ""):  # (",," is a comma)
            raise QemuError(f"--machine-opt {opt!r} is not one KEY=VALUE (e.g. usb=off)")
        if key.strip() in OWN_MACHINE_PROPS:
            raise QemuError(
                f"--machine-opt {opt!r} is refused: membacking sets {key.strip()} from the regions"
            )


def _same_layout(
    before: list[dict[str, Any]], after: list[dict[str, Any]], names: list[str]
) -> bool:
    def key(regions: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            r["name"]: (r["gpa"], r["active"], r["mappings"]) for r in regions if r["name"] in names
        }

    return key(before) == key(after)


def run_vm(opts: VmOptions, announce: Callable[[str], None]) -> int:
    """Run the VM until QEMU exits; returns the exit status to leave with."""
    binary, version = find_qemu(opts.qemu)
    _check_args(opts.qemu_args)
    _check_machine_opts(opts.machine_opts)
    monitor = qmp_path(opts.runtime_dir, opts.name)
    _claim_socket(monitor, opts.name)
    client = ControlClient(opts.runtime_dir)
    # (a manager serving other memory is told apart, and warned of, by its hook: _pin_again)
    memory = attach(opts.runtime_dir, name=f"qemu-{opts.name}", fresh_start="follow")
    try:
        shares = memory.sharing(opts.regions or None)  # (only what it lends: held, pinned)
        if shares is None:
            raise QemuError("the manager runs private RAM: it has no fds to lend to QEMU")
        try:
            regions = client.regions()
            plan = layout.plan(regions, shares, opts.regions)
            label = f"VM {opts.name!r}"
            client.call(
                "pin_regions",
                mapper=memory.mapper_id,
                label=label,
                pid=os.getpid(),
                regions=",".join(plan.regions),
            )
            if not _same_layout(regions, client.regions(), plan.regions):
                raise QemuError("the regions changed while the VM was being set up; try again")
            accel, chosen = accel_args(opts.accel, opts.qemu_args)
            argv = [
                binary,
                *plan.qemu_args(opts.machine_opts),
                "-name",
                opts.name,
                "-qmp",
                f"unix:{monitor},server=on,wait=off",
                *accel,
                *(["-incoming", opts.incoming] if opts.incoming else []),
                *opts.qemu_args,
            ]
            log.debug("starting %s", argv)
            try:
                proc = subprocess.Popen(
                    argv,
                    pass_fds=plan.fds,
                    preexec_fn=functools.partial(die_with_parent, signal.SIGKILL, os.getpid()),
                )
            except OSError as exc:
                raise QemuError(f"cannot start {binary}: {exc}") from None
        finally:
            for share in shares:
                os.close(share.fd)
        with contextlib.suppress(Exception):  # the pin stands; this only names the VM's pid
            client.call(
                "pin_regions",
                mapper=memory.mapper_id,
                label=label,
                pid=proc.pid,
                regions=",".join(plan.regions),
            )
        memory.on_registered_again(
            _pin_again(opts.runtime_dir, memory, label, proc, plan.regions, announce)
        )
        lent = ", ".join(
            f"{d.name} ({format_size(d.size)} at {d.gpa:#x})" for d in (plan.ram, *plan.dimms)
        )

        def ready() -> None:  # once the monitor answers, so tools can reach the VM at once
            if _monitor_up(monitor, proc, MONITOR_WAIT):
                announce(
                    f"VM {opts.name!r}: QEMU {'.'.join(map(str, version))} pid {proc.pid} "
                    f"({chosen}) on {lent}; monitor {monitor}"
                )
            elif proc.poll() is None:  # it runs, but nothing can reach it: said, not waited on
                announce(
                    f"VM {opts.name!r}: QEMU pid {proc.pid} has not opened its monitor "
                    f"{monitor} within {MONITOR_WAIT:g}s: it runs on, but `qemu migrate` and "
                    "QMP tools cannot reach it"
                )

        warned: list[str] = []

        def watch() -> None:  # said once: the VM runs on, but nothing guards its memory now
            gone = memory.manager_gone
            if gone and not warned:
                warned.append(gone)
                # (a manager that stopped for good, or evicted it, left no journaled pin)
                again = (
                    " (a manager started on the state they were journaled in pins them again "
                    "while QEMU runs)"
                    if "took this mapper back" in gone
                    else ""
                )
                announce(
                    f"VM {opts.name!r} keeps running, but its mapper lost the manager ({gone}): "
                    f"the regions it lent are no longer pinned{again}"
                )

        return supervise(proc, ready, watch)
    finally:
        memory.detach()
        client.close()
        with contextlib.suppress(FileNotFoundError):
            monitor.unlink()


def _pin_again(
    runtime_dir: Path | None,
    memory: GuestMemory,
    label: str,
    proc: subprocess.Popen[bytes],
    regions: list[str],
    announce: Callable[[str], None],
) -> Callable[[bool, int], None]:
    """The hook run when the launcher's mapper registered again with a restarted manager: the
    pins lived in the old manager's memory, so pin the lent regions again (from a thread of its
    own: the hook runs on the mapper thread) if the new manager serves the same memory."""

    def pin(old_id: int) -> None:
        new_id, names = memory.mapper_id, ", ".join(regions)
        if proc.poll() is not None:  # QEMU exited while no manager ran: nothing to guard
            return
        client = ControlClient(runtime_dir)
        try:
            client.call(
                "pin_regions", mapper=new_id, label=label, pid=proc.pid, regions=",".join(regions)
            )
        except Exception as exc:  # the VM runs on; say what no longer guards its memory
            announce(f"{label}: the manager restarted, but pinning {names} again failed: {exc}")
            return
        finally:
            client.close()
        announce(
            f"{label}: the manager restarted; registered again as mapper {new_id} (was "
            f"{old_id}), {names} pinned again"
        )

    def hook(kept: bool, old_id: int) -> None:
        if kept:
            threading.Thread(
                target=pin, args=(old_id,), name="membacking-repin", daemon=True
            ).start()
        else:
            announce(
                f"{label} keeps running on memory the manager no longer serves (it started "
                "without the old state and serves other memory): nothing guards the guest's "
                "RAM now; stop the VM"
            )

    return hook


def _monitor_up(path: Path, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> bool:
    """Wait until QEMU's monitor accepts a connection; False if QEMU exits (or is slower)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
                return True
            except OSError:
                pass
        time.sleep(0.02)
    return False


def supervise(
    proc: subprocess.Popen[bytes],
    started: Callable[[], None] | None = None,
    tick: Callable[[], None] | None = None,
) -> int:
    """Forward SIGINT, SIGTERM and SIGHUP to QEMU until it exits (calling `started()` once
    they are forwarded, `tick()` about every half second); QEMU's status as a shell gives it."""

    def forward(sig: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        if started is not None:
            started()
        while True:
            try:
                code = proc.wait(0.5)
                break
            except subprocess.TimeoutExpired:
                if tick is not None:
                    tick()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code if code >= 0 else 128 - code
