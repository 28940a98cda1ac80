"""Service gaps: how long mappers go unserved when the daemon is handed over (`manager run
--takeover`) and when it is SIGKILLed and started again, each beside a baseline of the same run.
Mapper processes ask the manager without pause (a read of a hole, answered by the manager each
time) while they read mapped memory, and record when each answer came back.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..manager.statelist import remove_state_of
from ..mapper.reconnect import BACKOFF_MAX

REGION = 64 << 10
BASE = 1 << 32
HOLE = 1 << 30  # no region there
#: how long the mappers ask before a daemon is replaced, and after
SETTLE = 1.0
#: the targets (seconds): a handover's gap, and a restart after a crash to every mapper served,
#: 1 s plus the mapper's backoff step (the longest pause between two registration tries)
HANDOVER_LIMIT = 0.050
RESTART_LIMIT = 1.0 + BACKOFF_MAX


def mapper_main(runtime_dir: str, regions: int) -> None:
    """One mapper process: map every region, then ask (and read mapped memory) until stdin
    closes; print the answers' count, failed accesses and every pause between two answers."""
    import membacking

    done = threading.Event()

    def watch_stdin() -> None:
        sys.stdin.read()
        done.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    answers: list[float] = []
    failures = 0
    with membacking.attach(runtime_dir, reconnect_timeout=30.0) as memory:
        for i in range(regions):
            memory.write_at(BASE + i * REGION, b"x")
        print("ready", flush=True)
        while not done.is_set():
            try:
                memory.read_at(HOLE, 1)
            except membacking.NoMappingError:
                answers.append(time.monotonic())
            except membacking.MembackingError:  # the wait for a daemon ran out: counted
                failures += 1
            try:
                if memory.read_at(BASE + (len(answers) % regions) * REGION, 1) != b"x":
                    failures += 1
            except membacking.MembackingError:
                failures += 1
    pauses = [(b - a, a) for a, b in itertools.pairwise(answers)]
    report = {"pid": os.getpid(), "answers": len(answers), "failures": failures}
    print(json.dumps({**report, "pauses": pauses}))


def longest(pauses: list[list[float]], start: float, end: float) -> float:
    """The longest pause that overlaps [start, end)."""
    return max((p for p, at in pauses if at < end and at + p > start), default=0.0)


def first_after(pauses: list[list[float]], moment: float) -> float:
    """When the first answer after `moment` came (the end of the pause `moment` falls in)."""
    return min((at + p for p, at in pauses if at + p > moment), default=float("inf"))


class _Service:
    """A runtime directory with its manager processes (one at a time) and mapper processes."""

    def __init__(self) -> None:
        self.runtime = Path(tempfile.mkdtemp(prefix="mbgap-", dir="/tmp"))
        self.env = dict(os.environ, MEMBACKING_RUNTIME_DIR=str(self.runtime))
        self.procs: list[subprocess.Popen[str]] = []
        self.mappers: list[subprocess.Popen[str]] = []

    def start(self, *extra: str) -> tuple[subprocess.Popen[str], float, float]:
        """A manager started with `extra`: the process, when it was started and when it said
        it was ready."""
        launched = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "membacking", "manager", "run", "--runtime-dir",
             str(self.runtime), "--log-level", "error", *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=self.env,
        )  # fmt: skip
        self.procs.append(proc)
        assert proc.stdout is not None
        if "ready" not in proc.stdout.readline():
            raise RuntimeError(f"the manager ({' '.join(extra)}) did not start")
        return proc, launched, time.monotonic()

    def spawn_mappers(self, count: int, regions: int) -> None:
        for _ in range(count):
            mapper = subprocess.Popen(
                [sys.executable, "-m", "membacking.bench.gaps", str(self.runtime), str(regions)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,  # each says it waits and registers again
                text=True,
                env=self.env,
            )
            self.procs.append(mapper)
            self.mappers.append(mapper)
        for mapper in self.mappers:
            assert mapper.stdout is not None
            select.select([mapper.stdout], [], [], 300)
            if mapper.stdout.readline().strip() != "ready":
                raise RuntimeError("a mapper process did not start")

    def results(self) -> list[dict[str, Any]]:
        """Stop the mappers' loops: what each recorded."""
        return [json.loads(m.communicate("", timeout=120)[0]) for m in self.mappers]

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        # a manager killed here (or in a case) left its state on /dev/shm: nothing needs it
        remove_state_of(self.runtime)
        shutil.rmtree(self.runtime, ignore_errors=True)


@contextlib.contextmanager
def _service() -> Iterator[_Service]:
    service = _Service()
    try:
        yield service
    finally:
        service.close()


@dataclass
class Gaps:
    """What one run measured (seconds)."""

    regions: int
    mappers: int
    #: handover: the longest pause any mapper had across it (last answer of the old daemon to
    #: the first of the new), and the longest in a window of the same length before it
    handover_gap: float
    handover_baseline: float
    takeover_start_to_ready: float
    old_exit_status: int | None
    #: crash: from the new daemon's start (and from its ready line) to the last mapper's first
    #: answer after the kill; the baseline: a new mapper's attach and first answer then
    restart_to_served: float
    ready_to_served: float
    restart_baseline: float
    failed_accesses: int


def measure(regions: int, mappers: int) -> Gaps:
    """Hand a manager with `regions` regions and `mappers` busy mapper processes over, then
    SIGKILL its successor and start a plain one on the same directory."""
    import membacking

    with _service() as service:
        old, _, _ = service.start()
        client = membacking.ControlClient(service.runtime)
        for i in range(regions):
            client.add_region(f"r{i}", BASE + i * REGION, REGION)
        client.close()
        service.spawn_mappers(mappers, regions)
        began = time.monotonic()
        time.sleep(SETTLE)
        new, asked, ready = service.start("--takeover")
        old_status = old.wait(30)
        time.sleep(SETTLE)
        new.kill()
        new.wait()
        killed = time.monotonic()
        _, launched, restarted = service.start()
        time.sleep(SETTLE)
        fresh = time.monotonic()
        with (
            membacking.attach(service.runtime) as memory,
            contextlib.suppress(membacking.NoMappingError),
        ):
            memory.read_at(HOLE, 1)
        fresh = time.monotonic() - fresh
        results = service.results()
    window = ready - asked
    pauses = [r["pauses"] for r in results]
    served = max(first_after(p, killed) for p in pauses)
    return Gaps(
        regions=regions,
        mappers=mappers,
        handover_gap=max(longest(p, asked, ready + 0.5) for p in pauses),
        handover_baseline=max(
            longest(p, max(began, asked - 0.2 - window), asked - 0.2) for p in pauses
        ),
        takeover_start_to_ready=window,
        old_exit_status=old_status,
        restart_to_served=served - launched,
        ready_to_served=served - restarted,
        restart_baseline=fresh,
        failed_accesses=sum(r["failures"] for r in results),
    )


if __name__ == "__main__":  # a mapper process of `measure`
    mapper_main(sys.argv[1], int(sys.argv[2]))
