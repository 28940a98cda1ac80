"""QEMU on membacking against QEMU on its own memory: `python scripts/qemu_bench.py [--runs N]`.

Boot to firmware-ready (SeaBIOS prints its e820 map on the debug port, 0x402, when POST is
done), alternating three variants in one run: QEMU with `memory-backend-memfd` (the baseline),
the same QEMU with its RAM a membacking region's fd, and the whole `membacking qemu run`
launcher. Then `GuestMemory.find` over 64 MiB against `bytes.find`-style search of an mmap of
the same fd. Prints medians and ratios against the baselines; needs qemu-system-x86_64.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from membacking.manager.statelist import remove_state_of
from membacking.mapper import attach
from membacking.qemu.binary import find_qemu
from membacking.qemu.launcher import kvm_usable

MiB = 1 << 20
READY = b"e820 map has"
QUIET = ["-nodefaults", "-display", "none", "-serial", "none"]


def debugcon(path: Path) -> list[str]:
    return [
        "-chardev",
        f"file,id=dbg,path={path}",
        "-device",
        "isa-debugcon,iobase=0x402,chardev=dbg",
    ]


def time_to_ready(argv: list[str], log: Path, pass_fds: tuple[int, ...] = ()) -> float:
    """Seconds from spawning `argv` until `log` shows the firmware is ready."""
    log.unlink(missing_ok=True)
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv, pass_fds=pass_fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        while True:
            if log.exists() and READY in log.read_bytes():
                return time.perf_counter() - start
            if proc.poll() is not None:
                raise RuntimeError(f"QEMU exited with {proc.returncode}: {argv}")
            if time.perf_counter() - start > 60:
                raise RuntimeError("firmware not ready in 60 s")
            time.sleep(0.002)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    qemu, version = find_qemu()
    accel = "kvm" if kvm_usable() else "tcg"
    work = Path(tempfile.mkdtemp(prefix="mbq-", dir="/tmp"))
    runtime = work / "rt"
    manager = subprocess.Popen(
        [
            *(sys.executable, "-m", "membacking", "manager", "run"),
            *("--runtime-dir", str(runtime), "--region", "ram=0:64M"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert manager.stdout is not None
        manager.stdout.readline()
        log = work / "dbg.log"
        common = [qemu, "-accel", accel, *QUIET, *debugcon(log)]
        memory = attach(runtime, name="bench")
        shares = memory.sharing()
        assert shares
        fd = shares[0].fd
        variants: dict[str, Callable[[], float]] = {
            "memfd": lambda: time_to_ready(
                [
                    *common,
                    "-machine",
                    "pc,memory-backend=ram",
                    "-m",
                    "64M",
                    "-object",
                    "memory-backend-memfd,id=ram,size=64M,share=on",
                ],
                log,
            ),
            "membacking fd": lambda: time_to_ready(
                [
                    *common,
                    "-machine",
                    "pc,memory-backend=ram",
                    "-m",
                    "64M",
                    "-object",
                    f"memory-backend-file,id=ram,mem-path=/proc/self/fd/{fd},size={64 * MiB},"
                    "share=on",
                ],
                log,
                (fd,),
            ),
            "membacking qemu run": lambda: time_to_ready(
                [
                    sys.executable,
                    "-m",
                    "membacking",
                    "qemu",
                    "run",
                    "--runtime-dir",
                    str(runtime),
                    "--name",
                    "bench",
                    "--accel",
                    accel,
                    "--",
                    *QUIET,
                    *debugcon(log),
                ],
                log,
            ),
        }
        times: dict[str, list[float]] = {k: [] for k in variants}
        order = list(variants)
        for i in range(args.runs):  # rotate the order: no variant always runs first
            for name in order[i % 3 :] + order[: i % 3]:
                times[name].append(variants[name]())
        print(
            f"QEMU {'.'.join(map(str, version))}, {accel}, 64 MiB, {args.runs} runs each "
            "(median seconds to firmware-ready):"
        )
        base, floor = statistics.median(times["memfd"]), min(times["memfd"])
        for name, values in times.items():
            med, low = statistics.median(values), min(values)
            spread = " ".join(f"{v:.2f}" for v in sorted(values))
            print(
                f"  {name:22s} median {med:.3f} s x{med / base:.3f}, fastest {low:.3f} s "
                f"x{low / floor:.3f}   ({spread})"
            )

        marker = os.urandom(16)
        memory.write_at(64 * MiB - 16, marker)
        found: list[float] = []
        plain: list[float] = []
        with mmap.mmap(fd, 64 * MiB, mmap.MAP_SHARED, mmap.PROT_READ) as view:
            for _ in range(args.runs):
                t = time.perf_counter()
                assert memory.find(marker, 0, 64 * MiB) == 64 * MiB - 16
                found.append(time.perf_counter() - t)
                t = time.perf_counter()
                assert view.find(marker) == 64 * MiB - 16
                plain.append(time.perf_counter() - t)
        f, p = statistics.median(found), statistics.median(plain)
        print(
            f"find 16 bytes in 64 MiB: GuestMemory.find {f * 1e3:.1f} ms, mmap.find "
            f"{p * 1e3:.1f} ms   x{f / p:.2f}"
        )
        os.close(fd)
        memory.detach()
    finally:
        manager.send_signal(signal.SIGTERM)
        try:
            manager.wait(15)
        except subprocess.TimeoutExpired:
            manager.kill()
            manager.wait()
        remove_state_of(runtime)  # what a manager killed above kept on /dev/shm
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
