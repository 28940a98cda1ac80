"""A mapper that rides through a crash with a view open on memory a removal was cutting: the
Unmap the dead manager sent, which the view deferred, is not applied once the view closes. The
mapper told the new manager it holds that mapping and its fd (Holdings); applied later, the old
Unmap dropped both, and every later fault of the region failed ("the manager did not send the
fd of mappable N") while the new manager, whose journal kept the region, served it."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest

import membacking
from membacking.errors import NoMappingError

from conftest import RunningManager, cli_env

DYN = 0x10000000


def test_a_view_open_across_a_crash_mid_removal_leaves_the_mapper_consistent(
    start_manager: Callable[..., RunningManager],
) -> None:
    regions = ("--region", "ram0=0:16M", "--region", "dyn=0x10000000:2M", "--unmap-timeout", "5")
    first = start_manager(*regions)
    with membacking.attach(first.runtime_dir, name="holder") as memory:
        memory.write_at(DYN, b"\x01\x02\x03\x04")
        again = threading.Event()
        memory.on_registered_again(lambda kept, old_id: again.set())
        with memory.view(DYN, 4096, write=True) as view:
            remover = subprocess.Popen(
                [sys.executable, "-m", "membacking", "region", "remove", "dyn"],
                env=cli_env(first.runtime_dir),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 10
            while not memory._mapper._pending_unmaps:  # its Unmap came, deferred by the view
                assert time.monotonic() < deadline
                time.sleep(0.005)
            first.stop(signal.SIGKILL)  # before the removal completes or is journaled
            remover.wait(30)
            second = start_manager(*regions[:4], runtime_dir=first.runtime_dir)
            assert again.wait(15)
            view[0:4] = b"\xaa\xbb\xcc\xdd"
        kept = [r["name"] for r in second.client().regions()]
        if "dyn" in kept:  # the usual outcome: the removal was never journaled
            assert memory.read_at(DYN, 4) == b"\xaa\xbb\xcc\xdd"
            memory.write_at(DYN + 8, b"more")
            assert (
                second.cli("mem", "read", hex(DYN), "12").stdout.split()[-1].startswith("aabbccdd")
            )
        else:  # journaled by a tick before the kill: gone for this mapper too
            with pytest.raises(NoMappingError):
                memory.read_at(DYN, 4)
