"""The state journal: one versioned structure (round trip, the first version read by this
release, corrupt or foreign input refused), written atomically; and the snapshot of a live state
machine restored into a new one with its tmpfs-file backings re-adopted (or refused)."""

from __future__ import annotations

import dataclasses
import os
import zlib
from pathlib import Path

import msgpack
import pytest

from membacking.manager import journal
from membacking.manager.backing import MemfdStore
from membacking.manager.journal import (
    BackingRecord,
    JournalError,
    MapperRecord,
    RegionRecord,
    Snapshot,
    SubMappingRecord,
)
from membacking.manager.snapshot import capture, check_fits, restore
from membacking.manager.state import ManagerState, region_info
from membacking.manager.statedir import StateDir, StateDirError

MiB = 1 << 20

SAMPLE = Snapshot(
    bytes(range(16)),
    0,
    "/run/membacking",
    1 << 40,
    3,
    2,
    5,
    (
        RegionRecord(
            "ram0", 0x400000, 0, 0, True, "memfd", 0, True, None,
            (SubMappingRecord(0, 0x400000, 1, 0, True),),
        ),
        RegionRecord(
            "rom", 0x1000, 0, 1, False, "file", 0xFFF00000, True, "/fw.bin",
            (SubMappingRecord(0, 0x1000, 2, 0, False),),
        ),
    ),
    (
        BackingRecord(1, "shm", "1", 0x400000, True, 23, 4567),
        BackingRecord(2, "file", "/fw.bin", 0x1000, False, 2049, 99),
    ),
    {"faults": 7},
)  # fmt: skip

#: SAMPLE as format version 1 wrote it: every later release must still read these bytes
SAMPLE_V1 = bytes.fromhex(
    "4d4253544154450a0100000019010000bd0095fd8aa873746174655f6964c410000102030405060708090a0b0c"
    "0d0e0fa375696400ab72756e74696d655f646972af2f72756e2f6d656d6261636b696e67ad616464726573735f"
    "7370616365cf0000010000000000b06e6578745f6d61707061626c655f696403aa6e6578745f6f7264657202ae"
    "6e6578745f6d61707065725f696405a8636f756e7465727381a66661756c747307a7726567696f6e73929aa472"
    "616d30ce004000000000c3a56d656d666400c3c0919500ce004000000100c39aa3726f6dcd10000001c2a46669"
    "6c65cefff00000c3a72f66772e62696e919500cd10000200c2a86261636b696e6773929701a373686da131ce00"
    "400000c317cd11d79702a466696c65a72f66772e62696ecd1000c2cd080163"
)


def test_round_trip() -> None:
    assert journal.decode(journal.encode(SAMPLE)) == SAMPLE


def test_the_first_version_is_read() -> None:
    assert journal.decode(SAMPLE_V1) == SAMPLE


def test_mappers_are_an_optional_key() -> None:
    """The mappers that may come back after a restart: kept in a round trip; a journal of an
    earlier release (without the key) has none; a malformed record is refused."""
    kept = dataclasses.replace(SAMPLE, mappers=(MapperRecord(5, 1234, 987654),))
    data = journal.encode(kept)
    assert journal.decode(data) == kept
    assert journal.decode_head(data)[0].mappers == kept.mappers
    assert journal.decode(SAMPLE_V1).mappers == ()
    for bad in ([[5, 1234]], [[5, -1, 3]], [[5, 1234, "x"]], [5], "x"):
        doc = msgpack.unpackb(data[journal._HEADER.size :], raw=False)
        doc["mappers"] = bad
        with pytest.raises(JournalError, match="mapper"):
            journal.decode(reheader(msgpack.packb(doc, use_bin_type=True)))


def reheader(body: bytes, version: int = journal.FORMAT_VERSION) -> bytes:
    return journal._HEADER.pack(journal.MAGIC, version, len(body), zlib.crc32(body)) + body


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "truncated"),
        (SAMPLE_V1[:10], "truncated"),
        (SAMPLE_V1[:-1], "truncated"),
        (SAMPLE_V1 + b"\x00", "truncated or padded"),
        (b"NOTSTATE" + SAMPLE_V1[8:], "bad magic"),
        (SAMPLE_V1[:-3] + bytes([SAMPLE_V1[-3] ^ 1]) + SAMPLE_V1[-2:], "checksum"),
        (
            reheader(SAMPLE_V1[journal._HEADER.size :], version=journal.FORMAT_VERSION + 1),
            "newer membacking",
        ),
        (reheader(SAMPLE_V1[journal._HEADER.size :], version=0), "format version 0"),
        (reheader(msgpack.packb([1, 2])), "malformed"),
        (reheader(msgpack.packb({"state_id": b"short"})), "malformed"),
        (reheader(b"\xc1"), "malformed"),
    ],
)
def test_corrupt_or_foreign_input_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(JournalError, match=message):
        journal.decode(data)


def test_a_truncated_journal_is_told_in_the_file_s_own_size() -> None:
    """The sizes an operator can check with `ls -l`: the file's and what its header asks for.
    A 100-byte cut of a 286-byte journal said "80 of 286 bytes" (the body's against the
    header's length field)."""
    cut = SAMPLE_V1[:-5]
    with pytest.raises(
        JournalError,
        match=rf"\({len(cut)} bytes, where its header says "
        rf"{len(SAMPLE_V1)}\)",
    ):
        journal.decode(cut)


