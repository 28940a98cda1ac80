"""Control requests across a daemon's death: a call notices at once that the daemon it asked
died, fails (or, read-only, asks its successor), and only the daemon instance a request is
addressed to ever runs it."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import zmq

from membacking.control_client import ControlClient
from membacking.errors import ManagerUnavailableError
from membacking.protocol import messages as m
from membacking.protocol.codec import decode, encode
from membacking.protocol.messages import Channel

from conftest import RunningManager

Start = Callable[..., RunningManager]
REGIONS = ("--region", "ram0=0:1M")


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        started = time.monotonic()
        try:
            out["result"] = fn()
        except Exception as exc:
            out["error"] = exc
        out["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_a_change_waiting_on_a_dead_daemon_fails_at_once_and_runs_nowhere(
    start_manager: Start,
) -> None:
    first = start_manager(*REGIONS)
    client = ControlClient(first.runtime_dir)
    client.stats()
    os.kill(first.pid, signal.SIGSTOP)  # it takes the request but never reads it
    thread, out = in_thread(lambda: client.add_region("late", 0x20000000, 4096))
    time.sleep(0.5)
    first.stop(signal.SIGKILL)
    thread.join(10)
    assert isinstance(out.get("error"), ManagerUnavailableError), out
    assert "died while this request waited" in str(out["error"])
    assert out["seconds"] < 3  # not the 120 s an add may wait
    second = start_manager(*REGIONS, runtime_dir=first.runtime_dir)
    time.sleep(0.5)  # time for a request left in a socket to arrive, were it still there
    assert [r["name"] for r in second.client().regions()] == ["ram0"]


def test_a_read_only_request_is_asked_of_the_successor(start_manager: Start) -> None:
    first = start_manager(*REGIONS)
    client = ControlClient(first.runtime_dir, timeout=30)
    os.kill(first.pid, signal.SIGSTOP)
    thread, out = in_thread(client.regions)
    time.sleep(0.5)
    first.stop(signal.SIGKILL)
    second = start_manager(*REGIONS, runtime_dir=first.runtime_dir)
    thread.join(30)
    assert "error" not in out, out
    assert [r["name"] for r in out["result"]] == ["ram0"]
    assert second.proc.poll() is None


def raw_request(manager: RunningManager, op: str, args: dict[str, Any]) -> m.Message:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"ipc://{manager.runtime_dir / 'control.ipc'}")
    try:
        sock.send(encode(m.ControlRequest(op, args)))
        assert sock.poll(10000)
        return decode(sock.recv(), Channel.CONTROL)
    finally:
        sock.close()


def test_only_the_addressed_instance_runs_a_request(start_manager: Start) -> None:
    manager = start_manager(*REGIONS)
    instance = ControlClient(manager.runtime_dir).instance()
    pid, written = (manager.runtime_dir / "manager.lock").read_text().split()
    assert int(pid) == manager.pid and written == instance and instance
    refused = raw_request(manager, "remove_region", {"name": "ram0", "instance": "0123abcd"})
    assert isinstance(refused, m.Error) and refused.code == "wrong-instance"
    assert "nothing was done" in refused.message
    assert [r["name"] for r in manager.client().regions()] == ["ram0"]
    assert manager.client().stats()["rejected"]["wrong-instance"] == 1
    done = raw_request(manager, "remove_region", {"name": "ram0", "instance": instance})
    assert isinstance(done, m.ControlReply), done
    # a client of an earlier release sends no instance: served as before
    assert isinstance(raw_request(manager, "stats", {}), m.ControlReply)
    with pytest.raises(ManagerUnavailableError):
        manager.stop()
        ControlClient(manager.runtime_dir).stats()
