"""msgpack encoding and strict decoding of protocol messages.

A message travels as one msgpack array: [version, type, field...]. `decode` checks the size, the
version, the type against the channel, and every field's type and bounds, raising ProtocolError;
optional trailing fields may be absent, and fields past the known ones are ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack

from ..units import check_name
from .errors import ProtocolError
from .messages import (
    BY_TYPE,
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


class _AbsentType:
    """An optional trailing field the sender did not send (distinct from an explicit nil, which
    no field kind accepts)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<absent>"


_ABSENT = _AbsentType()


class _Plan:
    """How one message class travels: built once per class. `flatten` and `build` are functions
    generated for the class from its fields, with every check of the hot kinds (u64, bool,
    range, ids) written out inline: no call per field. A message that fails an inline check is
    handed to `build_checked`, the field-by-field builder, which raises the precise error."""

    __slots__ = ("build", "cls", "fields", "flatten", "min_len", "required", "wire_len")

    def __init__(self, cls: type[Message]) -> None:
        self.cls = cls
        #: (attribute, kind, checker, label) in wire order
        self.fields = tuple(
            (name, kind, _CHECKS[kind], f"{cls.__name__}.{name}") for name, kind in cls.FIELDS
        )
        self.required = len(cls.FIELDS) if cls.REQUIRED is None else cls.REQUIRED
        # an optional field is one wire element (its absence is the array's end)
        assert all(k not in (Kind.RANGE, Kind.IDS) for _, k in cls.FIELDS[self.required :])
        self.wire_len = 2 + sum(2 if kind is Kind.RANGE else 1 for _, kind in cls.FIELDS)
        self.min_len = self.wire_len - (len(cls.FIELDS) - self.required)
        self.flatten: Callable[[Message], list[Any]] = self._compile_flatten()
        self.build: Callable[[list[Any]], Message] = self._compile_build()

    def build_checked(self, items: list[Any]) -> Message:
        """Check each field in wire order with its checker (raising ProtocolError for the first
        that fails) and build the message."""
        args: list[Any] = []
        pos = 2
        for i, (_, kind, check, label) in enumerate(self.fields):
            if i >= self.required and pos >= len(items):
                args.append(None)  # an optional field not sent (nor any after it)
                pos += 1
            elif kind is Kind.RANGE:
                args.append(_range(items[pos], items[pos + 1], label))
                pos += 2
            else:
                args.append(check(items[pos], label))
                pos += 1
        return self.cls(*args)

    def _compile_flatten(self) -> Callable[[Message], list[Any]]:
        lines = []
        out = [str(PROTOCOL_VERSION), str(self.cls.TYPE)]
        for name, kind, _, _ in self.fields:
            if kind is Kind.RANGE:  # a local of its own: field names may shadow builtins
                lines.append(f"    r_{name} = msg.{name}")
                out += [f"r_{name}[0]", f"r_{name}[1] - r_{name}[0]"]
            elif kind is Kind.IDS:
                out.append(f"list(msg.{name})")
            else:
                out.append(f"msg.{name}")
        required = 2 + sum(
            2 if k is Kind.RANGE else 1 for _, k, _, _ in self.fields[: self.required]
        )
        optional = out[required:]
        if not optional:
            body = "\n".join([*lines, f"    return [{', '.join(out)}]"])
            return self._compile(f"def flatten(msg):\n{body}\n", "flatten", {})
        # optional trailing fields: the trailing absent (None) ones are left off the wire
        lines += [
            f"    out = [{', '.join(out[:required])}]",
            f"    opt = [{', '.join(optional)}]",
            "    while opt and opt[-1] is None:",
            "        opt.pop()",
            "    if None in opt:",
            f"        raise ValueError('{self.cls.__name__}: an optional field is set after an "
            "absent one')",
            "    out += opt",
            "    return out",
        ]
        return self._compile("def flatten(msg):\n" + "\n".join(lines) + "\n", "flatten", {})

    def _compile_build(self) -> Callable[[list[Any]], Message]:
        """items holds at least the required fields here (decode checked it); an optional field
        past its end is absent."""
        env: dict[str, Any] = {
            "_A": _ABSENT,
            "_cls": self.cls,
            "_new": tuple.__new__,
            "_Range": MemoryRange,
            "_slow": self.build_checked,
            "_L": _U64_LIMIT,
            "_PM": PAGE_MASK,
            "_MAX": MAX_ADDRESS,
            "_MAX_IDS": MAX_RELEASE_IDS,
        }
        lines, checks, args = [], [], []
        pos = 2
        for i, (_, kind, check, label) in enumerate(self.fields):
            v = f"v{pos}"
            if i >= self.required:
                lines.append(f"    {v} = items[{pos}] if len(items) > {pos} else _A")
                env[f"_check{i}"], env[f"_label{i}"] = check, label
                # checked while the message is built, after every required field: the same
                # order (so the same first error) as the field-by-field builder
                args.append(f"None if {v} is _A else _check{i}({v}, _label{i})")
                pos += 1
                continue
            lines.append(f"    {v} = items[{pos}]")
            if kind is Kind.RANGE:
                z = f"v{pos + 1}"
                lines.append(f"    {z} = items[{pos + 1}]")
                checks.append(
                    f"type({v}) is int and type({z}) is int and 0 <= {v} < _L and 0 < {z} < _L"
                    f" and not ({v} | {z}) & _PM and {v} + {z} <= _MAX"
                )
                args.append(f"_new(_Range, ({v}, {v} + {z}))")
                pos += 2
                continue
            if kind is Kind.U64:
                checks.append(f"type({v}) is int and 0 <= {v} < _L")
                args.append(v)
            elif kind is Kind.BOOL:
                checks.append(f"type({v}) is bool")
                args.append(v)
            elif kind is Kind.IDS:
                checks.append(
                    f"type({v}) is list and len({v}) <= _MAX_IDS"
                    f" and all(type(x) is int and 0 <= x < _L for x in {v})"
                )
                args.append(f"tuple({v})")
            else:  # the rarer kinds keep their checker, which raises the precise error itself
                env[f"_check{i}"], env[f"_label{i}"] = check, label
                args.append(f"_check{i}({v}, _label{i})")
            pos += 1
        lines.append(f"    if {' and '.join(checks) or 'True'}:")
        lines.append(f"        return _cls({', '.join(args)})")
        lines.append("    return _slow(items)")
        return self._compile("def build(items):\n" + "\n".join(lines) + "\n", "build", env)

    def _compile(self, source: str, name: str, env: dict[str, Any]) -> Callable[..., Any]:
        # The source is made from this module's own field tables (class and field names that
        # are Python identifiers), never from anything received.
        code = compile(source, f"<membacking codec: {self.cls.__name__}.{name}>", "exec")
        exec(code, env)
        fn: Callable[..., Any] = env[name]
        return fn


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
    # the one rule for names (units.check_name): 1 to 64 of [A-Za-z0-9_.:-], no leading '-'
    try:
        return check_name(value, f"field {field!r}")
    except ValueError as exc:
        raise ProtocolError(str(exc), reason="bad-field") from None


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


