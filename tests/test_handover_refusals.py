"""What would make a new daemon fail once the running one has handed over is refused before
the running one is asked, with or without a state directory: another address space (a daemon
without a state directory sends its state only once it agreed, and its memory lives only in
the fds it sends), a metrics port another process holds. The running daemon's own metrics
port is taken over with it."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

import membacking

from conftest import run_cli

Start = Callable[..., Any]
REGIONS = ("--region", "ram0=0:8M")


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize("state", [(), ("--no-state",)], ids=["state-dir", "no-state"])
def test_a_takeover_that_could_not_serve_is_refused_before_the_ask(
    start_manager: Start, state: tuple[str, ...]
) -> None:
    first = start_manager(*REGIONS, *state)
    with membacking.attach(first.runtime_dir) as memory:
        memory.write_at(0x1000, b"kept")
    done = run_cli(
        "manager", "run", "--takeover", *state, *REGIONS, "--address-space", "2T",
        runtime_dir=first.runtime_dir,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "address space" in done.stderr and "0x10000000000" in done.stderr, done.stderr
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = run_cli(
            "manager", "run", "--takeover", *state, *REGIONS, "--metrics-port", str(port),
            runtime_dir=first.runtime_dir,
        )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in done.stderr
    assert "nothing was changed" in done.stderr and "Traceback" not in done.stderr
    # the running daemon was never asked: it serves, with the memory
    assert first.proc.poll() is None and "handing over" not in first.log()
    with membacking.attach(first.runtime_dir) as memory:
        assert memory.read_at(0x1000, 4) == b"kept"


def test_the_running_daemons_metrics_port_is_taken_over_with_it(start_manager: Start) -> None:
    port = str(_free_port())
    first = start_manager(*REGIONS, "--no-state", "--metrics-port", port)
    second = start_manager(
        *REGIONS, "--no-state", "--metrics-port", port, "--takeover",
        runtime_dir=first.runtime_dir,
    )  # fmt: skip
    assert first.proc.wait(10) == 0
    assert f"took-over-from={first.pid}" in second.ready_line
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert b"membacking" in reply.read()
