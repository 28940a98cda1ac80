"""msgpack encoding and strict decoding of protocol messages.

A message travels as one msgpack array: [version, type, field...]. `decode` checks the size, the
version, the type against the channel, and every field's type and bounds, raising ProtocolError.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack

from .errors import ProtocolError
from .messages import (
    BY_TYPE,
    MAX_NAME_LEN,
    MAX_REASON_LEN,
    MAX_RELEASE_IDS,
    PROTOCOL_VERSION,
    TOKEN_BYTES,
    Channel,
    Kind,
    Message,
)
from .ranges import MAX_ADDRESS, PAGE_MASK, MemoryRange

#: Largest message accepted on the fd and mapper channels, and for control requests.
MAX_MESSAGE_BYTES = 64 * 1024
#: Largest control reply a client accepts (listings of thousands of regions).
MAX_REPLY_BYTES = 64 * 1024 * 1024
MAX_ARGS = 16
_U64_LIMIT = 1 << 64


class _Plan:
    """How one message class travels: built once per class, so encoding and decoding do no
    per-field dispatch on the field kinds."""

    __slots__ = ("cls", "fields", "wide", "wire_len")

    def __init__(self, cls: type[Message]) -> None:
        self.cls = cls
        #: (attribute, kind, checker, label) in wire order
        self.fields = tuple(
            (name, kind, _CHECKS[kind], f"{cls.__name__}.{name}") for name, kind in cls.FIELDS
        )
        #: any field that is not one wire value as it is (ranges, id lists)
        self.wide = any(kind in (Kind.RANGE, Kind.IDS) for _, kind in cls.FIELDS)
        self.wire_len = 2 + sum(2 if kind is Kind.RANGE else 1 for _, kind in cls.FIELDS)

    def flatten(self, msg: Message) -> list[Any]:
        out: list[Any] = [PROTOCOL_VERSION, self.cls.TYPE]
        if not self.wide:
            out.extend([getattr(msg, name) for name, *_ in self.fields])
            return out
        for name, kind, _, _ in self.fields:
            value = getattr(msg, name)
            if kind is Kind.RANGE:
                out.append(value.start)
                out.append(value.end - value.start)
            elif kind is Kind.IDS:
                out.append(list(value))
            else:
                out.append(value)
        return out

    def build(self, items: list[Any]) -> Message:
        args = []
        pos = 2
        for _, kind, check, label in self.fields:
            if kind is Kind.RANGE:
                args.append(_range(items[pos], items[pos + 1], label))
                pos += 2
            else:
                args.append(check(items[pos], label))
                pos += 1
        return self.cls(*args)


def encode(msg: Message) -> bytes:
    """Encode a message for the wire (a registered Message class only: TypeError otherwise)."""
    try:
        plan = _PLANS[type(msg)]
    except KeyError:
        raise TypeError(f"{type(msg).__name__} is not a registered protocol message") from None
    data: bytes = msgpack.packb(plan.flatten(msg), use_bin_type=True)
    return data


def _u64(value: Any, field: str) -> int:
    if type(value) is not int or not 0 <= value < _U64_LIMIT:
        raise ProtocolError(
            f"field {field!r} must be an unsigned 64-bit integer, got {value!r}", reason="bad-field"
        )
    return value


def _name(value: Any, field: str) -> str:
    if type(value) is not str or not 1 <= len(value) <= MAX_NAME_LEN:
        raise ProtocolError(
            f"field {field!r} must be a string of 1 to {MAX_NAME_LEN} characters",
            reason="bad-field",
        )
    if not value.isprintable() or any(ch.isspace() for ch in value):
        raise ProtocolError(
            f"field {field!r} must be printable with no spaces: {value!r}", reason="bad-field"
        )
    return value


def _range(start: Any, size: Any, field: str) -> MemoryRange:
    if not (
        type(start) is int
        and type(size) is int
        and 0 <= start < _U64_LIMIT
        and 0 <= size < _U64_LIMIT
    ):  # checked inline first: every fault's messages carry a range
        start = _u64(start, f"{field}.start")
        size = _u64(size, f"{field}.size")
    if size == 0:
        raise ProtocolError(f"field {field!r} has zero size", reason="bad-range")
    if (start | size) & PAGE_MASK:
        raise ProtocolError(
            f"field {field!r} ({start:#x} + {size:#x}) is not page-aligned", reason="bad-range"
        )
    if start + size > MAX_ADDRESS:
        raise ProtocolError(
            f"field {field!r} ({start:#x} + {size:#x}) wraps the address space", reason="bad-range"
        )
    return MemoryRange.checked_already(start, start + size)


def _args(value: Any, field: str) -> dict[str, Any]:
    if type(value) is not dict or len(value) > MAX_ARGS:
        raise ProtocolError(
            f"field {field!r} must be a map of at most {MAX_ARGS} entries", reason="bad-field"
        )
    for key, item in value.items():
        _name(key, f"{field} key")
        if item is not None and type(item) not in (bool, int, str):
            raise ProtocolError(
                f"argument {key!r} must be nil, bool, int or str", reason="bad-field"
            )
        if type(item) is int and not -_U64_LIMIT < item < _U64_LIMIT:
            raise ProtocolError(f"argument {key!r} is out of the 64-bit range", reason="bad-field")
        if type(item) is str and len(item) > MAX_REASON_LEN:
            raise ProtocolError(
                f"argument {key!r} is longer than {MAX_REASON_LEN}", reason="bad-field"
            )
    return value


def _bool(value: Any, field: str) -> bool:
    if type(value) is not bool:
        raise ProtocolError(f"field {field!r} must be a boolean, got {value!r}", reason="bad-field")
    return value


def _text(value: Any, field: str) -> str:
    if type(value) is not str or len(value) > MAX_REASON_LEN:
        raise ProtocolError(
            f"field {field!r} must be a string of at most {MAX_REASON_LEN}", reason="bad-field"
        )
    return value


def _token(value: Any, field: str) -> bytes:
    if type(value) is not bytes or len(value) != TOKEN_BYTES:
        raise ProtocolError(
            f"field {field!r} must be {TOKEN_BYTES} bytes of binary", reason="bad-field"
        )
    return value


def _ids(value: Any, field: str) -> tuple[int, ...]:
    if type(value) is not list or len(value) > MAX_RELEASE_IDS:
        raise ProtocolError(
            f"field {field!r} must be an array of at most {MAX_RELEASE_IDS}", reason="bad-field"
        )
    return tuple(_u64(v, field) for v in value)


def _any(value: Any, field: str) -> Any:
    return value


def _no_check(value: Any, field: str) -> Any:
    raise AssertionError("ranges are checked by _range")


_CHECKS: dict[Kind, Callable[[Any, str], Any]] = {
    Kind.U64: _u64,
    Kind.BOOL: _bool,
    Kind.NAME: _name,
    Kind.TEXT: _text,
    Kind.TOKEN: _token,
    Kind.RANGE: _no_check,
    Kind.IDS: _ids,
    Kind.ARGS: _args,
    Kind.ANY: _any,
}
_PLANS: dict[type[Message], _Plan] = {cls: _Plan(cls) for cls in BY_TYPE.values()}


def decode(
    data: bytes, channel: Channel, *, max_bytes: int = MAX_MESSAGE_BYTES, sender: str | None = None
) -> Message:
    """Decode and validate one message received on `channel` (from `sender`, if given:
    "mapper", "manager" or "client")."""
    if len(data) > max_bytes:
        raise ProtocolError(
            f"message of {len(data)} bytes exceeds the {max_bytes}-byte limit", reason="too-large"
        )
    if not data:
        raise ProtocolError("empty message", reason="malformed")
    try:
        items = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=max_bytes,
            max_bin_len=max_bytes,
            max_array_len=max_bytes,
            max_map_len=max_bytes,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many types (ValueError, ExtraData, ...)
        why = str(exc) or type(exc).__name__
        raise ProtocolError(f"not a valid msgpack message: {why}", reason="malformed") from None
    if type(items) is not list or len(items) < 2:
        raise ProtocolError(
            "a message must be an array [version, type, fields...]", reason="malformed"
        )
    if items[0] != PROTOCOL_VERSION or type(items[0]) is not int:
        raise ProtocolError(
            f"unsupported protocol version {items[0]!r} (this side speaks {PROTOCOL_VERSION})",
            reason="version",
        )
    cls = BY_TYPE.get(items[1]) if type(items[1]) is int else None
    if cls is None:
        raise ProtocolError(f"unknown message type {items[1]!r}", reason="unknown-type")
    if channel not in cls.CHANNELS:
        raise ProtocolError(
            f"{cls.__name__} is not allowed on the {channel.value} channel", reason="wrong-channel"
        )
    if sender is not None and sender not in cls.FROM:
        raise ProtocolError(f"{cls.__name__} may not be sent by a {sender}", reason="wrong-sender")
    plan = _PLANS[cls]
    if len(items) != plan.wire_len:
        raise ProtocolError(
            f"{cls.__name__} needs {plan.wire_len - 2} wire fields, got {len(items) - 2}",
            reason="bad-arity",
        )
    return plan.build(items)
