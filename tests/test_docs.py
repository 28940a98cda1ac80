"""The docs follow the code: docs/CLI.md is generated from it, and every example in the README
runs against a real daemon."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

from conftest import RunningManager, cli_env, run_cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_cli_reference_is_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_cli_doc.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_readme_has_the_two_commands() -> None:
    commands = [b.strip() for b in blocks("sh")[:2]]
    # a venv first: a system Python under PEP 668 refuses a bare pip install
    assert commands[0].startswith(
        "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && "
        "membacking manager run"
    )
    assert commands[1] == "pytest"
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == "pytest"  # CI runs exactly the README's test command
    assert "pip install --quiet -e '.[dev]'" in ci[-2]  # in the environment the README names
    assert "pip install -e '.[dev]'" in README


def test_the_service_install_pulls_no_test_or_fuzz_tools() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=;\[ ]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    assert names == {"pyzmq", "msgpack", "psutil", "click", "prometheus-client"}
    extras = project["optional-dependencies"]
    parts = extras["test"] + extras["lint"] + extras["fuzz"]
    assert sorted(extras["dev"]) == sorted(parts)  # dev is exactly its parts


def test_readme_quickstart_runs(start_manager: Callable[..., RunningManager]) -> None:
    lines = [
        line.split("  #")[0].strip()
        for block in blocks("sh")[2:]
        for line in block.splitlines()
        if line.strip() and not line.startswith("#")
    ]
    start = next(line for line in lines if line.startswith("membacking manager run"))
    running = start_manager(*shlex.split(start)[3:])
    background: list[subprocess.Popen[bytes]] = []
    try:
        for line in lines:
            if line == start:
                continue
            args = shlex.split(line.removesuffix("&").strip())
            assert args[0] == "membacking", line
            if line.endswith("&"):
                proc = subprocess.Popen(
                    [sys.executable, "-m", "membacking", *args[1:]],
                    env=cli_env(running.runtime_dir),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
                assert proc.stdout is not None
                assert b"attached" in proc.stdout.readline()
                background.append(proc)
                continue
            result = run_cli(*args[1:], runtime_dir=running.runtime_dir)
            assert result.returncode == 0, (line, result.stderr)
            if "mem read 0x1000 5" in line:
                assert result.stdout.strip() == "68656c6c6f"
        python = blocks("python")[0]
        result = subprocess.run(
            [sys.executable, "-c", python],
            env=cli_env(running.runtime_dir),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
    finally:
        for proc in background:
            proc.terminate()
            proc.wait(15)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


def test_example_config_and_unit_file() -> None:
    from test_manager_state import RecordingStore

    from membacking.manager.config import load_config
    from membacking.manager.state import ManagerState
    from membacking.protocol.ranges import MemoryRange

    config = load_config(ROOT / "docs" / "membacking.example.toml")
    state = ManagerState(RecordingStore(), address_space=config["address_space"])
    for spec in config["regions"]:  # every region obeys the nesting rules together
        backing = "file" if spec.get("file") else "memfd"
        state.add_region(
            spec["name"],
            spec["gpa"],
            spec["size"],
            not spec.get("readonly"),
            priority=spec.get("priority", 0),
            enabled=not spec.get("disabled"),
            backing=backing,
            path=spec.get("file"),
        )
    assert MemoryRange(0xFFF00000, 0x100000000) in dict(state.table.items())
    unit = (ROOT / "docs" / "membacking.service").read_text()
    assert "Type=notify" in unit and "ExecStart=/usr/local/bin/membacking manager run" in unit
