"""A mapper process that writes and verifies its own pattern, and reads the others', in a loop.

    python tests/pattern_mapper.py RUNTIME_DIR INDEX COUNT SLICE

Mapper INDEX owns bytes [INDEX*SLICE, (INDEX+1)*SLICE): each round fills them with the round's
byte, reads them back, and reads the last byte of every other slice (a failed access counts).
It prints `ok started` after its first round, runs until its stdin closes, then prints
`ok ROUNDS FAILURES LAST_BYTE` (the first failures on stderr).
"""

from __future__ import annotations

import sys
import threading

from membacking import attach


def main() -> None:
    runtime_dir, index, count, size = sys.argv[1], *(int(a, 0) for a in sys.argv[2:5])
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    rounds = failures = 0
    value = 0
    with attach(runtime_dir, name=f"pattern{index}", reconnect_timeout=30.0) as memory:
        while not done.is_set():
            value = (rounds + index) % 255 + 1
            try:
                memory.fill_at(index * size, value, size)
                if memory.read_at(index * size, size) != bytes([value]) * size:
                    raise AssertionError(f"slice {index} does not hold {value:#x}")
                for other in range(count):  # the others write theirs meanwhile: one byte
                    memory.read_at((other + 1) * size - 1, 1)
            except Exception as exc:  # counted and shown: the test wants none
                failures += 1
                if failures <= 3:
                    print(f"round {rounds}: {type(exc).__name__} {exc}", file=sys.stderr)
            rounds += 1
            if rounds == 1:
                print("ok started", flush=True)
    print(f"ok {rounds} {failures} {value}", flush=True)


if __name__ == "__main__":
    main()
