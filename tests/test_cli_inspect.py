"""Inspection commands: the address-space map (1 and 1,000 regions), hexdump, fill, watch."""

from __future__ import annotations

import json
from collections.abc import Callable

import psutil

from membacking.cli.map_cmd import render_map
from membacking.cli.mem_cmd import hexdump
from membacking.cli.watch_cmd import render_watch

from conftest import RunningManager, Worker

MiB = 1 << 20


def region(name: str, gpa: int, size: int, writable: bool = True) -> dict[str, object]:
    return {"name": name, "gpa": gpa, "size": size, "writable": writable, "active": True}


def test_map_of_one_region() -> None:
    lines = render_map([region("ram0", 0, 64 * MiB)], [], address_space=1 << 30)
    assert lines[0] == (
        "guest address space 0x0-0x40000000 (1 GiB): 1 visible region in 0x0-0x4000000, "
        "64 MiB backed, 0 mappers"
    )
    assert set(lines[1].split()[1]) == {"█"}
    assert lines[-1].split() == ["0x0-0x4000000", "64", "MiB", "ram0"]


def test_map_with_holes_read_only_and_mappers() -> None:
    regions = [region("ram0", 0, 64 * MiB), region("rom", 0xFFF00000, MiB, writable=False)]
    mappers = [
        {"id": 1, "name": "a", "held": [[0, 64 * MiB]]},
        {"id": 2, "name": "b", "held": [[0xFFF00000, MiB]]},
    ]
    lines = render_map(regions, mappers)
    table = lines[lines.index(next(x for x in lines if x.strip().startswith("GPA"))) :]
    assert table[0].split() == ["GPA", "SIZE", "REGION", "m1", "m2"]
    assert table[1].split() == ["0x0-0x4000000", "64", "MiB", "ram0", "█", "·"]
    assert table[2].split()[-2:] == ["·", "·"] and "(hole)" in table[2]
    assert table[3].split() == ["0xfff00000-0x100000000", "1", "MiB", "rom", "[ro]", "·", "█"]
    assert "▒" in lines[1]  # the read-only region shows on the axis
    assert lines[-1].endswith("(█ all mapped, ▒ partly, · not)")


def test_map_of_a_thousand_regions_stays_readable() -> None:
    regions = [region(f"r{i:04d}", i * 0x2000, 0x1000, writable=i % 10 != 0) for i in range(1000)]
    mappers = [{"id": 7, "name": "half", "held": [[i * 0x2000, 0x1000] for i in range(500)]}]
    lines = render_map(regions, mappers, max_rows=40)
    assert len(lines) <= 40 + 7
    assert "1000 visible regions" in lines[0]
    body = [x for x in lines if x.startswith("  0x") and "regions" in x]
    assert body[0].split()[4:7] == ["regions", "r0000", ".."]
    assert "r0999" in body[-1]
    assert sum(int(x.split()[3]) for x in body) == 1000
    marks = [x.split()[-1] for x in body]
    assert marks[0] == "▒" and marks[-1] == "·"  # holes inside a group make it partial
    assert all(len(x) <= 120 for x in lines)


def test_map_command(manager: RunningManager, spawn_worker: Callable[..., Worker]) -> None:
    worker = spawn_worker(manager, "w")
    worker.ask("read 0x0 1")
    result = manager.cli("map")
    assert result.returncode == 0, result.stderr
    assert f"m{worker.mapper_id}" in result.stdout and "ram0" in result.stdout
    # the header states the address space the manager serves (1 TiB by default), not the span
    # up to the highest region; the span is said apart, in the text and in --json alike
    assert result.stdout.splitlines()[0].startswith(
        "guest address space 0x0-0x10000000000 (1 TiB): 2 visible regions in 0x0-0x100000000, "
    )
    data = json.loads(manager.cli("map", "--json").stdout)
    assert {r["name"] for r in data["regions"]} == {"ram0", "rom"}
    assert data["mappers"][0]["held"] == [[0, 64 * MiB]]
    assert data["address_space"] == manager.client().status()["address_space"] == 1 << 40
    assert data["regions_span"] == [0, 0x100000000]
    # each mapper with its process name and RSS, as `membacking mappers --json` gives them
    listed = json.loads(manager.cli("mappers", "--json").stdout)
    (entry,) = data["mappers"]
    assert entry["pid"] == worker.pid and entry["process"] == psutil.Process(worker.pid).name()
    assert entry["process"] == listed[0]["process"]
    assert isinstance(entry["rss"], int) and entry["rss"] > 0 and isinstance(listed[0]["rss"], int)


def test_hexdump_format() -> None:
    lines = list(hexdump(0x1000, [b"hello world" + bytes(53)]))
    assert lines[0] == (
        "0000000000001000  68 65 6c 6c 6f 20 77 6f  72 6c 64 00 00 00 00 00  |hello world.....|"
    )
    assert lines[1].startswith("0000000000001010  00") and lines[2] == "*"
    assert lines[3].startswith("0000000000001030  00")  # the last row is always shown
    assert lines[-1] == "0000000000001040"
    assert next(iter(hexdump(0, [b"ab"]))).endswith("  |ab|")
    data = bytes(range(256)) * 3 + bytes(100) + b"tail"
    pieces = [data[i : i + 64] for i in range(0, len(data), 64)]
    assert list(hexdump(0x10, pieces)) == list(hexdump(0x10, [data]))  # chunking changes nothing


