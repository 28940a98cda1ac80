"""RAM regions in a state directory and the room its file system has: a region the file system
could not hold once touched is refused, and `status` says when other files took the room. A
RAM file's pages are allocated as they are first touched; a touch with no room left killed the
process making it with SIGBUS, a read as much as a write (64 MiB regions on a 16 MiB tmpfs were
accepted, and the first read past the full tmpfs killed `membacking mem read`)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import RunningManager, run_cli, short_tmpdir

MiB = 1 << 20


@contextlib.contextmanager
def _tmpfs(size: str) -> Iterator[Path]:
    """A tmpfs of its own (mounting one needs root)."""
    where = short_tmpdir("mbfs-")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or 'not root'}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture
def small_tmpfs() -> Iterator[Path]:
    with _tmpfs("16m") as where:
        yield where


def test_a_region_the_file_system_could_not_hold_is_refused(
    start_manager: Callable[..., RunningManager], small_tmpfs: Path
) -> None:
    state = small_tmpfs / "state"
    refused = run_cli(
        "manager",
        "run",
        "--runtime-dir",
        str(short_tmpdir() / "rt"),
        "--state-dir",
        str(state),
        "--region",
        "ram0=0:64M",
    )
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "MiB free" in refused.stderr and "could take 64 MiB" in refused.stderr, refused.stderr
    assert "SIGBUS" in refused.stderr and "--no-state" in refused.stderr

    manager = start_manager("--state-dir", str(state), "--region", "ram0=0:8M")
    added = manager.cli("region", "add", "more", "0x10000000", "12M")
    assert added.returncode == 1 and "could take 20 MiB" in added.stderr, added.stderr
    assert manager.cli("region", "add", "more", "0x10000000", "4M").returncode == 0
    # what is allocated already is not counted again: 8 MiB written, then 6 more fit
    assert manager.cli("mem", "fill", "0", "8M", "0xab").returncode == 0
    assert manager.cli("region", "remove", "more").returncode == 0
    assert manager.cli("region", "add", "more", "0x10000000", "6M").returncode == 0
    assert "SIGBUS" not in manager.cli("status").stdout


def test_status_says_when_other_files_took_the_room(
    start_manager: Callable[..., RunningManager], small_tmpfs: Path
) -> None:
    manager = start_manager("--state-dir", str(small_tmpfs / "state"), "--region", "ram0=0:12M")
    assert "SIGBUS" not in manager.cli("status").stdout
    with open(small_tmpfs / "other", "wb") as other, contextlib.suppress(OSError):
        other.write(b"x" * (10 * MiB))  # another process of the uid fills the tmpfs
    status = manager.cli("status")
    assert "degraded" in status.stdout and "SIGBUS" in status.stdout, status.stdout
    os.unlink(small_tmpfs / "other")
    assert "SIGBUS" not in manager.cli("status").stdout


def test_a_file_system_without_a_size_limit_is_not_checked(
    start_manager: Callable[..., RunningManager],
) -> None:
    """A tmpfs of size=0 (unlimited) counts no blocks: statvfs says 0 free. Every RAM region
    was refused there, so the manager could not start."""
    with _tmpfs("0") as unlimited:
        manager = start_manager("--state-dir", str(unlimited / "s"), "--region", "ram0=0:64M")
        assert manager.cli("region", "add", "more", "0x10000000", "64M").returncode == 0
        assert "SIGBUS" not in manager.cli("status").stdout
        manager.stop()


def test_status_and_region_add_after_the_state_directory_was_removed(
    start_manager: Callable[..., RunningManager], small_tmpfs: Path
) -> None:
    """`state remove --force` under a running manager: `status` answers, and a RAM region
    cannot be added, in one clean line. Both failed with the raw errno of the
    room check (and a traceback in the daemon's log)."""
    state = small_tmpfs / "state"
    manager = start_manager("--state-dir", str(state), "--region", "ram0=0:4M")
    assert run_cli("manager", "state", "remove", "--force", str(state)).returncode == 0
    status = manager.cli("status")
    assert status.returncode == 0 and "Errno" not in status.stdout + status.stderr, status
    added = manager.cli("region", "add", "more", "0x10000000", "4M")
    assert added.returncode == 1 and "cannot create the memory of more" in added.stderr, added
    assert "Errno" not in added.stderr and "Traceback" not in manager.log()


def test_a_change_the_full_file_system_kept_from_the_journal_is_journaled_once_there_is_room(
    start_manager: Callable[..., RunningManager],
) -> None:
    """A removal answered while the state directory's tmpfs was full could not be journaled.
    The save was not tried again once there was room (only a later change wrote the journal),
    and the removed region's memory file was unlinked at the next tick while the journal on
    disk still named it: a restart after a crash then refused the whole state (all guest
    memory kept behind --fresh). Now the save is tried each second until it works, and the
    file goes only once a journal without it is written."""
    with _tmpfs("64m") as where:
        state = where / "state"
        manager = start_manager("--state-dir", str(state), "--region", "ram0=0:32M")
        assert manager.cli("region", "add", "big", "0x10000000", "16M").returncode == 0
        assert manager.cli("mem", "fill", "0", "32M", "0x5a").returncode == 0
        with open(where / "filler", "wb") as filler, contextlib.suppress(OSError):
            filler.write(b"x" * (64 * MiB))  # another process takes the rest of the tmpfs
        removed = manager.cli("region", "remove", "big")  # done, and said not to be journaled
        assert removed.returncode == 0 and "warning: done, but not journaled" in removed.stderr
        time.sleep(1.5)  # a tick or more
        assert list((state / "mem").glob("*big")), "unlinked while the journal names it"
        assert "cannot journal" in manager.cli("status").stdout
        os.unlink(where / "filler")
        deadline = time.monotonic() + 10
        while "cannot journal" in manager.cli("status").stdout:  # journaled again by a tick
            assert time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(1.2)
        assert not list((state / "mem").glob("*big"))
        assert not (state / "journal.tmp").exists()
        added = manager.cli("region", "add", "--json", "small", "0x20000000", "1M")
        assert added.returncode == 0 and not added.stderr and "not_journaled" not in added.stdout
        manager.stop(signal.SIGKILL)
        again = start_manager("--state-dir", str(state), runtime_dir=manager.runtime_dir)
        assert [r["name"] for r in again.client().regions()] == ["ram0", "small"]
        assert again.cli("mem", "read", "0x1fff000", "4").stdout.split()[-1] == "5a5a5a5a"
        again.stop()


def test_prealloc_allocates_ram_at_creation_so_no_touch_finds_the_tmpfs_full(
    start_manager: Callable[..., RunningManager], small_tmpfs: Path
) -> None:
    """`--prealloc`: a RAM region's memory is allocated when it is made, so another process
    filling the tmpfs later cannot make a first touch of it die with SIGBUS (without it, a read
    of a page never touched did: `membacking mem read` exited 135)."""
    manager = start_manager(
        "--state-dir", str(small_tmpfs / "state"), "--prealloc", "--region", "ram0=0:8M"
    )
    fs = os.statvfs(small_tmpfs)
    assert (fs.f_blocks - fs.f_bfree) * fs.f_frsize >= 8 * MiB  # allocated at once
    with open(small_tmpfs / "filler", "wb") as filler, contextlib.suppress(OSError):
        filler.write(b"x" * (16 * MiB))  # another process takes the rest of the tmpfs
    read = manager.cli("mem", "read", "0x7ff000", "4")  # never touched before
    assert read.returncode == 0 and read.stdout.split()[-1] == "00000000", read
    added = manager.cli("region", "add", "more", "0x10000000", "1M")
    assert added.returncode == 1 and "Traceback" not in manager.log(), added
    os.unlink(small_tmpfs / "filler")


def test_prealloc_with_memfd_ram(start_manager: Callable[..., RunningManager]) -> None:
    manager = start_manager("--no-state", "--prealloc", "--region", "ram0=0:8M")
    assert manager.cli("mem", "read", "0x7ff000", "4").stdout.split()[-1] == "00000000"
    assert manager.cli("region", "add", "--readonly", "rom", "0x10000000", "1M").returncode == 0
    assert manager.cli("mem", "read", "0x10000000", "4").stdout.split()[-1] == "00000000"
