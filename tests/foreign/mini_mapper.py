"""A membacking mapper written from docs/PROTOCOL.md alone: it imports pyzmq, msgpack and the
standard library, never membacking, so the specification (not shared code) is what it tests.

    python tests/foreign/mini_mapper.py [RUNTIME_DIR] [NAME]

RUNTIME_DIR defaults to $MEMBACKING_RUNTIME_DIR. It speaks the conformance driver protocol of
docs/PROTOCOL.md on stdin/stdout: after attaching it prints `ok MAPPER_ID`; then `read GPA N`,
`write GPA HEX` and `quit` are answered `ok [hex]` or `err TEXT`. Single-threaded: between
commands it serves the stream (Map, Unmap, Release, Shutdown...).
"""

from __future__ import annotations

import array
import contextlib
import mmap
import os
import select
import socket
import sys
import time
from typing import Any

import msgpack
import zmq

VERSION = 1
# type codes (docs/PROTOCOL.md, "Messages")
HELLO, WELCOME, FD_GRANT, FD_DENIED, ERROR = 1, 2, 4, 5, 6
ATTACH, ATTACHED, SEND_MAPPINGS, MAP, NO_MAPPING, UNMAP, UNMAP_ACK = 10, 11, 12, 13, 14, 15, 16
DETACH, SHUTDOWN, RELEASE, MAP_EAGER, MAP_ACK, DETACH_ACK = 17, 18, 19, 22, 23, 25
ROLE_STREAM_FD = 2
F_DETACH_ACK, F_TAGS = 1 << 1, 1 << 2  # feature bits this mapper offers
PAGE = 4096
TIMEOUT = 5.0
#: defects to show on purpose (the conformance tests check that the checker names them)
DEFECTS = set(os.environ.get("MINI_MAPPER_DEFECTS", "").split(","))


def pack(*items: Any) -> bytes:
    data: bytes = msgpack.packb([VERSION, *items], use_bin_type=True)
    return data


def unpack(data: bytes) -> list[Any] | None:
    """A message as [type, field...], or None if it is not one (the caller ignores it)."""
    try:
        items = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception:
        return None
    if type(items) is not list or len(items) < 2 or items[0] != VERSION:
        return None
    if type(items[1]) is not int:
        return None
    return items[1:]  # trailing fields this mapper does not know are ignored


class Chunk:
    """[start, end) of guest memory backed by `mm` from GPA `base` on."""

    def __init__(self, start: int, end: int, mm: mmap.mmap, base: int, writable: bool) -> None:
        self.start, self.end, self.mm, self.base, self.writable = start, end, mm, base, writable


