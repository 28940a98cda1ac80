"""The codec's generated builders (each message class's checks written out inline) against its
field-by-field checks: for random wire items of every class, and for every field of a valid
message replaced by edge and odd values, the same message or the same error."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_protocol import EXAMPLES, P

from membacking.protocol import ProtocolError, encode
from membacking.protocol import messages as m

_EDGE_INTS = [0, 1, P, 2 * P, 2**63, 2**64 - P, 2**64 - 1, 2**64, -1, -P]
_ODD_VALUES: list[object] = [True, False, None, 1.0, "x", b"x", [], {}]
_WIRE_VALUE = {
    m.Kind.U64: st.sampled_from([*_EDGE_INTS, *_ODD_VALUES]),
    m.Kind.BOOL: st.sampled_from([True, False, 0, 1, None, "true"]),
    m.Kind.IDS: st.one_of(
        st.lists(st.sampled_from([*_EDGE_INTS, True, None]), max_size=4),
        st.just([0] * (m.MAX_RELEASE_IDS + 1)),
        st.just([1] * m.MAX_RELEASE_IDS),
        st.sampled_from(_ODD_VALUES),
    ),
    m.Kind.NAME: st.sampled_from(["a", "ok-name", "", "two words", "x" * 65, 7, None]),
    m.Kind.TEXT: st.sampled_from(["", "why", "x" * 1025, 7, None, b"x"]),
    m.Kind.TOKEN: st.sampled_from([b"t" * 16, b"t" * 15, "t" * 16, None]),
    m.Kind.ARGS: st.sampled_from([{}, {"name": "a"}, {"bad key": 1}, [], {"n": 2**64}]),
    m.Kind.PACKED: st.sampled_from([b"", bytes(8), bytes(40), bytes(7), "x" * 8, [0], None]),
    m.Kind.ANY: st.sampled_from([None, 1, "x", [1, {"a": b"b"}]]),
}
_RANGE_PART = st.sampled_from([*_EDGE_INTS, 3 * P, True, None, 1.5])


@st.composite
def _wire_items(draw: st.DrawFn) -> tuple[type[m.Message], list[object]]:
    cls = draw(st.sampled_from(sorted(m.ALL_MESSAGES, key=lambda c: c.TYPE)))
    items: list[object] = [1, cls.TYPE]
    for _, kind in cls.FIELDS:
        if kind is m.Kind.RANGE:
            items += [draw(_RANGE_PART), draw(_RANGE_PART)]
        else:
            items.append(draw(_WIRE_VALUE[kind]))
    return cls, items


@settings(max_examples=3000, deadline=None)
@given(_wire_items())
def test_generated_builders_agree_with_the_field_by_field_checks(
    case: tuple[type[m.Message], list[object]],
) -> None:
    """Each class's generated builder (checks written out inline) accepts nothing the checker
    of each field refuses, builds the same message, and otherwise raises the same error as the
    field-by-field builder. (An inline check stricter than its checker would only be slower:
    what it refuses goes to the field-by-field builder.)"""
    from membacking.protocol.codec import _PLANS

    cls, items = case
    plan = _PLANS[cls]

    def outcome(build: Callable[[list[Any]], m.Message]) -> object:
        try:
            return build(items)
        except ProtocolError as exc:
            return ("error", exc.reason, str(exc))

    assert outcome(plan.build) == outcome(plan.build_checked)


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda x: type(x).__name__)
def test_generated_builders_agree_on_every_field_varied_alone(msg: m.Message) -> None:
    """A valid message with each wire field in turn replaced by every edge and odd value: the
    generated builder and the field-by-field one give the same message or the same error."""
    from membacking.protocol.codec import _PLANS

    plan = _PLANS[type(msg)]
    valid = msgpack.unpackb(encode(msg), raw=False)
    assert plan.build(list(valid)) == plan.build_checked(list(valid)) == msg
    odd = [*_EDGE_INTS, *_ODD_VALUES, 3 * P, 1.5, [0] * (m.MAX_RELEASE_IDS + 1), ""]
    for pos in range(2, len(valid)):
        for value in odd:
            items = [*valid[:pos], value, *valid[pos + 1 :]]
            try:
                fast: object = plan.build(items)
            except ProtocolError as exc:
                fast = ("error", exc.reason, str(exc))
            try:
                slow: object = plan.build_checked(items)
            except ProtocolError as exc:
                slow = ("error", exc.reason, str(exc))
            assert fast == slow, (pos, value)
