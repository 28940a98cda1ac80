"""A program a mapper's process runs (os.system, a subprocess that keeps its fds, an exec) holds
none of the guest memory files the manager sent: every fd received over SCM_RIGHTS is
close-on-exec, so a removal's Unmap binds every process that could reach the memory."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import membacking

from conftest import RunningManager

#: the child prints the target of each of its open fds, one per line
LIST_FDS = (
    "import os\n"
    "for fd in os.listdir('/proc/self/fd'):\n"
    "    try:\n"
    "        print(os.readlink('/proc/self/fd/' + fd))\n"
    "    except OSError:\n"
    "        pass\n"
)


def _targets(fds: list[int]) -> set[str]:
    out = set()
    for fd in fds:
        with contextlib.suppress(OSError):
            out.add(os.readlink(f"/proc/self/fd/{fd}"))
    return out


def test_a_program_the_mapper_runs_inherits_no_guest_memory_file(
    manager: RunningManager, tmp_path: object
) -> None:
    client = manager.client()
    client.add_region("dev", 0x40000000, 1 << 20)
    with membacking.attach(str(manager.runtime_dir), name="execs") as mem:
        mem.write_at(0x1000, b"ram")
        mem.write_at(0x40000000, b"dev")
        mem.read_at(0xFFF00000, 8)  # the read-only region's fd too
        held = [fd for _, fd in mem._mapper.fds.held()]
        assert len(held) == 3, held
        assert not any(os.get_inheritable(fd) for fd in held)
        files = _targets(held)
        kept = subprocess.run(
            [sys.executable, "-c", LIST_FDS],
            close_fds=False,  # what os.system, posix_spawn and a bare exec do too
            capture_output=True,
            text=True,
            check=True,
        )
        seen = set(kept.stdout.splitlines())
        assert seen, "the child listed no fd at all"
        assert not files & seen, f"the child inherited guest memory: {sorted(files & seen)}"
        # the memory stays the parent's alone: a removal leaves no other holder
        assert client.remove_region("dev")["unmapped_from"] == [mem.mapper_id]
        assert mem.read_at(0x1000, 3) == b"ram"
