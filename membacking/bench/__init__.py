"""Benchmarks: every measurement beside a raw baseline measured in the same run
(`python scripts/bench.py` or `membacking bench`). See docs/PERFORMANCE.md.
"""

from .runner import main

__all__ = ["main"]
