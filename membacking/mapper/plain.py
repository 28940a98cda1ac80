"""Plain values in guest memory: how `GuestMemory` turns a struct format into one load or store
of a whole 1-, 2-, 4- or 8-byte word (`PlainFormat`, cached by `PlainFormats`), its fetch-add,
and the argument checks its accessors share.
"""

from __future__ import annotations

import functools
import operator
import re
import struct
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

from ..errors import AtomicsUnavailableError, DetachedError
from ..ffi import Reservation, atomics_unavailable

#: a single integer field, optionally after a byte-order prefix: stored straight from the value
_INTEGER = re.compile(r"([@=<>!]?)([bBhHiIlLqQnN])")
_NATIVE_ORDER = ("", "@", "=", "<" if sys.byteorder == "little" else ">")
_SHIFTS = {1: 0, 2: 1, 4: 2, 8: 3}
#: the native unsigned word of each width (memoryview.cast codes, and struct formats with '=')
_UNSIGNED = {1: "B", 2: "H", 4: "I", 8: "Q"}


class PlainFormat(NamedTuple):
    """What read_plain / write_plain need to know about one struct format.

    `code` is the memoryview cast of guest memory to native words of the format's size (None
    unless that is 1, 2, 4 or 8 bytes; `Reservation.words` gives the view): item `gpa >> shift`
    is the word at an aligned `gpa`, loaded or stored with one fixed-size copy. For an integer
    format in native byte order the item is the value itself (`word_bytes` is None); for others
    the fast paths convert through bytes with the bound struct methods below (no Python frame
    in between).
    """

    code: str | None
    shift: int
    mask: int
    #: one field: the value is not a tuple
    single: bool
    #: the native word's bytes (None where the item is the value)
    word_bytes: Callable[[int], bytes] | None
    #: the values in those bytes
    values_of: Callable[[bytes], tuple[Any, ...]]
    #: the bytes of a value (a tuple for several fields)
    bytes_of: Callable[[Any], bytes]
    #: the native word made of those bytes (as a 1-tuple)
    word_of: Callable[[bytes], tuple[int]] | None
    st: struct.Struct
    fmt: str
    #: one integer field (what compare_exchange and fetch_add accept)
    integer: bool
    #: the word is stored in the other byte order than the value's (fetch_add cannot use the
    #: hardware's add on it)
    swapped: bool

    def decode(self, word: int) -> Any:
        """The value held by the unsigned native `word`."""
        return unpacked(self.st.unpack(word.to_bytes(self.mask + 1, sys.byteorder)))

    def encode(self, value: Any) -> int:
        """The unsigned native word holding `value`; TypeError or ValueError as `pack`."""
        return int.from_bytes(pack(self.st, self.fmt, value), sys.byteorder)

    def item(self, value: Any) -> Any:
        """What to store in `view` for `value`; TypeError or ValueError as `pack`."""
        if self.word_bytes is not None:
            return self.encode(value)
        return self.st.unpack(pack(self.st, self.fmt, value))[0]


#: PlainFormat's first nine fields, then the PlainFormat; first, in place of the code, the view
#: of words taken when it was last looked up (retired by any change of the mappings)
FastPlain = tuple[
    memoryview | None,
    int,
    int,
    bool,
    Callable[[int], bytes] | None,
    Callable[[bytes], tuple[Any, ...]],
    Callable[[Any], bytes],
    Callable[[bytes], tuple[int]] | None,
    struct.Struct,
    PlainFormat,
]

#: what struct says of a value of the wrong kind (anything else it refuses is out of range)
_WRONG_KIND = ("not an integer", "not a float", "must be a bytes", "requires a bytes")


def pack(st: struct.Struct, fmt: str, value: Any) -> bytes:
    """`value` (a tuple for several fields) packed in `fmt`: TypeError if it is of the wrong
    kind for the format, ValueError if out of range or of the wrong number of fields."""
    values = value if isinstance(value, tuple) else (value,)
    try:
        data = st.pack(*values)
    except struct.error as exc:
        kind = TypeError if any(s in str(exc) for s in _WRONG_KIND) else ValueError
        raise kind(f"{value!r} cannot be stored as {fmt!r}: {exc}") from None
    if bool in map(type, values):  # a bool only for a '?' field (one that reads back a bool)
        for given, read in zip(values, st.unpack(data), strict=True):
            if type(given) is bool and type(read) is not bool:
                raise TypeError(
                    f"{value!r} cannot be stored as {fmt!r}: a bool is not a number "
                    "(only a '?' field takes one)"
                )
    return data


def unpacked(values: tuple[Any, ...]) -> Any:
    """One field: the value; several: the tuple."""
    return values[0] if len(values) == 1 else values


