"""The mapper thread against a scripted manager (real sockets, messages sent in an exact order):
orders of events a real daemon produces only now and then."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

import membacking
from membacking.protocol import messages as m
from membacking.protocol.codec import decode, encode
from membacking.protocol.fdpass import recv_message, send_message
from membacking.protocol.messages import Channel
from membacking.runtime import RuntimePaths

from conftest import short_tmpdir

TOKEN = bytes(16)


class ScriptedManager:
    """Registers one mapper (Welcome, Attached twice) and then does only what the test says."""

    def __init__(self, root: Path) -> None:
        paths = RuntimePaths.resolve(root)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(str(paths.fd_socket))
        self.listener.listen()
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.bind(paths.mapper_endpoint)
        self.conn: socket.socket | None = None
        self.stream = b""
        self._thread = threading.Thread(target=self._register, daemon=True)
        self._thread.start()

    def _register(self) -> None:
        self.conn, _ = self.listener.accept()
        hello, _ = recv_message(self.conn)
        assert isinstance(hello, m.Hello)
        send_message(self.conn, m.Welcome(1, TOKEN, 1 << 30, 4096))
        for _ in range(2):
            identity, data = self.router.recv_multipart()
            attach = decode(data, Channel.MAPPER)
            assert isinstance(attach, m.Attach)
            if attach.role == m.ROLE_STREAM:
                self.stream = identity
            self.router.send_multipart([identity, encode(m.Attached(attach.role))])

    def registered(self) -> None:
        self._thread.join(10)
        assert self.conn is not None and self.stream

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()
        self.router.close(0)
        self.ctx.term()


@pytest.fixture
def scripted() -> Iterator[ScriptedManager]:
    manager = ScriptedManager(short_tmpdir())
    yield manager
    manager.close()


def thread_cpu_seconds(native_id: int) -> float:
    with open(f"/proc/self/task/{native_id}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_shutdown_read_before_the_fd_socket_closes(scripted: ScriptedManager) -> None:
    """Shutdown first, end of the fd socket after: the mapper thread must go quiet, not poll a
    closed socket in a loop."""
    root = Path(scripted.listener.getsockname()).parent
    memory = membacking.attach(root, name="quiet")
    try:
        scripted.registered()
        scripted.router.send_multipart([scripted.stream, encode(m.Shutdown("scripted"))])
        thread = memory._mapper._thread
        deadline = time.monotonic() + 5
        while memory._mapper.gone is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert memory._mapper.gone is not None
        assert scripted.conn is not None
        scripted.conn.close()  # now the end of stream on the fd socket
        time.sleep(0.3)
        assert thread.native_id is not None
        before = thread_cpu_seconds(thread.native_id)
        time.sleep(1.5)
        assert thread_cpu_seconds(thread.native_id) - before < 0.15
        with pytest.raises(membacking.ManagerGoneError, match="scripted"):
            memory.read_at(0, 1)
    finally:
        memory.detach()
