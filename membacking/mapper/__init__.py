"""The mapper side: reserve the guest address space in this process and map regions into it on
demand. `attach()` returns a `GuestMemory`; `VaMapper` is the machinery underneath.
"""

from .attaching import attach
from .core import VaMapper
from .memory import GuestMemory
from .sharing import SharedRange

__all__ = ["GuestMemory", "SharedRange", "VaMapper", "attach"]
