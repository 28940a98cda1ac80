"""Inspection reads allocate nothing: `mem read`, `mem dump`, `mem find` and `find_all` take
the bytes from the backing files, so guest memory never written reads as zeros and none of it
is allocated (a read through the mapping allocated every page it touched: a search of 64 MiB
of never-written RAM allocated 60 MiB of tmpfs)."""

from __future__ import annotations

from pathlib import Path

import membacking
from membacking.manager.statedir import default_state_dir
from membacking.mapper.peek import peek
from membacking.runtime import RuntimePaths

from conftest import RunningManager

MiB = 1 << 20


def _allocated(manager: RunningManager, name: str) -> int:
    """Bytes of region `name`'s memory file in the state directory that hold pages."""
    mem = default_state_dir(RuntimePaths.resolve(manager.runtime_dir)) / "mem"
    [path] = [p for p in mem.iterdir() if p.name.endswith(f".membacking:{name}")]
    return Path(path).stat().st_blocks * 512


def test_inspection_reads_allocate_no_page(manager: RunningManager) -> None:
    with membacking.attach(manager.runtime_dir, name="writer") as memory:
        memory.write_at(0x10_0000, b"needle")  # one page written
        before = _allocated(manager, "ram0")
        assert before <= 64 * 1024, before
        found = manager.cli("mem", "find", "--hex", b"needle".hex(), "--length", "64M")
        assert found.returncode == 0 and "0x100000" in found.stdout, found
        absent = manager.cli("mem", "find", "--hex", "0badc0de", "--length", "64M")
        assert absent.returncode == 0 and absent.stdout.strip() == "", absent
        dumped = manager.cli("mem", "read", "0", "16M")
        assert dumped.returncode == 0 and len(dumped.stdout.strip()) == 2 * 16 * MiB
        assert list(memory.find_all(b"needle", 0, 64 * MiB)) == [0x10_0000]
        assert _allocated(manager, "ram0") == before  # read, found, not allocated
        # what it reads is what is there, written or not, the read-only region's too
        assert peek(memory, 0x10_0000 - 2, 10) == b"\0\0needle\0\0"
        assert peek(memory, 0xFFF00000, 4) == memory.read_at(0xFFF00000, 4)
        with memory.view(0x20_0000, 8, write=True) as view:
            view[:3] = b"vw!"
            assert peek(memory, 0x20_0000, 3) == b"vw!"
