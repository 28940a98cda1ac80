"""A mapper process that hammers one guest word, for the cross-process atomicity tests.

    python tests/plain_worker.py RUNTIME_DIR NAME GPA FMT MODE [ARG]

It attaches, maps GPA, prints `ready`, waits for a line on stdin, runs MODE, prints one JSON
line with its result and detaches. Modes:
  write SECONDS   alternate write_plain of the all-0xFF and all-0xA5 values of FMT, until the
                  reader is done (or SECONDS pass)
  read SECONDS    read_plain until a value other than those two shows up, or SECONDS pass
                  having seen the value change 1,000 times (else 5 x SECONDS):
                  {"reads", "changes" (times the value read changed), "bad" (or null)}
  add N           N fetch_add of 1
  cas N           N increments by compare_exchange (retried until they succeed)
"""

from __future__ import annotations

import json
import struct
import sys
import time

from membacking import attach


def both_values(fmt: str) -> tuple[int, int]:
    size = struct.calcsize(fmt)
    a: int = struct.unpack(fmt, b"\xff" * size)[0]
    b: int = struct.unpack(fmt, b"\xa5" * size)[0]
    return a, b


def main() -> None:
    runtime_dir, name, gpa_text, fmt, mode, arg = sys.argv[1:7]
    gpa = int(gpa_text, 0)
    stop = (gpa & ~0xFFF) + 0x800  # the reader sets this byte when it is done
    with attach(runtime_dir, name=name) as memory:
        memory.ensure_mapped(gpa & ~0xFFF, 0x1000, write=True)
        a, b = both_values(fmt)
        result: dict[str, object] = {}
        if mode == "write":
            memory.write_plain(gpa, fmt, a)  # before the reader starts
        print("ready", flush=True)
        sys.stdin.readline()
        if mode == "write":
            write, read = memory.write_plain, memory.read_plain
            deadline = time.monotonic() + float(arg)
            writes = 0
            while time.monotonic() < deadline and not read(stop, "B"):
                for _ in range(500):
                    write(gpa, fmt, a)
                    write(gpa, fmt, b)
                writes += 1000
            result = {"writes": writes}
        elif mode == "read":
            read = memory.read_plain
            start = time.monotonic()
            reads = changes = 0
            bad = previous = None
            while bad is None:
                for _ in range(1000):
                    value = read(gpa, fmt)
                    if value != previous:
                        if value != a and value != b:
                            bad = value
                            break
                        changes += 1
                        previous = value
                reads += 1000
                elapsed = time.monotonic() - start
                if elapsed > float(arg) * (1 if changes >= 1000 else 5):
                    break
            memory.write_plain(stop, "B", 1)
            result = {"reads": reads, "changes": changes, "bad": bad}
        elif mode == "add":
            for _ in range(int(arg)):
                memory.fetch_add(gpa, fmt, 1)
        elif mode == "cas":
            retries = 0
            for _ in range(int(arg)):
                old = memory.read_plain(gpa, fmt)
                while True:
                    ok, old = memory.compare_exchange(gpa, fmt, old, old + 1)
                    if ok:
                        break
                    retries += 1
            result = {"retries": retries}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
