"""Build of membacking: its hot modules compiled by mypyc where that works, pure Python where not.

The metadata lives in pyproject.toml. Here: the modules listed in membacking/build.py are
compiled to C extensions when mypyc (from the build requirements) and a C compiler are present;
on any failure, or with MEMBACKING_PURE=1, the package installs as the pure Python it also is.
"""

from __future__ import annotations

import os
import runpy
import sys
import time
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
_build = runpy.run_path(os.path.join(HERE, "membacking", "build.py"))


def _say(text: str) -> None:
    print(f"membacking build: {text}", file=sys.stderr, flush=True)


class _OptionalBuildExt(build_ext):
    """Compiles the extensions; if any fails, removes what it built and goes on without them."""

    def run(self) -> None:
        started = time.monotonic()
        try:
            super().run()
        except (Exception, SystemExit) as exc:  # no compiler, a compile error: pure Python
            _say(f"compiling failed ({exc}); installing pure Python")
            for path in self.get_outputs():
                if os.path.exists(path):
                    os.remove(path)
            self.extensions = []
            return
        _say(f"compiled {len(self.extensions)} extensions in {time.monotonic() - started:.1f} s")


def _ext_modules() -> list[Any]:
    if _build["pure_requested"]():
        _say("MEMBACKING_PURE is set: installing pure Python")
        return []
    if {"egg_info", "dist_info"} & set(sys.argv[1:]):
        return []  # metadata only (pip asks for it before the build): nothing to translate yet
    try:
        from mypyc.build import mypycify

        started = time.monotonic()
        sources = [os.path.join(*name.split(".")) + ".py" for name in _build["COMPILED"]]
        modules: list[Any] = mypycify(sources, opt_level="3")
        _say(f"mypyc translated {len(sources)} modules in {time.monotonic() - started:.1f} s")
        return modules
    except (Exception, SystemExit) as exc:  # no mypyc, or it refused the source
        _say(f"mypyc unavailable or failed ({exc!r}); installing pure Python")
        return []


setup(ext_modules=_ext_modules(), cmdclass={"build_ext": _OptionalBuildExt})
