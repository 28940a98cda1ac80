"""A bounded coverage-guided fuzzing run of the decoder with atheris, where atheris installs
(Linux x86_64 wheels); elsewhere the hypothesis fuzzing in test_fuzz.py still runs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from test_faults import record

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fuzz_decoder.py"
RUNS = 30_000


@pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None,
    reason="atheris is not installed (no wheel for this platform)",
)
def test_atheris_fuzzes_the_decoder(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), f"-runs={RUNS}", "-max_len=512", "-seed=1", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Done {RUNS} runs" in result.stderr
    record(
        "decoder: coverage-guided fuzzing (atheris/libFuzzer)",
        RUNS,
        "no crash: every input rejected with ProtocolError or round-tripped",
        "nothing",
        (0, 0),
        (0, 0),
    )
