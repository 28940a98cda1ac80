"""docs/membacking.service: a unit systemd accepts, sandboxed to an exposure below 4, whose
system-call filter lets the daemon do its work. Checked with the host's systemd-analyze (and
strace for the system calls); each test says why when it cannot run here."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli_env, short_tmpdir

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "docs" / "membacking.service"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def installed_unit(tmp_path: Path) -> Path:
    """The unit as installed: its ExecStart points at this environment's membacking."""
    binary = shutil.which("membacking") or str(Path(sys.executable).with_name("membacking"))
    if not Path(binary).exists():
        pytest.skip("no installed membacking executable to point ExecStart at")
    text = UNIT.read_text().replace("/usr/local/bin/membacking", binary)
    unit = tmp_path / "membacking.service"
    unit.write_text(text)
    return unit


@needs_analyze
def test_unit_verifies(tmp_path: Path) -> None:
    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, "verify", str(installed_unit(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "membacking.service" not in result.stderr, result.stderr


@needs_analyze
def test_unit_exposure_is_below_4(tmp_path: Path) -> None:
    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, "security", "--offline=true", str(installed_unit(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    level = re.search(r"Overall exposure level for membacking.service: ([0-9.]+)", result.stdout)
    assert level is not None, result.stdout
    assert float(level.group(1)) < 4.0, result.stdout
    # the docs quote the measured rating (other systemd releases weigh options differently)
    quoted, release = quoted_rating()
    version = subprocess.run([ANALYZE, "--version"], capture_output=True, text=True).stdout
    if version.startswith(f"systemd {release} "):
        assert float(level.group(1)) == quoted, result.stdout


QUOTE = re.compile(
    r'rates (?:this unit|it) ([0-9.]+) \("OK"; measured with\s+(?:#\s+)?systemd (\d+)'
)


def quoted_rating() -> tuple[float, str]:
    """The rating the unit's comment and OPERATIONS.md quote: the same value and release."""
    found = {
        match.groups()
        for text in (UNIT.read_text(), (ROOT / "docs" / "OPERATIONS.md").read_text())
        for match in QUOTE.finditer(text)
    }
    assert len(found) == 1, found
    ((value, release),) = found
    return float(value), release


def test_docs_quote_one_rating() -> None:
    quoted_rating()


def _expand(group: str, cache: dict[str, set[str]]) -> set[str]:
    assert ANALYZE is not None
    if group not in cache:
        out = subprocess.run(
            [ANALYZE, "syscall-filter", group], capture_output=True, text=True, timeout=30
        ).stdout
        calls: set[str] = set()
        for line in out.splitlines()[1:]:
            word = line.strip()
            if word.startswith("@"):
                calls |= _expand(word, cache)
            elif word and not word.startswith("#"):
                calls.add(word)
        cache[group] = calls
    return cache[group]


def allowed_syscalls() -> set[str]:
    """What the unit's SystemCallFilter= lines let through (allow lists, then deny lists)."""
    cache: dict[str, set[str]] = {}
    allowed: set[str] = set()
    for line in UNIT.read_text().splitlines():
        if line.startswith("SystemCallFilter="):
            value = line.partition("=")[2]
            deny = value.startswith("~")
            names = value.lstrip("~").split()
            calls = set().union(*(_expand(n, cache) if n.startswith("@") else {n} for n in names))
            allowed = allowed - calls if deny else allowed | calls
    return allowed


@needs_analyze
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_the_daemon_needs_no_system_call_the_unit_filters_out() -> None:
    """Run the daemon under strace through a start, a mapper's faults, region changes, a
    status and a stop: every system call it makes must pass the unit's filter."""
    runtime_dir = short_tmpdir()
    trace = runtime_dir.parent / f"{runtime_dir.name}.strace"
    env = cli_env(runtime_dir)
    proc = subprocess.Popen(
        [
            *("strace", "-f", "-qq", "-o", str(trace), sys.executable, "-m", "membacking"),
            *("manager", "run", "--region", "ram0=0:4M", "--metrics-port", "0"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert "membacking manager ready" in proc.stdout.readline()
        for args in (
            ["mem", "write", "0x1000", "--hex", "01"],
            ["region", "add", "dev", "0x10000000", "1M"],
            ["region", "remove", "dev"],
            ["status"],
            ["manager", "stop"],
        ):
            done = subprocess.run(
                [sys.executable, "-m", "membacking", *args], env=env, capture_output=True
            )
            assert done.returncode == 0, (args, done.stderr)
        assert proc.wait(30) == 0
        time.sleep(0.1)
        used = set(re.findall(r"^\d+\s+([a-z0-9_]+)\(", trace.read_text(), flags=re.M))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        trace.unlink(missing_ok=True)
        shutil.rmtree(runtime_dir, ignore_errors=True)
    assert len(used) > 20  # the trace was read
    assert sorted(used - allowed_syscalls()) == []
