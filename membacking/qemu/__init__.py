"""Running QEMU on membacking: its guest RAM is the manager's regions, lent by fd.

`binary` finds and checks QEMU, `layout` turns regions into QEMU's memory options, `launcher`
runs the VM as a mapper that pins what it lent, `qmp` talks to the VM's monitor,
`migration` sends a VM to another QEMU and learns whether the destination loaded it.
"""

from .binary import QemuError
from .qmp import Qmp, QmpError

__all__ = ["QemuError", "Qmp", "QmpError"]