#: largest format whose fields plain_format counts by unpacking zeros, and whose value
#: write_plain packs before it checks the range
LARGE_FORMAT = 1 << 16
_FIELD = re.compile(r"\s*(\d*)([^\s\d])")


def _items(fmt: str) -> int:
    """How many values struct unpacks for the valid format `fmt`: a count repeats a field but
    for "s" and "p" (one bytes) and "x" (padding: none)."""
    items = 0
    for count, code in _FIELD.findall(fmt.lstrip("@=<>!")):
        items += 0 if code == "x" else 1 if code in "sp" else int(count or 1)
    return items


def plain_format(fmt: Any) -> PlainFormat:
    """Parse `fmt`. TypeError if `fmt` is not a str, ValueError if struct does not take it."""
    if type(fmt) is not str:
        raise TypeError(f"a plain-value format must be a struct format string, got {fmt!r}")
    try:
        st = struct.Struct(fmt)
    except struct.error as exc:
        raise ValueError(f"invalid struct format {fmt!r}: {exc}") from None
    size = st.size
    if not size:  # nothing to access ("0p" also made struct raise SystemError)
        raise ValueError(f"invalid struct format {fmt!r}: it describes no bytes")
    shift = _SHIFTS.get(size, -1)
    match = _INTEGER.fullmatch(fmt)
    integer = match is not None
    swapped = match is not None and match.group(1) not in _NATIVE_ORDER
    # counted without unpacking a format too large to unpack cheaply: a huge read must reach
    # its range check before anything the size of the format is allocated
    single = (len(st.unpack(bytes(size))) if size <= LARGE_FORMAT else _items(fmt)) == 1
    bytes_of = st.pack if single else functools.partial(_pack_fields, st)
    if shift < 0:
        return PlainFormat(
            None, 0, 0, single, None, st.unpack, bytes_of, None, st, fmt, integer, swapped
        )
    if match is not None and not swapped:  # the item is the value
        code = _UNSIGNED[size].lower() if match.group(2).islower() else _UNSIGNED[size]
        return PlainFormat(
            code,
            shift,
            size - 1,
            single,
            None,
            st.unpack,
            bytes_of,
            None,
            st,
            fmt,
            True,
            False,
        )
    native = struct.Struct("=" + _UNSIGNED[size])
    return PlainFormat(
        _UNSIGNED[size],
        shift,
        size - 1,
        single,
        native.pack,
        st.unpack,
        bytes_of,
        native.unpack,
        st,
        fmt,
        integer,
        swapped,
    )


class PlainFormats:
    """The formats one GuestMemory has parsed, each with the view of words it last used."""

    def __init__(self, reservation: Reservation) -> None:
        self._reservation = reservation
        #: struct format -> PlainFormat's fields as a plain tuple (unpacking a NamedTuple goes
        #: through its iterator: slow), then the PlainFormat
        self.cache: dict[str, FastPlain] = {}
        self._atomic: dict[str, PlainFormat] = {}

    def parse(self, fmt: Any) -> FastPlain:
        """`fmt` parsed and cached; TypeError or ValueError as `plain_format`."""
        spec = plain_format(fmt)
        view = None if spec.code is None else self.words(spec.code)
        fast = self.cache[fmt] = (view, *spec[1:9], spec)
        return fast

    def words(self, code: str) -> memoryview:
        """Guest memory as native words of `code`: valid until the mappings next change (see
        Reservation.words), so for as long as the access lock is held."""
        try:
            return self._reservation.words(code)
        except ValueError:  # the reservation is released
            raise DetachedError("this GuestMemory is detached") from None

    def current(self, fmt: str) -> memoryview:
        """The view of words of the parsed `fmt` in use now (access lock held), which its cached
        entry then holds for the fast paths."""
        fast = self.cache[fmt]
        view = self.words(fast[-1].code)  # type: ignore[arg-type]
        if view is not fast[0]:
            self.cache[fmt] = (view, *fast[1:])
        return view

    def atomic(self, fmt: Any) -> PlainFormat:
        """`fmt` checked for the atomic operations (`atomic_format`); AtomicsUnavailableError
        where libatomic is missing."""
        try:
            return self._atomic[fmt]
        except (KeyError, TypeError):
            try:
                fast = self.cache[fmt]
            except (KeyError, TypeError):
                fast = self.parse(fmt)
            spec = atomic_format(fast[-1])
            unavailable = atomics_unavailable()
            if unavailable is not None:
                raise AtomicsUnavailableError(unavailable) from None
            self._atomic[fmt] = spec
            return spec