def test_mem_dump_and_fill(manager: RunningManager) -> None:
    assert manager.cli("mem", "fill", "0x2000", "100", "0x41").stdout.strip() == (
        "filled 100 bytes at 0x2000 (8192) with 0x41 (65)"
    )
    dump = manager.cli("mem", "dump", "0x2000", "0x80").stdout.splitlines()
    assert dump[0].endswith("|AAAAAAAAAAAAAAAA|") and dump[1] == "*"
    assert dump[2].startswith("0000000000002060  41 41 41 41 00")
    bad = manager.cli("mem", "fill", "0", "10", "300")
    assert bad.returncode == 2 and "not a byte value" in bad.stderr
    ro = manager.cli("mem", "fill", "0xfff00000", "1", "1")
    assert ro.returncode == 1 and "read-only" in ro.stderr


def test_watch(manager: RunningManager) -> None:
    result = manager.cli("watch", "--count", "2", "--interval", "0.1")
    assert result.returncode == 0, result.stderr
    # two refreshes (click drops the clear-screen codes when stdout is not a terminal)
    assert result.stdout.count("membacking  up ") == 2
    assert "regions 2 (65 MiB)" in result.stdout
    screen = render_watch(
        {
            "uptime": 3,
            "regions": 1,
            "region_bytes": MiB,
            "mappers": 0,
            "rejected": {"malformed": 2},
            "refused": {"limit": 1},
            "faults": 10,
            "maps_sent": 4,
            "unmaps_sent": 0,
            "fds_sent": 1,
            "removals": 0,
        },
        {"faults": 4, "maps_sent": 4, "unmaps_sent": 0, "fds_sent": 1, "removals": 0},
        2.0,
        [],
    )
    assert screen[0].endswith("rejected 2  refused 1")
    assert screen[3].split() == ["faults", "10", "3.0"]
    manager.stop()
    gone = manager.cli("watch", "--count", "1")
    assert gone.returncode == 1 and "no membacking manager" in gone.stderr


def test_map_shows_unbacked_parts_and_aligns_long_mapper_ids() -> None:
    ram = region("ram", 0, 64 * MiB)
    ram["mappings"] = [  # `region unmap ram 16M 16M` left two pieces
        {"offset": 0, "size": 16 * MiB, "writable": True},
        {"offset": 32 * MiB, "size": 32 * MiB, "writable": True},
    ]
    mappers = [
        {"id": 5, "name": "a", "held": [[0, 16 * MiB]]},
        {"id": 12345, "name": "b", "held": [[32 * MiB, 32 * MiB]]},
    ]
    lines = render_map([ram], mappers)
    assert "48 MiB backed" in lines[0]
    axis = lines[1].split()[1]
    assert axis[:16] == "█" * 16 and set(axis[16:32]) == {"·"} and set(axis[32:]) == {"█"}
    start = next(i for i, x in enumerate(lines) if x.strip().startswith("GPA"))
    header, *body = lines[start : start + 4]
    assert "(unbacked part of ram)" in body[1]
    for row, marks in zip(body, (("█", "·"), ("·", "·"), ("·", "█")), strict=True):
        for column, mark in zip(("m5", "m12345"), marks, strict=True):
            assert row[header.index(column)] == mark, (row, column)


def test_map_groups_regions_that_are_all_unbacked() -> None:
    regions = []
    for i, name in enumerate("abcdefgh"):  # 8 rows in groups of 2: c and d share one
        r = region(name, i * MiB, MiB)
        r["mappings"] = [] if name in "cd" else [{"offset": 0, "size": MiB, "writable": True}]
        regions.append(r)
    lines = render_map(regions, [], max_rows=4)
    body = [x for x in lines[4:] if x.startswith("  0x")]
    assert len(body) <= 4
    assert any("2 regions c .. d, 2 holes" in x for x in body)
    assert "6 MiB backed" in lines[0]  # c and d back nothing


def test_mistakes_the_command_line_can_tell_alone_exit_2(manager: RunningManager) -> None:
    """Found before the daemon is asked: backings that do not go together, a value past 64
    bits, --file-offset without --file; each one line on stderr (after click's usage line for
    a usage mistake), exit 2, and the daemon never asked (nothing added or mapped)."""
    cases = (
        (
            ("region", "add", "d1", "0x10000000", "2M", "--hugetlb", "--private"),
            "do not go together",
        ),
        (
            ("region", "add", "d1", "0x10000000", "1M", "--file", "/tmp/x", "--private"),
            "do not go together",
        ),
        (
            ("region", "add", "d1", "0x10000000", "99999999999999999999999T"),
            "does not fit in 64 bits",
        ),
        (("region", "move", "ram", str(1 << 64)), "does not fit in 64 bits"),
        (
            ("region", "map", "ram", "0", "4096", "--file-offset", "4096"),
            "--file-offset goes with --file",
        ),
    )
    for args, why in cases:
        done = manager.cli(*args)
        said = " ".join(done.stderr.split())
        assert done.returncode == 2 and why in said and "Traceback" not in said, (args, said)
    names = [r["name"] for r in manager.client().regions()]
    assert "d1" not in names
