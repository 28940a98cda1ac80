"""`membacking mem read|write|dump|fill|find`: guest memory through a short-lived mapper."""

from __future__ import annotations

import binascii
import logging
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import click

from .. import units
from ..mapper import GuestMemory, attach
from .common import (
    ADDRESS,
    BYTE,
    PROGRESS_STEP,
    SIZE,
    Group,
    NumericArgs,
    control_client,
    echo_json,
    json_option,
    progress,
    runtime_dir_option,
    timeout_option,
)


@click.group(cls=Group)
def mem() -> None:
    """Read and write guest memory through a short-lived mapper."""
    # The command's own one-line error says what went wrong; the short-lived mapper's log lines
    # would only repeat it.
    logging.getLogger("membacking.mapper").setLevel(logging.CRITICAL)


@mem.command("read", cls=NumericArgs)
@runtime_dir_option
@timeout_option("10")
@click.argument("gpa", type=ADDRESS)
@click.argument("length", type=SIZE)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["hex", "raw"]),
    default="hex",
    show_default=True,
    help="Hex digits on one line, or the raw bytes.",
)
def mem_read(runtime_dir: Path, timeout: float | None, gpa: int, length: int, fmt: str) -> None:
    """Read LENGTH bytes at guest address GPA."""
    with attach(runtime_dir, name="cli-mem-read", timeout=timeout or 10.0) as memory:
        chunks = _read_chunks(memory, gpa, length, "reading")
        if fmt == "raw":
            for chunk in chunks:
                sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
        else:
            for chunk in chunks:
                click.echo(chunk.hex(), nl=False)
            click.echo()


#: what one step of a long read or dump holds in memory
READ_STEP = 1 << 20


def _read_chunks(memory: GuestMemory, gpa: int, length: int, verb: str) -> Iterator[bytes]:
    """The bytes of [gpa, gpa+length) in steps, after checking all of it is backed (so an error
    comes before any output, and a long read never holds it all in memory), read from the
    backing files: memory never written reads as zeros and is not allocated by the read."""
    from ..mapper.peek import peek

    memory.ensure_mapped(gpa, length)
    with progress(length, f"{verb} {units.plural(length, 'byte')}") as bar:
        for start in range(gpa, gpa + length, READ_STEP):
            chunk = peek(memory, start, min(READ_STEP, gpa + length - start))
            bar.update(len(chunk))
            yield chunk


@mem.command("write", cls=NumericArgs)
@runtime_dir_option
@timeout_option("10")
@click.argument("gpa", type=ADDRESS)
@click.option("--hex", "hex_data", default=None, help="Bytes to write, as hex digits.")
@click.option(
    "--file",
    "path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Write the contents of this file.",
)
@json_option
def mem_write(
    runtime_dir: Path,
    timeout: float | None,
    gpa: int,
    hex_data: str | None,
    path: Path | None,
    as_json: bool,
) -> None:
    """Write bytes at guest address GPA."""
    if (hex_data is None) == (path is None):
        raise click.UsageError("give exactly one of --hex or --file")
    data = b""
    if hex_data is not None:
        try:
            data = binascii.unhexlify(hex_data.replace(" ", "").removeprefix("0x"))
        except (binascii.Error, ValueError):
            raise click.BadParameter(
                f"{hex_data!r} is not hex bytes: give pairs of digits 0-9, a-f (e.g. cafe01)",
                param_hint="--hex",
            ) from None
    with attach(runtime_dir, name="cli-mem-write", timeout=timeout or 10.0) as memory:
        if hex_data is not None:
            memory.write_at(gpa, data)
            total = len(data)
        else:
            assert path is not None
            total = path.stat().st_size
            with open(path, "rb") as source, progress(total, f"writing {path.name}") as bar:
                offset = 0
                while chunk := source.read(PROGRESS_STEP):
                    memory.write_at(gpa + offset, chunk)
                    offset += len(chunk)
                    bar.update(len(chunk))
            total = offset
    if as_json:
        echo_json({"gpa": gpa, "bytes": total})
    else:
        click.echo(f"wrote {units.plural(total, 'byte')} at {units.format_address(gpa)}")


def hexdump(gpa: int, chunks: Iterable[bytes]) -> Iterator[str]:
    """Lines of `hexdump -C` style: address, 16 bytes in hex, ASCII; repeats collapse to '*'.
    `chunks` are consecutive pieces of memory from `gpa` on, each but the last a multiple of 16
    bytes long."""
    rows = (chunk[i : i + 16] for chunk in chunks for i in range(0, len(chunk), 16))
    previous: bytes | None = None
    starred = False
    offset = 0
    row = next(rows, None)
    while row is not None:
        following = next(rows, None)
        if row == previous and following is not None:  # the last row is always shown
            if not starred:
                yield "*"
                starred = True
        else:
            previous, starred = row, False
            cells = [f"{b:02x}" for b in row] + ["  "] * (16 - len(row))
            text = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
            yield f"{gpa + offset:016x}  {' '.join(cells[:8])}  {' '.join(cells[8:])}  |{text}|"
        offset += len(row)
        row = following
    yield f"{gpa + offset:016x}"


@mem.command("dump", cls=NumericArgs)
@runtime_dir_option
@timeout_option("10")
@click.argument("gpa", type=ADDRESS)
@click.argument("length", type=SIZE)
@json_option
def mem_dump(
    runtime_dir: Path, timeout: float | None, gpa: int, length: int, as_json: bool
) -> None:
    """Show LENGTH bytes at guest address GPA as a hexdump (addresses, hex, ASCII)."""
    with attach(runtime_dir, name="cli-mem-dump", timeout=timeout or 10.0) as memory:
        chunks = _read_chunks(memory, gpa, length, "dumping")
        if as_json:  # the bytes as hex, with where they came from
            echo_json({"gpa": gpa, "length": length, "hex": b"".join(chunks).hex()})
            return
        for line in hexdump(gpa, chunks):
            click.echo(line)