class MiniMapper:
    def __init__(self, runtime_dir: str, name: str) -> None:
        self.fd_sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.fd_sock.settimeout(TIMEOUT)
        self.fd_sock.connect(os.path.join(runtime_dir, "fd.sock"))
        hello = [HELLO, name] if "plain-hello" in DEFECTS else [HELLO, name, F_DETACH_ACK | F_TAGS]
        self.fd_sock.send(pack(*hello))  # plain: as a mapper of the earlier release
        welcome = unpack(self.fd_sock.recv(65536))
        if not welcome or welcome[0] != WELCOME:
            raise SystemExit(f"registration refused: {welcome}")
        self.fd_sock.setblocking(False)  # read only what waits; never block on it
        self.mapper_id, token, self.address_space = welcome[1], welcome[2], welcome[3]
        self.features = welcome[5] if len(welcome) > 5 else 0
        self.ctx = zmq.Context()
        self.stream = self.ctx.socket(zmq.DEALER)
        self.stream.setsockopt(zmq.LINGER, 1000)
        self.stream.setsockopt(zmq.SNDHWM, 0)
        self.stream.setsockopt(zmq.RCVHWM, 0)
        self.stream.connect(f"ipc://{os.path.join(runtime_dir, 'mapper.ipc')}")
        self.stream.send(pack(ATTACH, self.mapper_id, token, ROLE_STREAM_FD))
        if not self.stream.poll(int(TIMEOUT * 1000)):
            raise SystemExit("no answer to Attach")
        attached = unpack(self.stream.recv())
        if not attached or attached[0] != ATTACHED:
            raise SystemExit(f"attach refused: {attached}")
        self.poller = zmq.Poller()
        self.poller.register(self.stream, zmq.POLLIN)
        self.poller.register(self.fd_sock, zmq.POLLIN)
        self.chunks: list[Chunk] = []
        self.fds: dict[int, int] = {}
        self.denied: set[int] = set()
        self.gone = False
        self.next_tag = 1
        #: the waiting access's range and whether it failed ("" while waiting)
        self.waiting: list[Any] | None = None

    # ---- the two sockets -------------------------------------------------------------------------

    def read_fd_socket(self) -> bool:
        """Take one fd-socket message if one waits; False if none did."""
        try:
            data, anc, _, _ = self.fd_sock.recvmsg(
                65536, socket.CMSG_SPACE(4 * 4), socket.MSG_DONTWAIT
            )
        except BlockingIOError:
            return False
        fds = array.array("i")
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % 4])
        if not data and not fds:
            # the manager is gone: without REATTACH nothing held is kept (§9), and nothing may
            # be touched once its end is seen, whether a Shutdown came first or not
            self.gone = True
            self.cut(0, self.address_space)
            self.close_fds(list(self.fds))
            return False
        msg = unpack(data)
        if msg and msg[0] == FD_GRANT and len(fds) == 1:
            old = self.fds.pop(msg[1], None)
            if old is not None:
                os.close(old)
            self.fds[msg[1]] = fds.pop()
        elif msg and msg[0] == FD_DENIED:
            self.denied.add(msg[1])
        elif msg and msg[0] == ERROR and self.waiting and msg[3:4] == [self.waiting[2]]:
            self.waiting[3] = f"refused: {msg[1]}"  # the Error names the request's tag
        for fd in fds:
            os.close(fd)
        return True

    def fd_of(self, mappable_id: int) -> int | None:
        """The fd a Map needs: held, or read from the fd socket (it may come late)."""
        deadline = time.monotonic() + TIMEOUT
        while mappable_id not in self.fds:
            if mappable_id in self.denied:
                self.denied.discard(mappable_id)
                return None
            left = deadline - time.monotonic()
            if left <= 0 or self.gone:
                return None
            if not self.read_fd_socket():
                select.select([self.fd_sock], [], [], left)
        return self.fds[mappable_id]

    def ack(self, *msg: Any) -> None:
        self.fd_sock.send(pack(*msg))

    def serve_stream(self) -> None:
        while self.stream.poll(0):
            msg = unpack(self.stream.recv())
            if msg is None and "crash-on-junk" in DEFECTS:
                raise SystemExit(3)
            if msg:
                with contextlib.suppress(IndexError, TypeError, ValueError, OSError):
                    self.handle(msg)  # a malformed message is ignored

    def handle(self, msg: list[Any]) -> None:
        kind = msg[0]
        if kind in (MAP, MAP_EAGER):
            at = 1 if kind == MAP else 2
            start, size, mappable_id, offset, writable = msg[at : at + 5]
            ok = self.apply_map(start, size, mappable_id, offset, writable)
            if kind == MAP_EAGER:
                self.ack(MAP_ACK, msg[1], ok, "" if ok else "cannot map")
        elif kind == NO_MAPPING:
            self.settle(msg[1], msg[1] + msg[2], None)
        elif kind == UNMAP:
            seq, start, size, release = msg[1], msg[2], msg[3], msg[4]
            held = any(c.start < start + size and start < c.end for c in self.chunks)
            self.cut(start, start + size)
            if "keep-fds" not in DEFECTS:
                self.close_fds(release)
            if held or "ack-only-held" not in DEFECTS:
                self.ack(UNMAP_ACK, seq)  # even for a range never mapped here
        elif kind == RELEASE:
            self.close_fds(msg[2])
            self.ack(UNMAP_ACK, msg[1])
        elif kind == ERROR and self.waiting and msg[3:4] == [self.waiting[2]]:
            self.waiting[3] = f"refused: {msg[1]}"  # the Error names the request's tag
        elif kind == SHUTDOWN:
            self.gone = True
            if self.waiting is not None:
                self.waiting[3] = "manager gone"
            # without REATTACH no Shutdown leaves anything this mapper could keep (§9)
            self.cut(0, self.address_space)
            self.close_fds(list(self.fds))

    def close_fds(self, ids: list[int]) -> None:
        for mappable_id in ids:
            fd = self.fds.pop(mappable_id, None)
            if fd is not None:
                os.close(fd)

    # ---- the mapping table -----------------------------------------------------------------------

    def apply_map(
        self, start: int, size: int, mappable_id: int, offset: int, writable: bool
    ) -> bool:
        end = start + size
        if start % PAGE or size % PAGE or size == 0 or end > self.address_space:
            return False
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        if mappable_id == 0:
            mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=prot)
        else:
            fd = self.fd_of(mappable_id)
            if fd is None:
                self.settle(start, end, None)  # no fd: as a NoMapping of its range
                return False
            try:
                mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot, offset=offset)
            except OSError:
                self.settle(start, end, None)
                return False
        self.cut(start, end)
        self.chunks.append(Chunk(start, end, mm, start, writable))
        self.settle(start, end, writable)
        return True

    def cut(self, start: int, end: int) -> None:
        kept = []
        for c in self.chunks:
            if c.end <= start or end <= c.start:
                kept.append(c)
                continue
            if c.start < start:
                kept.append(Chunk(c.start, start, c.mm, c.base, c.writable))
            if end < c.end:
                kept.append(Chunk(end, c.end, c.mm, c.base, c.writable))
        live = {id(c.mm) for c in kept}
        for c in self.chunks:
            if id(c.mm) not in live:
                c.mm.close()  # no piece of it is left: unmap it (closing twice is harmless)
        self.chunks = kept

    def find(self, gpa: int) -> Chunk | None:
        return next((c for c in self.chunks if c.start <= gpa < c.end), None)

    def settle(self, start: int, end: int, writable: bool | None) -> None:
        """A Map (writable given) or NoMapping (None) of [start, end): the waiting access."""
        w = self.waiting
        if w is None or not start <= w[0] < end or w[3]:
            return
        if writable is None:
            w[3] = "no mapping"
        elif w[4] and not writable:
            w[3] = "read-only"
        else:
            w[0] = min(end, w[1])

    # ---- accesses --------------------------------------------------------------------------------

    def access(self, gpa: int, n: int, data: bytes | None) -> bytes:
        out = bytearray()
        pos, end = gpa, gpa + n
        while pos < end:
            c = self.find(pos)
            if c is None or (data is not None and not c.writable):
                self.fault(pos, end, data is not None)
                continue
            take = min(end, c.end) - pos
            at = pos - c.base
            if data is None:
                out += c.mm[at : at + take]
            else:
                c.mm[at : at + take] = data[pos - gpa : pos - gpa + take]
            pos += take
        return bytes(out)

    def fault(self, gpa: int, end: int, write: bool) -> None:
        if self.gone:
            raise RuntimeError("manager gone")
        if end > self.address_space:
            raise RuntimeError("outside the address space")
        page = gpa - gpa % PAGE
        last = -(-end // PAGE) * PAGE
        tag = self.next_tag
        self.next_tag += 1
        # [next GPA wanted, end, tag, failure, write]: registered before the request is sent
        w: list[Any] = [page, last, tag, "", write]
        self.waiting = w
        request = [SEND_MAPPINGS, page, last - page]
        if self.features & F_TAGS:
            request.append(tag)
        self.fd_sock.send(pack(*request))
        deadline = time.monotonic() + TIMEOUT
        while w[0] <= gpa and not w[3]:
            left = deadline - time.monotonic()
            if left <= 0 or self.gone:
                w[3] = w[3] or ("manager gone" if self.gone else "timed out")
                break
            self.poller.poll(int(left * 1000))
            while self.read_fd_socket():
                pass
            self.serve_stream()
        self.waiting = None
        if w[3]:
            raise RuntimeError(w[3])

    def detach(self) -> None:
        waits = "wait-after-shutdown" in DEFECTS  # waits for a DetachAck that never comes
        if waits or not self.gone:  # after Shutdown nobody answers a Detach: just close
            self.stream.send(pack(DETACH))
        if self.features & F_DETACH_ACK and (waits or not self.gone):
            # the manager answers: only then close the fd socket
            deadline = time.monotonic() + (60 if waits else TIMEOUT)
            while time.monotonic() < deadline and (waits or not self.gone):
                if self.stream.poll(100):
                    msg = unpack(self.stream.recv())
                    if msg and msg[0] == DETACH_ACK:
                        break
                    if msg:
                        self.handle(msg)
        self.stream.close()
        self.ctx.term()
        self.fd_sock.close()


def main() -> None:
    args = sys.argv[1:]
    runtime_dir = args[0] if args else os.environ["MEMBACKING_RUNTIME_DIR"]
    mapper = MiniMapper(runtime_dir, args[1] if len(args) > 1 else "mini")
    print(f"ok {mapper.mapper_id}", flush=True)
    stdin = sys.stdin.fileno()
    poller = zmq.Poller()
    poller.register(mapper.stream, zmq.POLLIN)
    poller.register(mapper.fd_sock, zmq.POLLIN)
    poller.register(stdin, zmq.POLLIN)
    buffered = b""
    while True:
        if b"\n" not in buffered:
            if mapper.gone and mapper.fd_sock in poller:
                poller.unregister(mapper.fd_sock)  # at end of stream it would always be ready
            ready = dict(poller.poll(1000))
            # a command is served after what its sockets say (an eviction, §9), not before
            if "no-lease" not in DEFECTS or stdin not in ready:
                mapper.serve_stream()
                while mapper.read_fd_socket():
                    pass
            if stdin not in ready:
                continue
            chunk = os.read(stdin, 4096)
            if not chunk:
                break
            buffered += chunk
            if b"\n" not in buffered:
                continue
        line, buffered = buffered.split(b"\n", 1)
        words = line.decode().split()
        if not words:
            continue
        try:
            if words[0] == "quit":
                break
            if words[0] == "read":
                print(f"ok {mapper.access(int(words[1], 0), int(words[2], 0), None).hex()}")
            elif words[0] == "write":
                data = bytes.fromhex(words[2])
                mapper.access(int(words[1], 0), len(data), data)
                print("ok")
            else:
                print(f"err unknown command {words[0]}")
        except (RuntimeError, ValueError, IndexError, OSError) as exc:
            print(f"err {exc}")
        sys.stdout.flush()
    mapper.detach()
    print("ok", flush=True)


if __name__ == "__main__":
    main()