def _msgpack_kind(value: object) -> str:
    """What a decoded value was on the wire, in msgpack's words (for a peer in any language)."""
    kinds = {bool: "boolean", int: "integer", float: "float", str: "string", bytes: "binary"}
    kinds.update({list: "array", dict: "map", type(None): "nil"})
    return kinds.get(type(value), "extension")


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


def _packed(value: Any, field: str) -> bytes:
    if type(value) is not bytes or len(value) % 8:
        raise ProtocolError(
            f"field {field!r} must be binary of little-endian u64s (a multiple of 8 bytes)",
            reason="bad-field",
        )
    return value


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
    Kind.PACKED: _packed,
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
        what = (
            f"unsupported protocol version {items[0]}"
            if type(items[0]) is int
            else f"the protocol version is a msgpack {_msgpack_kind(items[0])}, not an integer"
        )
        raise ProtocolError(f"{what} (this side speaks {PROTOCOL_VERSION})", reason="version")
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
    if len(items) < plan.min_len:  # more is fine: a later revision's trailing fields, ignored
        at_least = "at least " if plan.min_len < plan.wire_len else ""
        raise ProtocolError(
            f"{cls.__name__} needs {at_least}{plan.min_len - 2} wire fields, got {len(items) - 2}",
            reason="bad-arity",
        )
    return plan.build(items)
