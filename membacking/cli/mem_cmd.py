"""`membacking mem read|write`: guest memory through a short-lived mapper."""

from __future__ import annotations

import binascii
import sys
from pathlib import Path

import click

from .common import ADDRESS, SIZE, Group, runtime_dir_option


@click.group(cls=Group)
def mem() -> None:
    """Read and write guest memory through a short-lived mapper."""


@mem.command("read")
@runtime_dir_option
@click.argument("gpa", type=ADDRESS)
@click.argument("length", type=SIZE)
@click.option(
    "--format", "fmt", type=click.Choice(["hex", "raw"]), default="hex", show_default=True
)
def mem_read(runtime_dir: Path | None, gpa: int, length: int, fmt: str) -> None:
    """Read LENGTH bytes at guest address GPA."""
    from ..mapper import attach

    with attach(runtime_dir, name="cli-mem-read") as memory:
        data = memory.read_at(gpa, length)
    if fmt == "raw":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        click.echo(data.hex())


@mem.command("write")
@runtime_dir_option
@click.argument("gpa", type=ADDRESS)
@click.option("--hex", "hex_data", default=None, help="Bytes to write, as hex digits.")
@click.option(
    "--file",
    "path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Write the contents of this file.",
)
def mem_write(runtime_dir: Path | None, gpa: int, hex_data: str | None, path: Path | None) -> None:
    """Write bytes at guest address GPA."""
    from ..mapper import attach

    if (hex_data is None) == (path is None):
        raise click.UsageError("give exactly one of --hex or --file")
    if hex_data is not None:
        try:
            data = binascii.unhexlify(hex_data.replace(" ", "").removeprefix("0x"))
        except (binascii.Error, ValueError):
            raise click.BadParameter(
                f"{hex_data!r} is not an even number of hex digits", param_hint="--hex"
            ) from None
    else:
        assert path is not None
        data = path.read_bytes()
    with attach(runtime_dir, name="cli-mem-write") as memory:
        memory.write_at(gpa, data)
    click.echo(f"wrote {len(data)} bytes at {gpa:#x}")
