"""The scripted manager of the conformance check: a private runtime directory with a real fd.sock
(SEQPACKET) and mapper.ipc (ZeroMQ ROUTER), the mapper under test launched beside it and driven
over its stdin/stdout, and queues of what arrived on each channel.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import zmq

from ..protocol import messages as m
from ..protocol.codec import decode, encode
from ..protocol.errors import ProtocolError
from ..protocol.fdpass import PeerClosed, recv_message, send_message
from ..protocol.messages import Channel, Message
from ..runtime import ENV_VAR, RuntimePaths


class Violation(Exception):
    """The mapper broke clause `clause` of docs/PROTOCOL.md."""

    def __init__(self, clause: str, detail: str) -> None:
        super().__init__(f"{clause}: {detail}")
        self.clause = clause
        self.detail = detail


class Harness:
    """One mapper under test and the sockets it talks to."""

    def __init__(self, command: Sequence[str], timeout: float) -> None:
        self.timeout = timeout
        self.root = Path(tempfile.mkdtemp(prefix="mbconf-", dir="/tmp"))
        self.paths = RuntimePaths.resolve(self.root)
        self.listen = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.listen.bind(os.fspath(self.paths.fd_socket))
        self.listen.listen(4)
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.SNDHWM, 100_000)
        self.router.setsockopt(zmq.RCVHWM, 100_000)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(self.paths.mapper_endpoint)
        self.conn: socket.socket | None = None
        self.pid = 0
        self.identity: bytes | None = None
        self.fd_msgs: deque[Message] = deque()
        self.stream_msgs: deque[Message] = deque()
        self.lines: deque[str] = deque()
        self.fd_closed = False
        self.seq = 0
        #: feature bits granted in Welcome (None: the mapper offered none)
        self.features: int | None = None
        #: what arrived that did not decode: (channel, reason)
        self.invalid: list[tuple[str, str]] = []
        self._out = b""
        args = [a.replace("{runtime_dir}", str(self.root)) for a in command]
        self.stderr_path = self.root / "mapper.stderr"
        try:
            with open(self.stderr_path, "wb") as err:
                self.proc = subprocess.Popen(
                    args,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    env={**os.environ, ENV_VAR: str(self.root)},
                )
        except OSError:  # no such command, not executable: nothing of this run stays behind
            self.listen.close()
            self.router.close(0)
            self.ctx.term()
            shutil.rmtree(self.root, ignore_errors=True)
            raise
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)

    # ---- receiving -------------------------------------------------------------------------------

    def accept(self) -> None:
        """Wait for the mapper's fd-socket connection."""
        self.listen.settimeout(self.timeout)
        try:
            self.conn, _ = self.listen.accept()
        except TimeoutError:
            raise Violation("REG-HELLO", "the mapper did not connect to fd.sock") from None
        creds = self.conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        self.pid = struct.unpack("3i", creds)[0]
        self.conn.setblocking(False)

    def pump(self, wait: float) -> None:
        """Take what arrived on any channel, waiting up to `wait` seconds for the first."""
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        assert self.proc.stdout is not None
        poller.register(self.proc.stdout.fileno(), zmq.POLLIN)
        if self.conn is not None and not self.fd_closed:
            poller.register(self.conn.fileno(), zmq.POLLIN)
        poller.poll(max(0, int(wait * 1000)))
        self._read_fd()
        self._read_stream()
        self._read_stdout()

    def _read_fd(self) -> None:
        while self.conn is not None and not self.fd_closed:
            try:
                msg, fds = recv_message(self.conn, sender="mapper")
            except BlockingIOError:
                return
            except (PeerClosed, ConnectionError):
                self.fd_closed = True
                return
            except ProtocolError as exc:
                self.invalid.append(("fd", str(exc)))
                continue
            for fd in fds:
                os.close(fd)
            self.fd_msgs.append(msg)

    def _read_stream(self) -> None:
        while self.router.poll(0):
            frames = self.router.recv_multipart()
            if len(frames) != 2:
                self.invalid.append(("stream", f"{len(frames) - 1} frames after the identity"))
                continue
            try:
                msg = decode(frames[1], Channel.MAPPER, sender="mapper")
            except ProtocolError as exc:
                self.invalid.append(("stream", str(exc)))
                continue
            if isinstance(msg, m.Attach) and self.identity is None:
                self.identity = frames[0]
            elif frames[0] != self.identity:
                self.invalid.append(("stream", f"{type(msg).__name__} from another socket"))
                continue
            self.stream_msgs.append(msg)

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        with contextlib.suppress(BlockingIOError):
            while True:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                self._out += chunk
        while b"\n" in self._out:
            line, self._out = self._out.split(b"\n", 1)
            self.lines.append(line.decode(errors="replace").strip())

    def wait_for(self, found: Callable[[], object], timeout: float | None = None) -> bool:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not found():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.pump(min(left, 0.1))
        return True

    def expect_fd(self, cls: type[m.Message], clause: str, what: str) -> Message:
        """The next fd-socket message, which must be a `cls`."""
        if not self.wait_for(lambda: self.fd_msgs or self.fd_closed):
            raise Violation(clause, f"{what}: nothing arrived on fd.sock")
        if not self.fd_msgs:
            raise Violation(clause, f"{what}: the mapper closed fd.sock")
        msg = self.fd_msgs.popleft()
        if not isinstance(msg, cls):
            raise Violation(clause, f"{what}: got {msg!r}")
        return msg

    def expect_stream(self, cls: type[m.Message], clause: str, what: str) -> Message:
        if not self.wait_for(lambda: self.stream_msgs):
            raise Violation(clause, f"{what}: nothing arrived on the stream")
        msg = self.stream_msgs.popleft()
        if not isinstance(msg, cls):
            raise Violation(clause, f"{what}: got {msg!r}")
        return msg

    def answer(self, clause: str, what: str) -> str:
        """The mapper's answer line to the last command."""
        if not self.wait_for(lambda: self.lines or self.proc.poll() is not None):
            raise Violation(clause, f"{what}: the mapper did not answer")
        if not self.lines:
            raise Violation("ROBUST", f"{what}: the mapper exited ({self.proc.returncode})")
        return self.lines.popleft()

    def expect_exit(self, clause: str, what: str) -> None:
        """The mapper must exit with status 0 within the timeout (a mapper still running then is
        a violation of `clause`, never an exception of the checker's)."""
        try:
            status = self.proc.wait(self.timeout)
        except subprocess.TimeoutExpired:
            raise Violation(
                clause, f"{what}: the mapper was still running {self.timeout:g} s later"
            ) from None
        if status != 0:
            raise Violation("ROBUST", f"{what}: the mapper exited with status {status}")

    # ---- sending ---------------------------------------------------------------------------------

    def send_fd(self, msg: Message, fd: int | None = None) -> None:
        assert self.conn is not None
        self.conn.setblocking(True)
        self.conn.settimeout(self.timeout)
        try:
            send_message(self.conn, msg, () if fd is None else (fd,))
        except OSError as exc:  # closed, or not read for the whole timeout: never a traceback
            what = "did not read it" if isinstance(exc, TimeoutError) else f"closed it ({exc})"
            detail = f"cannot send {type(msg).__name__} on fd.sock: the mapper {what}"
            raise Violation("ROBUST", detail) from None
        finally:
            self.conn.setblocking(False)

    def send_stream(self, msg: Message | bytes) -> None:
        assert self.identity is not None
        data = msg if isinstance(msg, bytes) else encode(msg)
        self.router.send_multipart([self.identity, data])

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def command(self, line: str) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()

    def open_fds(self) -> list[str]:
        """What the mapper process's descriptors point at (empty if /proc does not say)."""
        out = []
        with contextlib.suppress(OSError):
            for entry in os.scandir(f"/proc/{self.pid}/fd"):
                with contextlib.suppress(OSError):
                    out.append(os.readlink(entry.path))
        return out

    def close(self) -> str:
        """Stop the mapper (if still running) and clean up; returns its stderr."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        err = self.stderr_path.read_text(errors="replace")
        if self.conn is not None:
            self.conn.close()
        self.listen.close()
        self.router.close(0)
        self.ctx.term()
        shutil.rmtree(self.root, ignore_errors=True)
        return err
