"""Feature bits of the wire protocol: a mapper offers a mask in Hello, the manager answers in
Welcome with the subset it will use. docs/PROTOCOL.md §3 lists them for implementers.
"""

from __future__ import annotations

# The subset is `offered & SUPPORTED_FEATURES`. A peer that sends a mask also accepts (and
# ignores) unknown trailing fields on every message; optional trailing fields a feature adds are
# sent only to a peer that negotiated that feature.

#: Shutdown carries `code` (one of SHUTDOWN_CODES) after its text
FEATURE_SHUTDOWN_CODE = 1 << 0
#: the manager answers Detach with DetachAck; a mapper that negotiated it keeps its fd socket
#: open until then (closing it first races the Detach, which then reaches no mapper)
FEATURE_DETACH_ACK = 1 << 1
#: SendMappings and ResendFd carry a `tag`, and an Error refusing one carries the same tag, so
#: the mapper can fail the access waiting for it instead of letting it time out
FEATURE_TAGS = 1 << 2
#: re-registration after a manager restart: Welcome carries `state_id`, and a mapper may send
#: Holdings (what it still maps) right after attaching
FEATURE_REATTACH = 1 << 3
#: (with REATTACH) the mapper may tell what it holds as PackedHoldings: the same entries as
#: Holdings, packed as little-endian u64s in two binary fields, many more per message and a
#: fraction of the cost to check (what re-registering adds to a handover's service gap)
FEATURE_PACKED_HOLDINGS = 1 << 4
#: every feature bit this release knows
SUPPORTED_FEATURES = (
    FEATURE_SHUTDOWN_CODE
    | FEATURE_DETACH_ACK
    | FEATURE_TAGS
    | FEATURE_REATTACH
    | FEATURE_PACKED_HOLDINGS
)