def _pack_fields(st: struct.Struct, values: Any) -> bytes:
    """The fast paths' packer of several fields: TypeError for a bool (they then call `pack`,
    which says whether the format takes it)."""
    if bool in map(type, values):
        raise TypeError
    return st.pack(*values)


def as_int(value: Any) -> Any:
    """An int of a subclass of int (an IntEnum, ...) as the plain int of its value; anything else
    as it is, for the caller's check to refuse (a bool too: it is no address, length or number
    here). The accessors call it only for what is not a plain int, off their fast paths."""
    if isinstance(value, int) and type(value) is not bool:
        return operator.index(value)
    return value


def address_and_length(gpa: Any, n: Any) -> tuple[int, int]:
    """A guest address and length as plain ints (an int subclass such as IntEnum is converted);
    TypeError for anything else, bools included."""
    gpa, n = as_int(gpa), as_int(n)
    if type(gpa) is not int or type(n) is not int:
        raise TypeError(
            f"guest address and length must be integers, got {type(gpa).__name__} "
            f"{gpa!r} and {type(n).__name__} {n!r}"
        )
    return gpa, n


def fill_byte(byte: Any) -> int:
    """`fill_at`'s byte as a plain int (an int subclass such as IntEnum is converted):
    TypeError if it is no int (bools included), ValueError outside 0..255."""
    byte = as_int(byte)
    if type(byte) is not int or not 0 <= byte <= 255:
        raise (TypeError if type(byte) is not int else ValueError)(
            f"fill byte must be {'an integer' if type(byte) is not int else '0..255'}, got "
            f"{byte!r}: fill_at(gpa, byte, n) takes the fill byte 2nd, the length n 3rd"
        )
    return byte


def swap_word(word: int, size: int) -> int:
    """`word` with its `size` bytes in the other order."""
    return int.from_bytes(word.to_bytes(size, "little"), "big")


def add_delta(fmt: PlainFormat, delta: Any) -> int:
    """`delta` as an unsigned addend of the format's width (adding wraps like the hardware);
    TypeError if it is no int (bools included; an int subclass such as IntEnum is taken),
    ValueError unless -2**(bits-1) <= delta < 2**bits: a delta in the signed range of the width
    subtracts, whatever the format's sign."""
    if type(delta) is not int:
        delta = as_int(delta)
    if type(delta) is not int:
        raise TypeError(f"fetch_add needs an integer to add, got {delta!r}")
    bits = 8 << fmt.shift
    if not -(1 << (bits - 1)) <= delta < 1 << bits:
        raise ValueError(
            f"{delta} does not fit a {bits}-bit word: fetch_add takes -2**{bits - 1} to "
            f"2**{bits}-1 (a negative delta subtracts)"
        )
    return delta & ((1 << bits) - 1)


def atomic_format(fmt: PlainFormat) -> PlainFormat:
    """`fmt` if atomic operations take it (one integer field of 4 or 8 bytes), else ValueError."""
    if not fmt.integer or fmt.shift not in (2, 3) or fmt.code is None:
        raise ValueError(
            f"atomic operations take one 4- or 8-byte integer (e.g. '<I', '>q'), not {fmt.fmt!r}"
        )
    return fmt


def byte_view(data: Any, what: str, writable: bool = False) -> memoryview:
    """`data` as a flat memoryview of bytes; TypeError if it is no (writable) bytes-like."""
    try:
        view = memoryview(data).cast("B")
    except TypeError:
        raise TypeError(
            f"{what} needs a {'writable ' if writable else ''}contiguous bytes-like object, "
            f"got {type(data).__name__}"
        ) from None
    if writable and view.readonly:
        raise TypeError(f"{what} needs a writable buffer, got a read-only {type(data).__name__}")
    return view


def fetch_add_op(
    reservation: Reservation, spec: PlainFormat, gpa: int, addend: int
) -> Callable[[], int]:
    """The fetch-add of `addend` to the word at `gpa`, to run under the access lock once the
    word is mapped writable; it returns the word found."""
    size = spec.mask + 1
    if not spec.swapped:
        return lambda: reservation.fetch_add(gpa, size, addend)
    code, shift, wrap = spec.code, spec.shift, (1 << (8 * size)) - 1
    assert code is not None

    def add_swapped() -> int:  # no hardware add for the other byte order: a CAS loop
        view = reservation.words(code)  # under the access lock: no change retires it meanwhile
        while True:
            found = view[gpa >> shift]
            total = swap_word((swap_word(found, size) + addend) & wrap, size)
            ok, seen = reservation.compare_exchange(gpa, size, found, total)
            if ok:
                return seen

    return add_swapped
