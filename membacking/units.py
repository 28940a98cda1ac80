"""Parsing and formatting of the names, sizes and specs operators type: `ram0`, `64M`,
`0xfff00000`, `ram0=0:64M`, `rom=0xfff00000:1M:ro`. Pure functions; errors are ValueError with a
clear text. `check_name` is the one rule for region and mapper names, wherever they arrive.
"""

from __future__ import annotations

import re

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
#: a number and an optional suffix: K, KB, KiB and Ki all mean 1024 (a B alone: bytes; after a
#: hex number a B is one more hex digit)
_NUMBER = re.compile(r"^(0[xX][0-9a-fA-F_]+|[0-9][0-9_]*)\s*(?:([kKmMgGtT])i?[bB]?|[bB])?$")
#: longest region or mapper name
MAX_NAME_LEN = 64
_NAME = re.compile(rf"[A-Za-z0-9_.:][A-Za-z0-9_.:\-]{{0,{MAX_NAME_LEN - 1}}}")


def parse_size(text: str, what: str = "size") -> int:
    """Parse a byte count or address: decimal or 0x-hex, optional K/M/G/T (powers of 1024)."""
    match = _NUMBER.match(text.strip())
    if match is None:
        if text.strip().startswith("-") and _NUMBER.match(text.strip()[1:].lstrip()):
            raise ValueError(f"{what} {text!r} must not be negative")
        raise ValueError(
            f"invalid {what} {text!r}: use a decimal or 0x-hex number, optionally with K, M, G or T"
        )
    digits, suffix = match.group(1), match.group(2) or ""
    try:
        value = int(digits, 0) if digits[:2].lower() == "0x" else int(digits, 10)
    except ValueError:  # underscores in the wrong places: "0x_", "1__0"
        raise ValueError(
            f"invalid {what} {text!r}: use a decimal or 0x-hex number, optionally with K, M, G or T"
        ) from None
    value *= _SUFFIXES[suffix.upper()]
    if value >= 1 << 64:  # nothing on the wire is wider (PROTOCOL.md)
        raise ValueError(f"{what} {text!r} does not fit in 64 bits")
    return value


#: every mapper reserves the whole guest address space in its own: keep it well inside the
#: 128 TiB a process has on x86-64 and arm64 (4-level page tables)
MAX_ADDRESS_SPACE = 1 << 46
MIN_ADDRESS_SPACE = 1 << 20


def check_address_space(size: int) -> int:
    """A guest address space size a mapper can reserve: page-aligned, 1 MiB to 64 TiB."""
    shown = format_size(size) if size % 4096 == 0 else format_address(size)
    if size > MAX_ADDRESS_SPACE:
        raise ValueError(
            f"address space {shown} is more than the 64 TiB limit (every mapper reserves all of it)"
        )
    if size < MIN_ADDRESS_SPACE:
        raise ValueError(f"address space {shown} is less than the 1 MiB minimum")
    if size % 4096:
        raise ValueError(f"address space {shown} must be a multiple of {PAGE} (a page)")
    return size


def format_duration(seconds: float) -> str:
    """A duration for people: 4.2 -> '4.2 s', 3725 -> '1 h 2 min 5 s'."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "min"), (secs, "s")]
    shown = [f"{n} {unit}" for n, unit in parts if n]
    return " ".join(shown[:3])


def format_address(n: int) -> str:
    """An address or value as typed back to an operator: hex, with the decimal beside it when
    they differ (`0x1000 (4096)`), so neither way of typing it reads wrong."""
    return f"{n:#x}" if 0 <= n < 10 else f"{n:#x} ({n})"


#: the page size every region's address, size and change must be a multiple of
PAGE = 4096


def check_pages(value: int, what: str, nonzero: bool = False) -> int:
    """`value` if it is a multiple of the page (and not 0 with `nonzero`), else ValueError
    naming it as typed back: `size 0x1388 (5000) must be a non-zero multiple of 4096`."""
    if value % PAGE or (nonzero and value <= 0):
        raise ValueError(page_error(value, what, nonzero))
    return value


def page_error(value: int, what: str, nonzero: bool = False) -> str:
    """The words of `check_pages`'s error."""
    kind = "a non-zero multiple" if nonzero else "a multiple"
    return f"{what} {format_address(value)} must be {kind} of {PAGE} (a page)"


def plural(count: int, word: str, words: str | None = None) -> str:
    """`1 byte`, `2 bytes`, `0 holders`: a count with its noun in the right number."""
    return f"{count} {word if count == 1 else (words or word + 's')}"


def check_name(name: object, what: str = "name") -> str:
    """`name` if it is a valid region or mapper name: 1 to 64 ASCII letters, digits, '_', '.',
    ':' or '-', not starting with '-' (so it cannot pass for an option, and nothing in it can
    move a terminal's cursor, split a log line or a path). ValueError otherwise."""
    if type(name) is not str or _NAME.fullmatch(name) is None:
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:72] + "...'"
        raise ValueError(
            f"invalid {what} {shown}: use 1 to {MAX_NAME_LEN} letters, digits, '_', '.', ':' or "
            "'-', not starting with '-'"
        )
    return name


def parse_range_spec(text: str) -> tuple[int, int]:
    """`GPA:SIZE` -> (gpa, size)."""
    parts = text.split(":")
    if len(parts) != 2:
        raise ValueError(f"invalid range {text!r}: expected GPA:SIZE, e.g. 0:64M")
    return parse_size(parts[0], "address"), parse_size(parts[1])


def parse_region_spec(text: str) -> tuple[str, int, int, bool]:
    """`NAME=GPA:SIZE[:ro]` -> (name, gpa, size, readonly)."""
    name, sep, rest = text.partition("=")
    if not sep:
        raise ValueError(f"invalid region {text!r}: expected NAME=GPA:SIZE[:ro], e.g. ram0=0:64M")
    check_name(name)
    parts = rest.split(":")
    readonly = False
    if len(parts) == 3:
        if parts[2].lower() not in ("ro", "readonly"):
            raise ValueError(f"invalid region {text!r}: the optional third field must be 'ro'")
        readonly = True
        parts = parts[:2]
    gpa, size = parse_range_spec(":".join(parts))
    try:  # checked here, as the configuration file's regions are: a usage mistake
        check_pages(gpa, "gpa")
        check_pages(size, "size", nonzero=True)
    except ValueError as exc:
        raise ValueError(f"invalid region {text!r}: {exc}") from None
    return name, gpa, size, readonly


def format_size(n: int) -> str:
    """A byte count for people: 4096 -> '4 KiB', 1536 -> '1.5 KiB'."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} B"
