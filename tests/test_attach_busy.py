"""A manager whose fd.sock is full of connections that never registered turns new mappers
away: attach keeps trying within its timeout, and then says the manager is busy."""

from __future__ import annotations

import socket
import threading

import pytest

import membacking
from membacking.manager.fdserver import MAX_UNREGISTERED

from conftest import RunningManager


def silent_connections(manager: RunningManager) -> list[socket.socket]:
    """More connections to fd.sock than the manager lets wait for a Hello, none saying one."""
    conns = []
    for _ in range(MAX_UNREGISTERED + 8):
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        conn.connect(str(manager.runtime_dir / "fd.sock"))
        conns.append(conn)
    manager.client().stats()  # the manager has accepted (or turned away) every one
    return conns


def busy_refusals(manager: RunningManager) -> int:
    return int(manager.client().stats()["rejected"].get("busy", 0))


def test_attach_to_a_busy_manager_keeps_trying_then_says_it_is_busy(
    manager: RunningManager,
) -> None:
    conns = silent_connections(manager)
    try:
        before = busy_refusals(manager)
        with pytest.raises(membacking.ManagerUnavailableError) as caught:
            membacking.attach(manager.runtime_dir, name="turned-away", timeout=1.0)
        message = str(caught.value)
        assert "is busy" in message and "registration tries" in message, message
        assert "no membacking manager" not in message and "running there" not in message
        assert busy_refusals(manager) - before >= 2  # it tried again
        # once the silent connections go, a try within the timeout gets through
        closer = threading.Timer(0.5, lambda: [conn.close() for conn in conns])
        closer.start()
        with membacking.attach(manager.runtime_dir, name="let-in", timeout=10.0) as memory:
            memory.write_at(0x10, b"in")
            assert memory.read_at(0x10, 2) == b"in"
        closer.join()
    finally:
        for conn in conns:
            conn.close()
