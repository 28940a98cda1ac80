"""A mapper that does not import membacking (tests/foreign/mini_mapper.py, written from
docs/PROTOCOL.md) interoperates with the real daemon and the CLI: the specification, not shared
code, is what these tests exercise."""

from __future__ import annotations

import ast
import select
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import RunningManager, cli_env

MINI = Path(__file__).parent / "foreign" / "mini_mapper.py"


class Mini:
    """The mini mapper in a subprocess, driven over stdin/stdout."""

    def __init__(self, runtime_dir: Path, name: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(MINI), str(runtime_dir), name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
        )
        first = self.line()
        assert first.startswith("ok "), first + self.proc.stderr.read()  # type: ignore[union-attr]
        self.mapper_id = int(first.split()[1])

    def line(self, timeout: float = 20.0) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "the mini mapper did not answer"
        return self.proc.stdout.readline().strip()

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.line()

    def quit(self) -> int:
        if self.proc.poll() is None:
            assert self.ask("quit") == "ok"
        code = self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return code


@pytest.fixture
def spawn_mini() -> Iterator[Callable[[RunningManager, str], Mini]]:
    started: list[Mini] = []

    def spawn(manager: RunningManager, name: str) -> Mini:
        mini = Mini(manager.runtime_dir, name)
        started.append(mini)
        return mini

    yield spawn
    for mini in started:
        if mini.proc.poll() is None:
            mini.proc.kill()
            mini.proc.wait()


def test_the_mini_mapper_imports_no_membacking() -> None:
    tree = ast.parse(MINI.read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    }
    assert "membacking" not in imported
    allowed = "__future__ array contextlib mmap msgpack os select socket sys time typing zmq"
    assert imported <= set(allowed.split())


def test_cli_writes_and_the_foreign_mapper_reads_and_back(
    manager: RunningManager, spawn_mini: Callable[[RunningManager, str], Mini]
) -> None:
    assert manager.cli("mem", "write", "0x1000", "--hex", "deadbeef").returncode == 0
    mini = spawn_mini(manager, "mini")
    assert mini.ask("read 0x1000 4") == "ok deadbeef"
    # a write that spans two pages, through the fd the daemon pushed
    assert mini.ask("write 0x2ffe cafef00d") == "ok"
    got = manager.cli("mem", "read", "0x2ffe", "4")
    assert got.stdout.strip() == "cafef00d", got.stderr
    # read-only enforcement and a gap
    assert mini.ask("read 0xfff00000 4") == "ok 00000000"
    assert mini.ask("write 0xfff00000 00").startswith("err")
    assert mini.ask("read 0x8000000 4").startswith("err")
    assert mini.quit() == 0
    stats = manager.client().call("stats")
    assert stats["mappers"] == 0
    assert "not-attached" not in stats["rejected"]  # its Detach was not taken for a stranger's
    assert "detached" in manager.log()


def test_the_foreign_mapper_acks_an_unmap_of_what_it_holds(
    manager: RunningManager, spawn_mini: Callable[[RunningManager, str], Mini]
) -> None:
    mini = spawn_mini(manager, "holder")
    assert mini.ask("write 0xfff00000 00").startswith("err")  # holds rom, read-only
    assert mini.ask("read 0x3000 2") == "ok 0000"
    client = manager.client()
    removed = client.call("remove_region", name="ram0")  # answered after its UnmapAck
    assert removed["unmapped_from"] == [mini.mapper_id]
    assert mini.ask("read 0x3000 2").startswith("err")  # faults again: nothing backs it now
    assert mini.ask("read 0xfff00000 2") == "ok 0000"
    assert client.call("stats")["evictions"] == 0
    assert mini.quit() == 0


def test_short_lived_mappers_detach_cleanly_every_time(
    manager: RunningManager, spawn_mini: Callable[[RunningManager, str], Mini]
) -> None:
    """Detach is acknowledged before the fd socket closes: none is taken for a lost mapper, and
    none is counted as a rejected message."""
    for i in range(6):
        mini = spawn_mini(manager, f"brief-{i}")
        assert mini.ask("read 0x0 1") == "ok 00"
        assert mini.quit() == 0
    assert manager.cli("mem", "read", "0x0", "1").returncode == 0
    stats = manager.client().call("stats")
    assert stats["rejected"] == {} and stats["mappers"] == 0
    assert manager.log().count("removed: detached") == 7
    assert "removed: fd socket closed" not in manager.log()
