"""`membacking bench`: every benchmark beside its raw baseline (see docs/PERFORMANCE.md)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("bench")
@click.option("--quick", is_flag=True, help="Smaller sizes and fewer rounds (a minute or two).")
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write every number to this JSON file.",
)
def bench_cmd(quick: bool, json_path: Path | None) -> None:
    """Measure membacking against raw baselines in the same run and print a table."""
    from ..bench import main

    main(quick=quick, json_path=json_path)
