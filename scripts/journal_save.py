"""What the journal's save costs per change as one region gains holes (no daemon, no sockets).

Drives the real state machine: one region gets `unmap_range` holes one page apart, and at 351,
5,051 and N+51 pieces, 50 more changes are each followed by the save a daemon with a state
directory makes (`JournalEncoder.encode`, then `write_atomically` to a file in /dev/shm); prints
the median of each part.
Run: python scripts/journal_save.py [N]   (default 31000)
"""

from __future__ import annotations

import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from membacking.manager.backing import MemfdStore
from membacking.manager.journal import write_atomically
from membacking.manager.journalcache import JournalEncoder
from membacking.manager.model import Limits
from membacking.manager.state import ManagerState
from membacking.protocol import messages as m

PAGE = 4096


def main() -> None:
    logging.disable(logging.WARNING)
    holes_max = int(sys.argv[1]) if len(sys.argv) > 1 else 31_000
    store = MemfdStore()
    state = ManagerState(store, limits=Limits(max_regions=100, max_mappers=10))
    size = (2 * holes_max + 1000) * PAGE
    add = {"name": "big", "gpa": 1 << 30, "size": size}
    state.handle_control(b"c", m.ControlRequest("add_region", add))
    encoder = JournalEncoder()
    folder = Path(tempfile.mkdtemp(dir="/dev/shm"))
    made = 0

    def hole() -> None:
        nonlocal made
        args = {"name": "big", "offset": (2 * made + 1) * PAGE, "size": PAGE}
        state.handle_control(b"c", m.ControlRequest("unmap_range", args))
        made += 1

    try:
        for target in (300, 5_000, holes_max):
            while made < target:
                hole()
                if made % 500 == 0:
                    encoder.encode(state, store, bytes(16), "/run/x")
            encoder.encode(state, store, bytes(16), "/run/x")
            encoded, written = [], []
            for _ in range(50):
                hole()
                started = time.perf_counter()
                data = encoder.encode(state, store, bytes(16), "/run/x")
                packed = time.perf_counter()
                write_atomically(folder / "journal", data)
                encoded.append((packed - started) * 1e3)
                written.append((time.perf_counter() - packed) * 1e3)
            print(
                f"{len(state.regions['big'].submappings)} pieces: journal {len(data)} bytes, "
                f"encode median {statistics.median(encoded):.2f} ms, "
                f"write median {statistics.median(written):.2f} ms"
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        store.close_all()


if __name__ == "__main__":
    main()
