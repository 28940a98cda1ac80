"""Print the hex example of every protocol message, for docs/PROTOCOL.md, from the real codec.

    python scripts/gen_protocol_examples.py          # one markdown line per message
    python scripts/gen_protocol_examples.py --check  # exit 1 if PROTOCOL.md lacks one

tests/test_protocol_doc.py runs the check, so the document's examples cannot drift from the codec.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

from membacking.protocol import messages as m
from membacking.protocol.codec import encode
from membacking.protocol.ranges import MemoryRange

DOC = Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md"
TOKEN = bytes(range(16))
R = MemoryRange(0x100000, 0x500000)

#: one example of each message, as the document shows it
EXAMPLES: list[tuple[str, m.Message]] = [
    ('Hello("vm-1", features=7)', m.Hello("vm-1", 7)),
    ("Welcome(5, token 00..0f, 1 TiB, 4096, features=7)", m.Welcome(5, TOKEN, 1 << 40, 4096, 7)),
    ("FdGrant(7, 4 MiB, writable=true)", m.FdGrant(7, 0x400000, True)),
    ('FdDenied(7, "limit")', m.FdDenied(7, "limit")),
    ('Error("not-attached", "no stream", tag=3)', m.Error("not-attached", "no stream", 3)),
    ("Attach(5, token 00..0f, role=2)", m.Attach(5, TOKEN, 2)),
    ("Attached(2)", m.Attached(2)),
    ("SendMappings(0x100000+0x400000, tag=3)", m.SendMappings(R, 3)),
    ("Map(0x100000+0x400000, 7, 0, writable=true)", m.Map(R, 7, 0, True)),
    ("NoMapping(0x100000+0x400000)", m.NoMapping(R)),
    ("Unmap(9, 0x100000+0x400000, release=[7])", m.Unmap(9, R, (7,))),
    ("UnmapAck(9)", m.UnmapAck(9)),
    ("Detach()", m.Detach()),
    ('Shutdown("stopped", code="stopping")', m.Shutdown("stopped", "stopping")),
    ("Release(10, [7, 8])", m.Release(10, (7, 8))),
    ("SetEager()", m.SetEager()),
    ('EagerResult(true, "")', m.EagerResult(True, "")),
    ("MapEager(11, 0x100000+0x400000, 7, 0, writable=false)", m.MapEager(11, R, 7, 0, False)),
    ('MapAck(11, true, "")', m.MapAck(11, True, "")),
    ("ResendFd(7, tag=4)", m.ResendFd(7, 4)),
    ("DetachAck()", m.DetachAck()),
    ("Holdings(fds=[7, 64768, 12], mappings=[])", m.Holdings((7, 64768, 12), ())),
    (
        "PackedHoldings(fds=pack('<3Q', 7, 64768, 12), mappings=b'')",
        m.PackedHoldings(struct.pack(m.PACKED_FD_FORMAT, 7, 64768, 12), b""),
    ),
    ('ControlRequest("regions", {})', m.ControlRequest("regions", {})),
    ("ControlReply([])", m.ControlReply([])),
]


def hex_of(msg: m.Message) -> str:
    return encode(msg).hex(" ")


def lines() -> list[str]:
    return [f"`{text}` = `{hex_of(msg)}`" for text, msg in EXAMPLES]


def main() -> int:
    if "--check" in sys.argv[1:]:
        doc = DOC.read_text()
        missing = [line for line in lines() if line not in doc]
        for line in missing:
            print(f"docs/PROTOCOL.md lacks: {line}", file=sys.stderr)
        return 1 if missing else 0
    for line in lines():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
