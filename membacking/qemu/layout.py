"""From the manager's regions to QEMU's memory options for the `pc` machine.

The region at GPA 0 becomes the boot RAM (`-machine memory-backend=`); regions at or above
4 GiB become cold-plugged pc-dimm devices at their GPAs. Anything QEMU could not place at the
same GPA, or could not use as RAM, is refused with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..mapper import SharedRange
from .binary import QemuError

#: the pc machine keeps boot RAM smaller than this contiguous at GPA 0; from this size on it
#: keeps only the first 3 GiB there and moves the rest above 4 GiB
LOW_RAM_LIMIT = 0xE0000000
#: QEMU rounds the machine's RAM size up to this: a boot region of another size is refused by
#: QEMU itself ("Machine memory size does not match the size of the memory backend")
RAM_SIZE_ALIGN = 8192
#: where the pc machine's memory-device area starts when all boot RAM lies below 4 GiB
DEVICE_MEMORY_BASE = 1 << 32


@dataclass(frozen=True)
class Lent:
    """A region lent to QEMU: `size` bytes at `gpa`, the whole of file `fd` from offset 0."""

    name: str
    gpa: int
    size: int
    fd: int


@dataclass(frozen=True)
class Plan:
    """The boot RAM and the memory devices of one VM."""

    ram: Lent
    dimms: tuple[Lent, ...] = ()

    @property
    def regions(self) -> list[str]:
        return [self.ram.name, *(d.name for d in self.dimms)]

    @property
    def fds(self) -> list[int]:
        return [self.ram.fd, *(d.fd for d in self.dimms)]

    def qemu_args(self, machine_opts: Sequence[str] = ()) -> list[str]:
        """QEMU's memory options (plus `machine_opts` for -machine); the fds must be inherited
        under the same numbers."""

        def backend(ident: str, lent: Lent) -> list[str]:
            return [
                "-object",
                f"memory-backend-file,id={ident},mem-path=/proc/self/fd/{lent.fd},"
                f"size={lent.size},share=on",
            ]

        memory = f"size={self.ram.size}B"
        if self.dimms:
            end = max(d.gpa + d.size for d in self.dimms) - DEVICE_MEMORY_BASE
            extra = max(sum(d.size for d in self.dimms), end)
            memory += f",slots={len(self.dimms)},maxmem={self.ram.size + extra}B"
        machine = ",".join(["pc", "memory-backend=mb-ram", *machine_opts])
        args = ["-machine", machine, "-m", memory, *backend("mb-ram", self.ram)]
        for i, dimm in enumerate(self.dimms):
            args += backend(f"mb-dimm{i}", dimm)
            args += ["-device", f"pc-dimm,id=mb-{dimm.name},memdev=mb-dimm{i},addr={dimm.gpa}"]
        return args


def _lendable(region: dict[str, Any], shares: Sequence[SharedRange]) -> Lent:
    name, gpa, size = region["name"], region["gpa"], region["size"]
    if region["backing"] == "private":
        raise QemuError(f"region {name!r} is private RAM: it has no fd to lend to QEMU")
    if not region["writable"]:
        raise QemuError(
            f"region {name!r} is read-only: QEMU would use it as RAM and write to it; leave it "
            "out (--region) or add it writable"
        )
    subs = region["mappings"]
    if (
        len(subs) != 1
        or subs[0]["size"] != size
        or subs[0]["file_offset"]
        or not subs[0]["writable"]
    ):
        if len(subs) != 1:
            shape = f"is made of {len(subs)} mappings"
        elif subs[0]["size"] != size:
            shape = "has a hole (its one mapping covers part of it)"
        elif subs[0]["file_offset"]:
            shape = f"starts at offset {subs[0]['file_offset']:#x} of its file"
        else:
            shape = "is mapped read-only"
        raise QemuError(
            f"region {name!r} {shape} (region map/unmap changed it): QEMU maps one whole file "
            "from offset 0 per region"
        )
    for share in shares:
        if share.gpa == gpa and share.size == size and share.writable:
            return Lent(name, gpa, size, share.fd)
    raise QemuError(f"region {name!r} could not be shared (it changed meanwhile?)")


def plan(
    regions: Sequence[dict[str, Any]],
    shares: Sequence[SharedRange],
    selected: Sequence[str] = (),
) -> Plan:
    """The plan for the `selected` regions (all active ones if none is named)."""
    by_name = {r["name"]: r for r in regions}
    for name in selected:
        if name not in by_name:
            raise QemuError(f"no region named {name!r}")
        if not by_name[name]["active"]:
            raise QemuError(f"region {name!r} is not active (disabled, unplaced or hidden)")
    chosen = [by_name[n] for n in dict.fromkeys(selected)] or [r for r in regions if r["active"]]
    ram: Lent | None = None
    dimms: list[Lent] = []
    for region in sorted(chosen, key=lambda r: r["gpa"]):
        name, gpa, size = region["name"], region["gpa"], region["size"]
        lent = _lendable(region, shares)
        if gpa == 0:
            if size >= LOW_RAM_LIMIT:
                raise QemuError(
                    f"region {name!r} ({size:#x} bytes at GPA 0) is too large for boot RAM: "
                    f"from {LOW_RAM_LIMIT:#x} bytes on, the pc machine keeps only the first 3 "
                    "GiB at GPA 0 and moves the rest above 4 GiB; use a boot region smaller "
                    f"than {LOW_RAM_LIMIT:#x} bytes plus regions at or above 4 GiB"
                )
            if size % RAM_SIZE_ALIGN:
                raise QemuError(
                    f"region {name!r} ({size:#x} bytes) cannot be boot RAM: QEMU takes RAM "
                    f"sizes in multiples of {RAM_SIZE_ALIGN} bytes; resize it (or add a page)"
                )
            ram = lent
        elif gpa >= DEVICE_MEMORY_BASE:
            dimms.append(lent)
        else:
            raise QemuError(
                f"region {name!r} lies at GPA {gpa:#x}, below 4 GiB: the pc machine has only "
                "its boot RAM (GPA 0) and the PCI hole there; place it at or above 4 GiB to "
                "lend it as a memory device, or leave it out (--region)"
            )
    if ram is None:
        raise QemuError("no region at GPA 0 to be the VM's boot RAM (add one, e.g. ram=0:256M)")
    return Plan(ram, tuple(dimms))
