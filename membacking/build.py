"""Which form of membacking is running: pure Python, or with its hot modules compiled by mypyc.

`setup.py` compiles the modules in COMPILED where mypyc and a C compiler are present (the same
source stays importable as plain Python). MEMBACKING_PURE=1 skips the compile at install time,
and at run time makes the modules load from their .py files even where compiled ones exist.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType

#: the modules setup.py hands to mypyc: every module on the paths of a fault and a removal that
#: mypyc accepts (ranges.py and messages.py subclass a NamedTuple and build frozen dataclasses,
#: which it does not compile)
COMPILED = (
    "membacking.protocol.codec",
    "membacking.protocol.rangemap",
    "membacking.mapper.chunks",
    "membacking.mapper.waitlist",
    "membacking.mapper.fds",
    "membacking.mapper.core",
    "membacking.mapper.link",
    "membacking.manager.model",
    "membacking.manager.table",
    "membacking.manager.peers",
    "membacking.manager.state",
    "membacking.manager.fdconn",
    "membacking.manager.fdserver",
    "membacking.manager.daemon",
)


def pure_requested() -> bool:
    """MEMBACKING_PURE is set to anything but "" or "0"."""
    return os.environ.get("MEMBACKING_PURE", "") not in ("", "0")


def compiled_modules() -> list[str]:
    """The modules of COMPILED that load from a compiled extension in this process."""
    found = []
    for name in COMPILED:
        module = sys.modules.get(name)
        if module is None:
            spec = importlib.util.find_spec(name)
            origin = spec.origin if spec is not None else None
        else:
            origin = getattr(module, "__file__", None)
        if origin is not None and origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
            found.append(name)
    return found


def form() -> str:
    """One line for --version, status and the benchmark's header."""
    compiled = compiled_modules()
    if not compiled:
        return "pure Python" + (" (MEMBACKING_PURE)" if pure_requested() else "")
    names = ", ".join(name.rsplit(".", 1)[1] for name in compiled)
    return f"compiled by mypyc ({len(compiled)} of {len(COMPILED)} modules: {names})"


class _SourceFirst(importlib.abc.MetaPathFinder):
    """Finds the modules of COMPILED as their .py source, ahead of any compiled extension."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in COMPILED or not path:
            return None
        leaf = fullname.rsplit(".", 1)[1] + ".py"
        for directory in path:
            source = os.path.join(directory, leaf)
            if os.path.isfile(source):
                return importlib.util.spec_from_file_location(fullname, source)
        return None


def install_pure_finder() -> None:
    """With MEMBACKING_PURE set, load COMPILED from source (before any of them is imported)."""
    if pure_requested() and not any(isinstance(f, _SourceFirst) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceFirst())


install_pure_finder()  # on import of the package, before any module of COMPILED is imported
