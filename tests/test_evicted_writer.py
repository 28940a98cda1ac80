"""A mapper evicted while it runs (an operator's `mapper evict`, strikes, an Unmap a view held
past --unmap-timeout) learns of it only when its mapper thread next turns; until its lease runs
out it may still write what it held. So a change that waited on it, or that comes right after
its eviction, completes only once that lease is over: after the answer, the evicted mapper
writes nothing, not even into memory that moved elsewhere."""

from __future__ import annotations

import mmap
import os
import struct
import subprocess
import sys
import time

import membacking

from conftest import RunningManager, cli_env

#: a mapper that writes a counter at GPA 0x40000000 as fast as it can, beside threads that
#: keep the interpreter lock busy (its mapper thread waits for the lock to learn anything)
WRITER = """
import sys, threading
import membacking
memory = membacking.attach(sys.argv[1], name="writer")
memory.write_plain(0x40000000, "<Q", 1)
def spin():
    while True:
        pass
for _ in range(8):
    threading.Thread(target=spin, daemon=True).start()
print(memory.mapper_id, flush=True)
n = 1
while True:
    n += 1
    try:
        memory.write_plain(0x40000000, "<Q", n)
    except membacking.MembackingError:
        break
print("stopped", flush=True)
sys.stdin.read()
"""


def test_a_region_moved_after_an_eviction_gets_no_write_of_the_evicted(
    manager: RunningManager,
) -> None:
    client = manager.client()
    client.add_region("ev", 0x40000000, 1 << 20)
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(manager.runtime_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=cli_env(),
        text=True,
    )
    reader = membacking.attach(manager.runtime_dir, name="reader")
    [lent] = reader.sharing(["ev"]) or []  # the region's memory itself, as a third party sees it
    seen = mmap.mmap(lent.fd, lent.size, mmap.MAP_SHARED, mmap.PROT_READ, offset=lent.file_offset)
    try:
        assert writer.stdout is not None
        mapper_id = int(writer.stdout.readline())
        deadline = time.monotonic() + 30
        while struct.unpack_from("<Q", seen)[0] < 100:  # writing, before it is evicted
            assert time.monotonic() < deadline, "the writer never wrote"
            time.sleep(0.01)
        client.evict_mapper(mapper_id)
        client.move_region("ev", 0x80000000)  # the same memory, now at another GPA
        first = struct.unpack_from("<Q", seen)[0]
        time.sleep(0.3)
        later = struct.unpack_from("<Q", seen)[0]
        assert first > 1 and later == first, (first, later)
        assert reader.read_plain(0x80000000, "<Q") == first
        assert writer.stdout.readline().strip() == "stopped"  # it learned, and stopped
    finally:
        writer.kill()
        writer.wait(10)
        seen.close()
        os.close(lent.fd)
        reader.detach()