def test_a_field_of_the_wrong_type_is_refused() -> None:
    doc = msgpack.unpackb(SAMPLE_V1[journal._HEADER.size :], raw=False)
    doc["regions"][0][1] = -4096
    with pytest.raises(JournalError, match="region size"):
        journal.decode(reheader(msgpack.packb(doc, use_bin_type=True)))
    doc = msgpack.unpackb(SAMPLE_V1[journal._HEADER.size :], raw=False)
    doc["backings"][0][1] = "floppy"
    with pytest.raises(JournalError, match="backing kind"):
        journal.decode(reheader(msgpack.packb(doc, use_bin_type=True)))


def test_atomic_write_replaces_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    journal.write_atomically(path, b"old")
    journal.write_atomically(path, journal.encode(SAMPLE))
    assert journal.read(path) == SAMPLE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["journal"]
    assert journal.read(tmp_path / "none") is None


# ---- capture and restore ------------------------------------------------------------------


def live(state_root: Path) -> tuple[ManagerState, MemfdStore, StateDir]:
    sdir = StateDir(state_root)
    sdir.acquire()
    store = MemfdStore(sdir)
    return ManagerState(store, address_space=1 << 32), store, sdir


def test_a_restored_region_of_many_pieces_is_all_in_the_table_at_once(tmp_path: Path) -> None:
    """A restart puts every piece in the table before any mapper registers again (their
    Holdings are checked against it), not a batch per turn as a large activation does."""
    from membacking.manager.placing import PIECES_PER_MESSAGE
    from membacking.manager.steps import STEP_MESSAGES

    pieces = 2 * STEP_MESSAGES * PIECES_PER_MESSAGE
    state, store, sdir = live(tmp_path / "s")
    state.add_region("ram", 0, 2 * pieces * 4096, True)
    for i in range(pieces - 1):
        state.change_mappings("ram", (2 * i + 1) * 4096, 4096)
    snap = capture(state, store, b"i" * 16, "/rt")
    store.close_all()
    sdir.release(remove=False)
    state2, store2, sdir2 = live(tmp_path / "s")
    assert restore(snap, state2, store2) == []
    assert not state2.unplaced and not state2.has_steps
    assert list(state2.table.items()) == list(state.table.items())
    store2.close_all()
    sdir2.release(remove=True)


def test_capture_and_restore_keep_regions_bytes_and_counters(tmp_path: Path) -> None:
    state, store, sdir = live(tmp_path / "s")
    state.add_region("ram", 0, 4 * MiB, True, priority=1)
    state.add_region("low", 0x100000, MiB, True, priority=0)  # nested below `ram`: hidden
    state.add_region("off", None, MiB, True, enabled=False)
    state.add_region("gone", 0x10000000, MiB, True)
    state.change_mappings("ram", MiB, MiB, replace=("memfd", None, 0, True))
    state.remove_region("gone")
    ram_sub = state.regions["ram"].submappings[1]
    os.pwrite(store.grant_fd(ram_sub.mappable_id), b"kept", 5)
    state.counters["faults"] = 9
    snap = capture(state, store, b"i" * 16, "/rt")
    assert [r.name for r in snap.regions] == ["ram", "low", "off"]  # `gone` was being removed
    sdir.write(snap)
    store.close_all()
    sdir.release(remove=False)

    state2, store2, sdir2 = live(tmp_path / "s")
    loaded = sdir2.read()
    assert loaded == snap
    assert restore(loaded, state2, store2) == []
    for name in ("ram", "low", "off"):
        assert region_info(state2, state2.regions[name]) == region_info(state, state.regions[name])
    assert list(state2.table.items()) == [
        (r, m) for r, m in state.table.items() if m.region != "gone"
    ]
    assert os.pread(store2.grant_fd(ram_sub.mappable_id), 4, 5) == b"kept"
    assert state2.counters["faults"] == 9
    # new ids never reuse journaled ones
    state2.add_region("new", 0x20000000, MiB, True)
    assert state2.regions["new"].submappings[0].mappable_id >= snap.next_mappable_id
    store2.close_all()


def test_restore_refuses_a_missing_or_different_file(tmp_path: Path) -> None:
    state, store, sdir = live(tmp_path / "s")
    state.add_region("ram", 0, MiB, True)
    snap = capture(state, store, b"i" * 16, "/rt")
    store.close_all()
    sdir.release(remove=False)
    mid = snap.backings[0].name
    path = tmp_path / "s" / "mem" / mid

    os.truncate(path, MiB // 2)
    state2, store2, _ = live(tmp_path / "t")
    store2.state_dir = StateDir(tmp_path / "s")
    with pytest.raises(StateDirError, match="truncated"):
        restore(snap, state2, store2)

    other = path.with_name("other")
    other.write_bytes(bytes(MiB))
    os.rename(other, path)  # same name and size, another file
    with pytest.raises(StateDirError, match="another inode"):
        restore(snap, ManagerState(store2, address_space=1 << 32), store2)

    path.unlink()
    with pytest.raises(StateDirError, match="cannot open"):
        restore(snap, ManagerState(store2, address_space=1 << 32), store2)
    assert len(store2) == 0  # nothing half-adopted


def test_a_snapshot_of_another_manager_does_not_fit() -> None:
    check_fits(SAMPLE, "/run/membacking", 1 << 40)
    with pytest.raises(StateDirError, match="belongs to the manager of /run/membacking"):
        check_fits(SAMPLE, "/elsewhere", 1 << 40)
    with pytest.raises(StateDirError, match="address space"):
        check_fits(SAMPLE, "/run/membacking", 1 << 30)
    other = Snapshot(**{**SAMPLE.__dict__, "uid": os.getuid() + 1})
    with pytest.raises(StateDirError, match="written by uid"):
        check_fits(other, "/run/membacking", 1 << 40)
