"""Run the reliability suite and write the table of docs/RELIABILITY.md from what it measured.

python scripts/reliability_report.py
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "RELIABILITY.md"
START, END = "<!-- measured:start -->", "<!-- measured:end -->"


def main() -> int:
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl", delete=False) as handle:
        log = Path(handle.name)
    # the soaks run 20 kills and 20 handovers here (fewer in the ordinary suite, to keep it fast)
    env = dict(
        os.environ,
        MEMBACKING_RELIABILITY_LOG=str(log),
        MEMBACKING_SOAK_KILLS="20",
        MEMBACKING_SOAK_HANDOVERS="20",
    )
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "tests/reliability",
            "tests/test_hostile_peers.py",
            "tests/test_peer_credentials.py",
            "tests/test_qemu_restart.py",
        ],
        cwd=ROOT,
        env=env,
    )
    elapsed = time.monotonic() - started
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    log.unlink()
    lines = [
        START,
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, Linux {platform.release()}; the suite took "
        f"{elapsed:.0f} s and {'passed' if result.returncode == 0 else 'FAILED'}.",
        "",
        "| fault or bad input | times | what happened | lost | manager fds before/after | "
        "memfds before/after |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        fds = f"{row['fds_before']}/{row['fds_after']}" if row["fds_before"] else "-"
        memfds = (
            f"{row['memfds_before']}/{row['memfds_after']}"
            if row["fds_before"] and row["memfds_before"]
            else "-"
        )
        lines.append(
            f"| {row['scenario']} | {row['tried']} | {row['outcome']} | {row['lost']} "
            f"| {fds} | {memfds} |"
        )
    lines.append(END)
    text = DOC.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    DOC.write_text(head + "\n".join(lines) + tail)
    print(f"wrote {DOC} ({len(rows)} rows)")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
