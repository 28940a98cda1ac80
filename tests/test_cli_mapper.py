"""The CLI's mapper-side commands against a real daemon: mem read/write and mapper attach."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import RunningManager, cli_env


def test_mem_write_then_read(manager: RunningManager, tmp_path: Path) -> None:
    wrote = manager.cli("mem", "write", "0x1000", "--hex", "68656c6c6f")
    assert wrote.returncode == 0 and wrote.stdout.strip() == "wrote 5 bytes at 0x1000 (4096)"
    read = manager.cli("mem", "read", "0x1000", "5")
    assert read.returncode == 0 and read.stdout.strip() == "68656c6c6f"
    payload = bytes(range(256)) * 40
    source = tmp_path / "payload.bin"
    source.write_bytes(payload)
    assert manager.cli("mem", "write", "4K", "--file", str(source)).returncode == 0
    raw = subprocess.run(
        [
            sys.executable,
            "-m",
            "membacking",
            "mem",
            "read",
            "0x1000",
            str(len(payload)),
            "--format",
            "raw",
        ],
        env=cli_env(manager.runtime_dir),
        capture_output=True,
        timeout=60,
    )
    assert raw.returncode == 0 and raw.stdout == payload


def test_mem_errors(manager: RunningManager) -> None:
    cases = [
        (("mem", "read", "0x80000000", "4"), "no region backs GPA 0x80000000"),
        (("mem", "write", "0xfff00000", "--hex", "00"), "GPA 0xfff00000 is mapped read-only"),
        (("mem", "read", "0x10000000000", "1"), "lies outside the"),
    ]
    for args, message in cases:
        result = manager.cli(*args)
        assert result.returncode == 1, result
        assert "Traceback" not in result.stderr and message in result.stderr, result.stderr
    usage = manager.cli("mem", "write", "0")
    assert usage.returncode == 2 and "exactly one of --hex or --file" in usage.stderr
    badhex = manager.cli("mem", "write", "0", "--hex", "xyz")
    assert badhex.returncode == 2 and "'xyz' is not hex bytes" in badhex.stderr
    assert len(badhex.stderr.strip().splitlines()) == 1


def attach_cli(manager: RunningManager, *args: str) -> tuple[subprocess.Popen[str], str]:
    """`membacking mapper attach ARGS` in the background; returns it and its first line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "membacking", "mapper", "attach", *args],
        env=cli_env(manager.runtime_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    if not ready:
        proc.kill()
        proc.wait()
        raise AssertionError("mapper attach printed nothing")
    return proc, proc.stdout.readline()


def test_mapper_attach_prefault_and_signal(manager: RunningManager) -> None:
    proc, line = attach_cli(
        manager, "--name", "worker", "--prefault", "0:1M", "--prefault", "0xfff00000:4K"
    )
    try:
        assert line.startswith("mapper ") and "attached as worker" in line
        mappers = json.loads(manager.cli("mappers", "--json").stdout)
        assert [(p["name"], p["pid"], p["ranges"]) for p in mappers] == [("worker", proc.pid, 2)]
        regions = {r["name"]: r["holders"] for r in manager.client().regions()}
        assert regions == {"ram0": [mappers[0]["id"]], "rom": [mappers[0]["id"]]}
        table = manager.cli("mappers").stdout.splitlines()
        assert table[0].split()[:6] == ["ID", "NAME", "PID", "PROCESS", "RSS", "MODE"]
        assert table[1].split()[1:3] == ["worker", str(proc.pid)]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 5
    while manager.client().mappers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert manager.client().mappers() == []


def test_mapper_attach_bad_prefault(manager: RunningManager) -> None:
    result = manager.cli("mapper", "attach", "--prefault", "0x80000000:4K")
    assert result.returncode == 1 and "no region backs GPA 0x80000000" in result.stderr
    assert "Traceback" not in result.stderr
    bad = manager.cli("mapper", "attach", "--prefault", "zero")
    assert bad.returncode == 2 and "expected GPA:SIZE" in bad.stderr
    name = manager.cli("mapper", "attach", "--name", "has space")
    assert name.returncode == 2 and "invalid name" in name.stderr


def test_long_reads_stream_and_check_first(manager: RunningManager, tmp_path: Path) -> None:
    data = os.urandom(3 << 20)  # three read steps
    source = tmp_path / "blob"
    source.write_bytes(data)
    assert manager.cli("mem", "write", "0x100000", "--file", str(source)).returncode == 0
    raw = subprocess.run(
        [sys.executable, "-m", "membacking", "mem", "read", "0x100000", "3M", "--format", "raw"],
        env=cli_env(manager.runtime_dir),
        capture_output=True,
        timeout=60,
    )
    assert raw.returncode == 0 and raw.stdout == data
    hexed = manager.cli("mem", "read", "0x100000", "3M").stdout.strip()
    assert bytes.fromhex(hexed) == data
    # far more than the region (and than this machine's memory): refused before anything is
    # read or allocated, in one line
    for command in (("read", "0", "100G"), ("dump", "0x3fff000", "8G")):
        result = manager.cli("mem", *command, timeout=30)
        assert result.returncode == 1 and result.stdout == ""
        assert result.stderr.strip() == "Error: no region backs GPA 0x4000000"


def test_attached_mapper_exits_when_its_manager_goes(manager: RunningManager) -> None:
    proc, line = attach_cli(manager, "--name", "follower")
    try:
        assert "attached as follower" in line
        manager.stop()
        assert proc.wait(10) == 1
        assert proc.stderr is not None
        err = proc.stderr.read().strip().splitlines()
        assert err[-1].startswith("Error: mapper ")
        assert "the manager shut down" in err[-1] or "lost the connection" in err[-1], err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
