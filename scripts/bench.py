"""Run the membacking benchmarks: `python scripts/bench.py [--quick] [--json FILE]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from membacking.bench import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer rounds")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()
    sys.exit(main(quick=args.quick, json_path=args.json))