@mem.command("fill", cls=NumericArgs)
@runtime_dir_option
@timeout_option("10")
@click.argument("gpa", type=ADDRESS)
@click.argument("length", type=SIZE)
@click.argument("byte", type=BYTE)
@json_option
def mem_fill(
    runtime_dir: Path, timeout: float | None, gpa: int, length: int, byte: int, as_json: bool
) -> None:
    """Set LENGTH bytes at guest address GPA to BYTE (0-255)."""
    if not 0 <= byte <= 255:
        raise click.BadParameter(f"{byte} is not a byte value (0-255)", param_hint="BYTE")
    with (
        attach(runtime_dir, name="cli-mem-fill", timeout=timeout or 10.0) as memory,
        progress(length, f"filling {units.plural(length, 'byte')}") as bar,
    ):
        for start in range(gpa, gpa + length, PROGRESS_STEP):
            step = min(PROGRESS_STEP, gpa + length - start)
            memory.fill_at(start, byte, step)
            bar.update(step)
    if as_json:
        echo_json({"gpa": gpa, "bytes": length, "byte": byte})
    else:
        click.echo(
            f"filled {units.plural(length, 'byte')} at {units.format_address(gpa)} "
            f"with {units.format_address(byte)}"
        )


def _backed_runs(regions: list[dict[str, Any]], start: int) -> list[tuple[int, int]]:
    """(GPA, bytes) of each stretch from `start` on that active regions' mappings back without
    a gap, in order (the first starts at `start` if `start` is backed)."""
    pieces = sorted(
        (max(start, r["gpa"] + s["offset"]), r["gpa"] + s["offset"] + s["size"])
        for r in regions
        if r["active"]
        for s in r["mappings"]
    )
    runs: list[list[int]] = []
    for lo, hi in pieces:
        if hi <= lo:
            continue
        if runs and lo <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], hi)
        else:
            runs.append([lo, hi])
    return [(lo, hi - lo) for lo, hi in runs]


@mem.command("find")
@runtime_dir_option
@timeout_option("10")
@click.argument("pattern")
@click.option("--hex", "is_hex", is_flag=True, help="PATTERN is hex digits, not text.")
@click.option("--start", type=ADDRESS, default=0, show_default=True, help="First GPA to search.")
@click.option(
    "--length",
    type=SIZE,
    default=None,
    help="Bytes to search [default: up to the first unbacked GPA from --start].",
)
@click.option(
    "--all",
    "everywhere",
    is_flag=True,
    help="Search every backed range from --start on, across holes (e.g. RAM and DIMMs).",
)
@click.option(
    "--max-matches", type=int, default=1000, show_default=True, help="Stop after this many."
)
@json_option
def mem_find(
    runtime_dir: Path,
    timeout: float | None,
    pattern: str,
    is_hex: bool,
    start: int,
    length: int | None,
    everywhere: bool,
    max_matches: int,
    as_json: bool,
) -> None:
    """Print the guest addresses where PATTERN (text, or hex with --hex) occurs."""
    if is_hex:
        try:
            needle = binascii.unhexlify(pattern.replace(" ", "").removeprefix("0x"))
        except (binascii.Error, ValueError):
            raise click.BadParameter(
                f"{pattern!r} is not hex bytes: give pairs of digits 0-9, a-f",
                param_hint="PATTERN",
            ) from None
    else:
        needle = pattern.encode()
    if not needle:
        raise click.BadParameter("the pattern is empty", param_hint="PATTERN")
    if max_matches < 1:
        raise click.BadParameter("must be at least 1", param_hint="--max-matches")
    if everywhere and length is not None:
        raise click.UsageError("--all searches every backed range: give it without --length")
    runs = [(start, length)] if length is not None else []
    if length is None:
        runs = _backed_runs(control_client(runtime_dir, timeout).regions(), start)
        if not runs or (not everywhere and runs[0][0] != start):
            raise click.ClickException(f"no active region backs GPA {start:#x}")
        runs = runs if everywhere else runs[:1]
    length = sum(n for _, n in runs)
    matches: list[int] = []
    with (
        attach(runtime_dir, name="cli-mem-find", timeout=timeout or 10.0) as memory,
        progress(length, f"searching {units.plural(length, 'byte')}") as bar,
    ):
        for gpa, n in runs:  # an unbacked GPA is an error before any output
            memory.ensure_mapped(gpa, n)
        for gpa, n in runs:
            for found in memory.find_all(needle, gpa, n, bar.update):
                matches.append(found)
                if not as_json:
                    click.echo(f"{found:#x}")
                if len(matches) >= max_matches:
                    break
            if len(matches) >= max_matches:
                break
    truncated = len(matches) >= max_matches
    if as_json:
        echo_json(
            {
                "pattern": needle.hex(),
                "start": start,
                "length": length,
                "matches": matches,
                "truncated": truncated,
            }
        )
    elif truncated:
        cap = units.plural(max_matches, "match", "matches")
        click.echo(f"stopped after {cap} (--max-matches)", err=True)
    elif not matches:  # (said where a person reads it; stdout stays the list of matches)
        click.echo(f"no match in {units.plural(length, 'byte')}", err=True)
