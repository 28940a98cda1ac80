"""The membacking wire protocol, sans-I/O: ranges, the range map, messages and their codec.

Nothing here imports zmq; only `fdpass` touches sockets (SCM_RIGHTS). docs/PROTOCOL.md is the
human-readable form of the same definitions.
"""

from .codec import MAX_MESSAGE_BYTES, MAX_REPLY_BYTES, decode, encode
from .errors import ProtocolError
from .messages import PROTOCOL_VERSION, Channel, Message
from .rangemap import OverlapError, RangeMap
from .ranges import MAX_ADDRESS, PAGE_SIZE, MemoryRange

__all__ = [
    "MAX_ADDRESS",
    "MAX_MESSAGE_BYTES",
    "MAX_REPLY_BYTES",
    "PAGE_SIZE",
    "PROTOCOL_VERSION",
    "Channel",
    "MemoryRange",
    "Message",
    "OverlapError",
    "ProtocolError",
    "RangeMap",
    "decode",
    "encode",
]
