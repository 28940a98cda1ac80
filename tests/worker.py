"""A mapper process for tests, driven line by line over stdin/stdout.

    python tests/worker.py RUNTIME_DIR NAME [--eager] [--reconnect SECONDS]

Commands (one per line): `write GPA HEX`, `read GPA N`, `fill GPA BYTE N`, `ensure GPA N`,
`loop GPA N [OWN_GPA OWN_N]` (read until an error, in a thread; with OWN_*, each round
first fills that range with the round's byte and reads it back, a mismatch being an error,
and pauses a millisecond),
`loopstatus`, `sha GPA N` (sha256 of the bytes, hex), `mapped`, `eager`,
`nofile N` (allow N more open fds), `view GPA N` / `unview` (hold a view open), `quit`.
Answers: `ok [value]` or `err ExceptionClass message`.
"""

from __future__ import annotations

import hashlib
import sys
import threading
import time

from membacking import attach


def main() -> None:
    runtime_dir, name = sys.argv[1], sys.argv[2]
    eager = "--eager" in sys.argv[3:]
    extra = sys.argv[3:]
    reconnect = float(extra[extra.index("--reconnect") + 1]) if "--reconnect" in extra else 30.0
    loop_state = {"reads": 0, "error": ""}
    views: list[threading.Event] = []
    with attach(runtime_dir, name=name, eager=eager, reconnect_timeout=reconnect) as memory:
        print(f"ok {memory.mapper_id}", flush=True)

        def loop(gpa: int, n: int, own: int = 0, own_n: int = 0) -> None:
            try:
                while True:
                    if own_n:  # this mapper's own pattern: written, then verified
                        value = int(loop_state["reads"]) % 255 + 1
                        memory.fill_at(own, value, own_n)
                        if memory.read_at(own, own_n) != bytes([value]) * own_n:
                            raise AssertionError(f"{own:#x} does not hold {value:#x}")
                        time.sleep(0.001)  # a round a millisecond: many workers share 2 cores
                    memory.read_at(gpa, n)
                    loop_state["reads"] += 1
            except Exception as exc:  # the test wants to see exactly what ended the loop
                loop_state["error"] = f"{type(exc).__name__} {exc}"

        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            cmd, args = words[0], words[1:]
            try:
                if cmd == "quit":
                    print("ok", flush=True)
                    break
                if cmd == "write":
                    memory.write_at(int(args[0], 0), bytes.fromhex(args[1]))
                    print("ok", flush=True)
                elif cmd == "read":
                    print(
                        f"ok {memory.read_at(int(args[0], 0), int(args[1], 0)).hex()}", flush=True
                    )
                elif cmd == "fill":
                    memory.fill_at(int(args[0], 0), int(args[1], 0), int(args[2], 0))
                    print("ok", flush=True)
                elif cmd == "ensure":
                    memory.ensure_mapped(int(args[0], 0), int(args[1], 0))
                    print("ok", flush=True)
                elif cmd == "loop":
                    thread = threading.Thread(
                        target=loop, args=tuple(int(a, 0) for a in args[:4]), daemon=True
                    )
                    thread.start()
                    while loop_state["reads"] == 0 and not loop_state["error"]:
                        time.sleep(0.001)
                    print("ok", flush=True)
                elif cmd == "sha":
                    data = memory.read_at(int(args[0], 0), int(args[1], 0))
                    print(f"ok {hashlib.sha256(data).hexdigest()}", flush=True)
                elif cmd == "loopstatus":
                    print(f"ok {loop_state['reads']} {loop_state['error']}", flush=True)
                elif cmd == "view":
                    # hold a view open in a thread until `unview`
                    opened, release = threading.Event(), threading.Event()

                    def hold(
                        gpa: int, n: int, opened: threading.Event, release: threading.Event
                    ) -> None:
                        with memory.view(gpa, n):
                            opened.set()
                            release.wait()

                    holder = threading.Thread(
                        target=hold,
                        args=(int(args[0], 0), int(args[1], 0), opened, release),
                        daemon=True,
                    )
                    holder.start()
                    opened.wait(10)
                    views.append(release)
                    print("ok", flush=True)
                elif cmd == "unview":
                    views.pop().set()
                    print("ok", flush=True)
                elif cmd == "eager":
                    memory.make_eager()
                    print("ok", flush=True)
                elif cmd == "nofile":
                    # leave room for exactly N more fds (to make fd passing fail on purpose)
                    import os
                    import resource

                    # the limit bounds fd numbers: put it at the lowest free one (+ N), found
                    # with the limit lifted (a lower one may be in force already)
                    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
                    lowest_free = os.open("/dev/null", os.O_RDONLY)
                    os.close(lowest_free)
                    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free + int(args[0]), hard))
                    print("ok", flush=True)
                elif cmd == "mapped":
                    ranges = ",".join(f"{r.start:#x}-{r.end:#x}" for r, _ in memory.mapped_ranges())
                    print(f"ok {ranges}", flush=True)
                else:
                    print(f"err ValueError unknown command {cmd}", flush=True)
            except Exception as exc:  # report every failure to the test, keep serving
                print(f"err {type(exc).__name__} {exc}", flush=True)


if __name__ == "__main__":
    main()
