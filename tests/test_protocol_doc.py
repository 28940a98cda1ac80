"""docs/PROTOCOL.md follows the code: its hex examples are the codec's own bytes and decode, every
error code the source emits is in its catalogue, every feature bit and codec limit is stated."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

from membacking.manager import fdserver, routers
from membacking.protocol import codec
from membacking.protocol import messages as m
from membacking.protocol.codec import decode

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "PROTOCOL.md").read_text()
GEN = runpy.run_path(str(ROOT / "scripts" / "gen_protocol_examples.py"))
EXAMPLES: list[tuple[str, m.Message]] = GEN["EXAMPLES"]


def test_every_message_type_has_an_example_in_the_document() -> None:
    assert {type(msg) for _, msg in EXAMPLES} == set(m.ALL_MESSAGES)
    missing = [line for line in GEN["lines"]() if line not in DOC]
    assert not missing, "regenerate with scripts/gen_protocol_examples.py: " + "\n".join(missing)


@pytest.mark.parametrize("text", [t for t, _ in EXAMPLES])
def test_each_documented_hex_decodes_to_its_message(text: str) -> None:
    found = re.search(rf"`{re.escape(text)}` = `([0-9a-f ]+)`", DOC)
    assert found, text
    msg = dict(EXAMPLES)[text]
    channel = next(iter(msg.CHANNELS))
    assert decode(bytes.fromhex(found.group(1)), channel) == msg


def source_error_codes() -> set[str]:
    """Every code the source puts in an Error, a ProtocolError or a rejection counter."""
    patterns = [
        r'reason="([a-z-]+)"',
        r'reject\(\s*"([a-z-]+)"',
        r'm\.Error\(\s*"([a-z-]+)"',
        r'_strike\(conn, "([a-z-]+)"',
        r'_error\(identity, "([a-z-]+)"',
        r'rejected\["([a-z-]+)"\]',
        r'Refused\(\s*"([a-z-]+)"',
    ]
    codes: set[str] = set()
    for path in (ROOT / "membacking").rglob("*.py"):
        if "conformance" in path.parts or "bench" in path.parts:
            continue
        text = path.read_text()
        for pattern in patterns:
            codes.update(re.findall(pattern, text))
    return codes


def test_every_error_code_of_the_source_is_documented() -> None:
    codes = source_error_codes()
    assert {"bad-arity", "fd-count", "not-attached", "forbidden", "unknown-seq"} <= codes
    missing = sorted(c for c in codes if f"`{c}`" not in DOC)
    assert not missing, f"codes emitted by the source but not in docs/PROTOCOL.md: {missing}"


def test_every_feature_bit_is_documented() -> None:
    features = {k: v for k, v in vars(m).items() if k.startswith("FEATURE_")}
    assert sum(features.values()) == m.SUPPORTED_FEATURES
    for name, bit in features.items():
        row = f"| `1 << {bit.bit_length() - 1}` | {name.removeprefix('FEATURE_')} |"
        assert row in DOC, row


def test_the_limits_in_the_document_are_the_codes() -> None:
    assert codec.MAX_MESSAGE_BYTES == 64 * 1024 and "64 KiB" in DOC
    assert routers.MAX_FRAME_BYTES == 128 << 10 and "`MAXMSGSIZE` 128 KiB" in DOC
    assert f"{m.MAX_NAME_LEN} chars / {m.MAX_REASON_LEN} chars / {m.MAX_RELEASE_IDS} ids / " \
        f"{codec.MAX_ARGS} entries" in DOC  # fmt: skip
    assert f"| strikes | {fdserver.MAX_STRIKES} |" in DOC
    assert f"| `Hello` after connecting | {fdserver.HELLO_TIMEOUT:g} s" in DOC
    assert (
        f"| {fdserver.MAX_UNREGISTERED} (peers of other uids: {fdserver.MAX_REFUSED_WAITING})"
        in DOC
    )
    assert "`SNDHWM` to 100,000 messages" in DOC and routers.SNDHWM == 100_000
    assert f"`RCVHWM` to {routers.RCVHWM} messages" in DOC
    assert f"exactly {m.TOKEN_BYTES} bytes" in DOC
