"""The plan from regions to QEMU's memory options (pure logic; tests/test_qemu.py boots it)."""

from __future__ import annotations

from typing import Any

import pytest

from membacking.mapper import SharedRange
from membacking.qemu.binary import QemuError
from membacking.qemu.layout import plan

MiB, GiB = 1 << 20, 1 << 30


def region(name: str, gpa: int, size: int, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": name,
        "gpa": gpa,
        "size": size,
        "writable": True,
        "backing": "memfd",
        "active": True,
        "mappings": [{"offset": 0, "size": size, "file_offset": 0, "writable": True}],
    }
    out.update(extra)
    return out


def shares(*regions: dict[str, Any]) -> list[SharedRange]:
    return [SharedRange(r["gpa"], r["size"], 10 + i, 0, True) for i, r in enumerate(regions)]


def test_boot_ram_and_dimms() -> None:
    regions = [
        region("ram", 0, 64 * MiB),
        region("a", 4 * GiB, 32 * MiB),
        region("b", 6 * GiB, MiB),
    ]
    p = plan(regions, shares(*regions))
    assert p.regions == ["ram", "a", "b"] and p.fds == [10, 11, 12]
    args = p.qemu_args(["dump-guest-core=off"])
    assert args[:4] == [
        "-machine",
        "pc,memory-backend=mb-ram,dump-guest-core=off",
        "-m",
        # maxmem covers the highest dimm's end above 4 GiB (more than the dimms' sum here)
        f"size={64 * MiB}B,slots=2,maxmem={64 * MiB + 2 * GiB + MiB}B",
    ]
    assert f"memory-backend-file,id=mb-ram,mem-path=/proc/self/fd/10,size={64 * MiB},share=on" in (
        args
    )
    assert f"pc-dimm,id=mb-b,memdev=mb-dimm1,addr={6 * GiB}" in args


def test_only_the_named_regions_are_lent() -> None:
    regions = [region("ram", 0, 64 * MiB), region("low", GiB, MiB)]
    p = plan(regions, shares(*regions), ["ram"])
    assert p.regions == ["ram"] and p.qemu_args()[3] == f"size={64 * MiB}B"


@pytest.mark.parametrize(
    ("regions", "selected", "message"),
    [
        ([region("ram", 0, 0xE0000000)], [], "smaller than 0xe0000000 bytes"),
        ([region("ram", 0, 2 * MiB + 4096)], [], "multiples of 8192 bytes"),
        ([region("ram", 0, MiB, writable=False)], [], "read-only"),
        ([region("ram", 0, MiB, backing="private")], [], "private RAM"),
        (
            [
                region(
                    "ram",
                    0,
                    2 * MiB,
                    mappings=[{"offset": 0, "size": MiB, "file_offset": 0, "writable": True}],
                )
            ],
            [],
            "'ram' has a hole",  # (it said "is made of 1 mapping(s)")
        ),
        (
            [
                region(
                    "ram",
                    0,
                    MiB,
                    mappings=[{"offset": 0, "size": MiB, "file_offset": MiB, "writable": True}],
                )
            ],
            [],
            "starts at offset 0x100000 of its file",
        ),
        (
            [
                region(
                    "ram",
                    0,
                    2 * MiB,
                    mappings=[
                        {"offset": 0, "size": MiB, "file_offset": 0, "writable": True},
                        {"offset": MiB, "size": MiB, "file_offset": MiB, "writable": True},
                    ],
                )
            ],
            [],
            "is made of 2 mappings",
        ),
        ([region("ram", 0, MiB), region("x", 3 * GiB, MiB)], [], "below 4 GiB"),
        ([region("ram", 0, MiB, active=False)], ["ram"], "not active"),
        ([region("ram", 0, MiB, active=False)], [], "no region at GPA 0"),
    ],
)
def test_refusals(regions: list[dict[str, Any]], selected: list[str], message: str) -> None:
    with pytest.raises(QemuError, match=message):
        plan(regions, shares(*regions), selected)
