"""The control listings at scale, with no sockets: `regions`, `mappings`, `mappers` and
`mapper_held` come in pages of bounded work, and the client pages against a manager of an
earlier release that lists everything at once."""

from __future__ import annotations

import pytest
from test_manager_state import MiB, RecordingStore

from membacking.manager.state import ManagerState
from membacking.protocol.ranges import MemoryRange


@pytest.fixture
def state() -> ManagerState:
    return ManagerState(RecordingStore(), address_space=1 << 32)


def _control(state: ManagerState, op: str, **args: object) -> object:
    from membacking.protocol import messages as m

    (effect,) = state.handle_control(b"c", m.ControlRequest(op, dict(args)))
    msg = getattr(effect, "msg", None)
    assert isinstance(msg, m.ControlReply), msg
    return msg.result


def test_the_listing_comes_in_pages_of_bounded_work(state: ManagerState) -> None:
    """`regions` lists 128 regions a page (fewer once 2,048 pieces are listed), by name after
    `after`; a region lists at most 256 pieces and `mappings` pages through the rest. The
    listing of 10,000 regions was one reply that held the manager's loop for 65 ms."""
    for i in range(600):
        state.add_region(f"r{i:04d}", (i + 1) * MiB, 64 * 4096, True)
    for h in range(10):  # h0..h9 list first: 301 pieces each, 256 of them listed
        state.add_region(f"h{h}", (1 << 31) + h * (1 << 23), 4096 * 1000, True)
        for i in range(300):
            state.change_mappings(f"h{h}", (2 * i + 1) * 4096, 4096)
    state.add_region("holes", 3 << 30, 4096 * 2000, True)
    for i in range(700):
        state.change_mappings("holes", (2 * i + 1) * 4096, 4096)
    names: list[str] = []
    sizes = []
    after = None
    while True:
        page = _control(state, "regions", **({"after": after} if after else {}))
        assert isinstance(page, list)
        if not page:
            break
        sizes.append(len(page))
        assert sum(len(r["mappings"]) for r in page) < 2048 + 256
        names += [r["name"] for r in page]
        after = page[-1]["name"]
    assert names == sorted(state.regions) and sizes == [8, 128, 128, 128, 128, 91]
    holes = _control(state, "regions", after="h9")[0]  # type: ignore[index]
    assert holes["name"] == "holes" and holes["pieces"] == 701 and len(holes["mappings"]) == 256
    offsets: list[int] = []
    offset = 0
    while True:
        got = _control(state, "mappings", name="holes", offset=offset)
        assert isinstance(got, dict) and got["pieces"] == 701
        if not got["mappings"]:
            break
        assert len(got["mappings"]) <= 256
        offsets += [p["offset"] for p in got["mappings"]]
        offset = got["mappings"][-1]["offset"] + got["mappings"][-1]["size"]
    assert offsets == [0] + [(2 * i + 2) * 4096 for i in range(700)]
    # a change's reply lists the pieces it touched and their neighbours, not all of them
    reply = _control(state, "unmap_range", name="holes", offset=702 * 4096, size=4096)
    assert isinstance(reply, dict) and reply["pieces"] == 700
    assert [p["offset"] // 4096 for p in reply["mappings"]] == [700, 704]
    reply = _control(state, "map_range", name="holes", offset=1500 * 4096, size=4096)
    assert isinstance(reply, dict) and reply["pieces"] == 702
    assert [(p["offset"] // 4096, p["size"] // 4096) for p in reply["mappings"]] == [
        (1400, 100),
        (1500, 1),
        (1501, 499),
    ]


def test_the_mappers_listing_pages_through_held_ranges(state: ManagerState) -> None:
    """`mappers` lists at most 256 held ranges a mapper (with their count and bytes, kept as
    they change) and `mapper_held` pages through the rest in address order; the listing of 16
    mappers holding 2,000 ranges each held the loop for 79 ms."""
    from test_manager_state import attach, fault_everything

    ids = [attach(state, f"m{i}")[0] for i in range(3)]
    for i in range(600):
        state.add_region(f"r{i:04d}", i * 2 * 4096, 4096, True)
    fault_everything(state, ids[1], MemoryRange(0, 1200 * 4096))
    state.remove_region("r0007")  # its Unmap is not acknowledged yet: no longer held
    page = _control(state, "mappers")
    assert isinstance(page, list) and [p["id"] for p in page] == ids
    assert [p["ranges"] for p in page] == [0, 599, 0]
    assert page[1]["bytes"] == 599 * 4096 and len(page[1]["held"]) == 256
    assert _control(state, "mappers", after_id=ids[1]) == page[2:]
    held: list[int] = []
    gpa = 0
    while True:
        got = _control(state, "mapper_held", id=ids[1], gpa=gpa)
        assert isinstance(got, dict) and got["ranges"] == 599
        if not got["held"]:
            break
        held += [start for start, _ in got["held"]]
        gpa = got["held"][-1][0] + got["held"][-1][1]
    assert held == [i * 2 * 4096 for i in range(600) if i != 7]


def test_control_client_pages_against_a_manager_of_an_earlier_release() -> None:
    """A manager of an earlier release lists everything at once and refuses page arguments as
    unknown: the client takes its first answer as the whole listing."""
    from membacking import ControlClient, ControlError

    from conftest import short_tmpdir

    class EarlierManager(ControlClient):
        calls: list[tuple[str, dict[str, object]]] = []

        def call(self, op: str, timeout: float | None = None, **args: object) -> object:
            self.calls.append((op, args))
            if args:
                raise ControlError("bad-request", f"unknown argument(s): {', '.join(args)}")
            if op == "regions":
                return [
                    {"name": n, "gpa": g, "priority": 0, "mappings": []}
                    for n, g in [("b", 0), ("a", 1)]
                ]
            return [{"id": 1, "held": [[0, 4096]]}, {"id": 2, "held": []}]

    client = EarlierManager(short_tmpdir())
    assert [r["name"] for r in client.regions()] == ["b", "a"]
    assert [p["id"] for p in client.mappers()] == [1, 2]
    assert client.calls == [
        ("regions", {}),
        ("regions", {"after": "a"}),
        ("mappers", {}),
        ("mappers", {"after_id": 2}),
    ]
