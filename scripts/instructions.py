"""Instructions per fault and removal, counted by callgrind: `python scripts/instructions.py`.

Times on this machine move 3x between runs; instruction counts repeat to within a fraction of a
percent, so a change to the Python on a fault's path is judged here first. Each round adds a
4 KiB region, has one mapper fault it in, and removes it (the Unmap acknowledged). The manager
and the mapper each run under `valgrind --tool=callgrind`, counted only over the measured
rounds. With `--thin` the mapper is the benchmark's thin one (membacking/bench/thin.py): the
same rounds with the least mapper code the protocol allows, to tell membacking's share.
`--no-state` runs the manager with `--no-state`, so that no round pays for a journal save.
`--by-step` adds every region first, then faults each, then removes each, and counts the three
steps apart (one callgrind dump after each).
`--by-object` adds how the instructions split between the interpreter, libzmq, msgpack, libc
and the rest; `--keep DIR` keeps callgrind's files there, for `callgrind_annotate`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from membacking.control_client import ControlClient
from membacking.manager.statelist import remove_state_of

GPA = 1 << 32
#: valgrind cannot reserve the default 1 TiB of address space for a mapper
ADDRESS_SPACE = "8G"


def _mapper_child(runtime_dir: str, thin: bool) -> None:
    """Attach, then fault in the GPA of each `read GPA` line from stdin, answering `ok`."""
    from membacking import attach

    if thin:
        from membacking.bench.thin import ThinMapper

        with ThinMapper(runtime_dir, "counted") as mapper:
            _serve(mapper.read_at)
    else:
        with attach(runtime_dir, name="counted", timeout=120, fault_timeout=120) as memory:
            _serve(lambda gpa: memory.read_at(gpa, 1))


def _serve(read: Callable[[int], object]) -> None:
    print("ok", flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        read(int(line.split()[1]))
        print("ok", flush=True)


def _callgrind(out: Path, *command: str) -> list[str]:
    tool = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    return [*tool, *command]


def _switch(pid: int, on: bool) -> None:
    _control("-i", "on" if on else "off", pid)


def _control(*args: str | int) -> None:
    subprocess.run(
        ["callgrind_control", *map(str, args)], capture_output=True, check=True, timeout=120
    )


#: the steps `--by-step` counts apart, in the order it makes them
STEPS = ("add", "fault", "remove")


def _by_object(out: Path) -> dict[str, int]:
    """Instructions by shared object (self cost: the cost lines of each function, not the
    inclusive cost callgrind writes after each `calls=` line)."""
    names: dict[str, str] = {}
    current = "?"
    skip_next = False
    costs: dict[str, int] = {}
    for line in out.read_text(errors="replace").splitlines():
        if line.startswith(("ob=", "cob=")):
            ref, _, name = line.split("=", 1)[1].partition(" ")
            if name:
                names[ref] = name
            if line.startswith("ob="):
                current = os.path.basename(names.get(ref, ref))
        elif line.startswith("calls="):
            skip_next = True
        elif line[:1].isdigit() or line[:1] in "+-*":
            if skip_next:
                skip_next = False
                continue
            parts = line.split()
            if len(parts) >= 2:
                costs[current] = costs.get(current, 0) + int(parts[1])
    return costs


def _total(out: Path) -> int:
    """The instruction total callgrind wrote for one process."""
    for line in out.read_text().splitlines():
        if line.startswith("totals:"):  # ("summary:" stays 0 when counting starts switched off)
            return int(line.split()[1])
    raise RuntimeError(f"no instruction total in {out}")


def count(
    rounds: int,
    thin: bool = False,
    warmup: int = 10,
    keep: Path | None = None,
    by_object: bool = False,
    no_state: bool = False,
    steps_apart: bool = False,
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="mb-instr-", dir="/tmp"))
    runtime = work / "run"
    manager_out, mapper_out = work / "manager.out", work / "mapper.out"
    options = [
        "--runtime-dir",
        str(runtime),
        "--address-space",
        ADDRESS_SPACE,
        "--log-level",
        "error",
        *(["--no-state"] if no_state else []),
    ]
    manager = subprocess.Popen(
        _callgrind(manager_out, sys.executable, "-m", "membacking", "manager", "run", *options),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    mapper: subprocess.Popen[str] | None = None
    try:
        assert manager.stdout is not None
        if not manager.stdout.readline().startswith("membacking manager ready"):
            raise RuntimeError("the manager did not start under valgrind")
        client = ControlClient(runtime, timeout=120)
        mapper = subprocess.Popen(
            _callgrind(
                mapper_out,
                sys.executable,
                __file__,
                "--thin-child" if thin else "--mapper-child",
                str(runtime),
            ),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert mapper.stdin is not None and mapper.stdout is not None
        if mapper.stdout.readline().strip() != "ok":
            raise RuntimeError("the mapper did not attach under valgrind")

        def fault(gpa: int) -> None:
            assert mapper is not None and mapper.stdin is not None and mapper.stdout is not None
            mapper.stdin.write(f"read {gpa}\n")
            mapper.stdin.flush()
            if mapper.stdout.readline().strip() != "ok":
                raise RuntimeError("the mapper failed a fault")

        def one_round() -> None:
            client.add_region("counted", GPA, 4096)
            fault(GPA)
            client.remove_region("counted")

        def by_step() -> None:
            """Each step for every region, then the next: counts dumped after each step."""
            names = [f"counted{i}" for i in range(rounds)]
            steps: tuple[Callable[[int, str], object], ...] = (
                lambda i, name: client.add_region(name, GPA + i * 8192, 4096),
                lambda i, name: fault(GPA + i * 8192),
                lambda i, name: client.remove_region(name),
            )
            for step in steps:
                for i, name in enumerate(names):
                    step(i, name)
                for pid in (manager.pid, mapper.pid):
                    _control("--dump", pid)

        for _ in range(warmup):
            one_round()
        for pid in (manager.pid, mapper.pid):
            _switch(pid, True)
        started = time.perf_counter()
        if steps_apart:
            by_step()
        else:
            for _ in range(rounds):
                one_round()
        elapsed = time.perf_counter() - started
        for pid in (manager.pid, mapper.pid):
            _switch(pid, False)
        mapper.stdin.write("quit\n")
        mapper.stdin.flush()
        mapper.wait(120)
        manager.terminate()
        manager.wait(120)
        result: dict[str, Any] = {
            "rounds": rounds,
            "manager_per_round": _total(manager_out) / rounds,
            "mapper_per_round": _total(mapper_out) / rounds,
            "seconds_under_valgrind": elapsed,
        }
        if steps_apart:  # callgrind wrote one file per dump: OUT.1, OUT.2, ... in step order
            for side, out in (("manager", manager_out), ("mapper", mapper_out)):
                for n, step in enumerate(STEPS, 1):
                    dump = out.with_name(f"{out.name}.{n}")
                    result[f"{side}_per_{step}"] = _total(dump) / rounds
                result[f"{side}_per_round"] = sum(result[f"{side}_per_{s}"] for s in STEPS)
        if by_object:
            for side, out in (("manager", manager_out), ("mapper", mapper_out)):
                result[f"{side}_by_object"] = {
                    k: v / rounds for k, v in sorted(_by_object(out).items(), key=lambda kv: -kv[1])
                }
        return result
    finally:
        for proc in (mapper, manager):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        remove_state_of(runtime)  # what a manager killed above kept on /dev/shm
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            for out in (manager_out, mapper_out):
                if out.exists():
                    shutil.copy(out, keep / out.name)
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] in ("--mapper-child", "--thin-child"):
        _mapper_child(sys.argv[2], thin=sys.argv[1] == "--thin-child")
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200, help="rounds counted (default 200)")
    parser.add_argument("--json", type=Path, help="also write the counts to this file")
    parser.add_argument(
        "--thin", action="store_true", help="count the benchmark's thin mapper instead"
    )
    parser.add_argument(
        "--keep", type=Path, metavar="DIR", help="keep callgrind's manager.out and mapper.out here"
    )
    parser.add_argument(
        "--by-object", action="store_true", help="also split each count by shared object"
    )
    parser.add_argument(
        "--no-state",
        action="store_true",
        help="run the manager with --no-state (no journal save per change)",
    )
    parser.add_argument(
        "--by-step",
        action="store_true",
        help="add every region, then fault each, then remove each, and count each step apart",
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("instructions.py needs valgrind (with callgrind_control) on PATH", file=sys.stderr)
        return 2
    result = count(
        args.rounds,
        args.thin,
        keep=args.keep,
        by_object=args.by_object,
        no_state=args.no_state,
        steps_apart=args.by_step,
    )
    print(f"instructions per round of add region, fault, remove ({args.rounds} rounds counted)")
    print(f"  manager   {result['manager_per_round']:>12,.0f}")
    print(f"  mapper    {result['mapper_per_round']:>12,.0f}{'  (thin)' if args.thin else ''}")
    if args.by_step:
        print("each step apart (every region added, then each faulted, then each removed):")
        for step in STEPS:
            manager, mapper = result[f"manager_per_{step}"], result[f"mapper_per_{step}"]
            print(f"  {step:<8} manager {manager:>12,.0f}   mapper {mapper:>10,.0f}")
    for side in ("manager", "mapper") if args.by_object else ():
        costs = result[f"{side}_by_object"]
        total = sum(costs.values())
        print(f"{side}, by shared object:")
        for name, per_round in list(costs.items())[:6]:
            print(f"  {per_round:>12,.0f}  {per_round / total:6.1%}  {name}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
