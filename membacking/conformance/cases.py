"""The cases of the conformance check and the clauses of docs/PROTOCOL.md they test: each case
plays the manager's side of one exchange, hostile ones included, and names the clause a mapper
that fails it violates.
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..protocol import messages as m
from ..protocol.ranges import MemoryRange
from ..protocol.shutdowns import shutdown_for
from .harness import Harness, Violation

MIB = 1 << 20
ADDRESS_SPACE = 64 * MIB
MAPPER_ID = 7

#: clause id -> what it requires (the same ids, with the full text, are in docs/PROTOCOL.md)
CLAUSES: dict[str, str] = {
    "REG-HELLO": "the first message on fd.sock is a valid Hello",
    "REG-ATTACH": "after Welcome, Attach(mapper_id, token, 2) on a DEALER to mapper.ipc",
    "FAULT-REQUEST": "an access to an unmapped GPA sends SendMappings of page-aligned range "
    "containing it, on fd.sock",
    "MAP-APPLY": "a Map makes its range read the mappable's bytes at file_offset, and writes "
    "to a writable Map reach the shared file",
    "MAP-LATE-FD": "a Map whose FdGrant arrives after it is applied once the grant arrives",
    "MAP-IDEMPOTENT": "a Map that was not asked for, or repeats one held, is applied; no "
    "request follows for its range",
    "FD-DENIED": "a Map whose fd is denied fails the access waiting for it",
    "NOMAPPING": "a NoMapping fails the access waiting for its range",
    "READ-ONLY": "a read-only Map is never written through",
    "UNMAP-ACK": "every Unmap is acknowledged with UnmapAck(seq), even of a range never mapped",
    "UNMAP-APPLY": "after UnmapAck, an access to the range faults again",
    "RELEASE-CLOSE": "the fds listed in release are closed before the ack",
    "RELEASE-ACK": "a Release is acknowledged with UnmapAck(seq)",
    "ROBUST": "an invalid or unknown message is ignored: the mapper keeps serving, never crashes",
    "SHUTDOWN": "after a Shutdown stopping an access to memory mapped before fails (every "
    "mapping dropped) and one to an unmapped GPA fails without a request; quit exits within "
    "the checker's timeout without waiting for a DetachAck",
    "LEASE": "a mapper stopped (SIGSTOP) for 1.2 s and evicted meanwhile (Shutdown evicted on "
    "fd.sock, then fd.sock closed) does not write the memory it held when it runs again",
    "DETACH": "a mapper leaving sends Detach on the stream; one that negotiated detach-ack "
    "keeps fd.sock open until DetachAck",
    "TAGS": "a mapper that negotiated tags tags each request, and an Error naming a request's "
    "tag fails the access waiting for it",
}

#: the feature bits the checker grants when offered
CHECKED_FEATURES = m.FEATURE_SHUTDOWN_CODE | m.FEATURE_DETACH_ACK | m.FEATURE_TAGS


@dataclass
class Report:
    """What one run found."""

    passed: list[str] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


def pattern(mappable_id: int, size: int) -> bytes:
    """What the checker writes into mappable `mappable_id`: every offset's byte differs from
    its page neighbours', so a wrong file_offset shows."""
    page = bytes((mappable_id * 37 + i * 5 + i // 256) & 0xFF for i in range(4096))
    return b"".join(bytes([n & 0xFF]) + page[1:] for n in range(size // 4096))


class Memfds:
    """The checker's mappables: memfds named so /proc shows whether the mapper still holds them."""

    def __init__(self) -> None:
        self.fds: dict[int, int] = {}

    def make(self, mappable_id: int, size: int = MIB) -> int:
        fd = os.memfd_create(f"mbconf-{mappable_id}", os.MFD_CLOEXEC)
        os.pwrite(fd, pattern(mappable_id, size), 0)
        self.fds[mappable_id] = fd
        return fd

    def read(self, mappable_id: int, offset: int, n: int) -> bytes:
        return os.pread(self.fds[mappable_id], n, offset)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


def register(h: Harness) -> m.Hello:
    h.accept()
    hello = h.expect_fd(m.Hello, "REG-HELLO", "registration")
    assert isinstance(hello, m.Hello)
    token = secrets.token_bytes(m.TOKEN_BYTES)
    h.features = None if hello.features is None else hello.features & CHECKED_FEATURES
    page = os.sysconf("SC_PAGE_SIZE")
    h.send_fd(m.Welcome(MAPPER_ID, token, ADDRESS_SPACE, page, h.features))
    attach = h.expect_stream(m.Attach, "REG-ATTACH", "attach")
    assert isinstance(attach, m.Attach)
    if (attach.mapper_id, attach.token, attach.role) != (MAPPER_ID, token, m.ROLE_STREAM_FD):
        raise Violation("REG-ATTACH", f"Attach({attach.mapper_id}, ..., {attach.role})")
    h.send_stream(m.Attached(m.ROLE_STREAM_FD))
    line = h.answer("REG-ATTACH", "the driver's first line")
    if not line.startswith("ok"):
        raise Violation("REG-ATTACH", f"the driver said {line!r}")
    return hello


def fault(h: Harness, line: str, gpa: int) -> MemoryRange:
    """Send a command that must fault at `gpa`; the SendMappings range it sent."""
    h.command(line)
    req = h.expect_fd(m.SendMappings, "FAULT-REQUEST", line)
    assert isinstance(req, m.SendMappings)
    if not req.range.contains_addr(gpa):
        raise Violation("FAULT-REQUEST", f"{line}: asked for {req.range}, not containing {gpa:#x}")
    return req.range


def expect_ack(h: Harness, seq: int, clause: str, what: str) -> None:
    ack = h.expect_fd(m.UnmapAck, clause, what)
    assert isinstance(ack, m.UnmapAck)
    if ack.seq != seq:
        raise Violation(clause, f"{what}: UnmapAck({ack.seq}), expected UnmapAck({seq})")


def barrier(h: Harness) -> None:
    """Wait until the mapper has handled everything sent on the stream so far: an Unmap of a
    range nothing maps, acknowledged in stream order. Messages on the stream cannot be seen
    before they arrive, so a case that relies on a Map it sent unasked waits for this first."""
    h.send_stream(m.Unmap(h.next_seq(), MemoryRange(60 * MIB, 61 * MIB), ()))
    expect_ack(h, h.seq, "UNMAP-ACK", "Unmap of a range never mapped")


def answer_ok(h: Harness, clause: str, what: str, expected: bytes | None = None) -> None:
    line = h.answer(clause, what)
    want = "ok" if expected is None else f"ok {expected.hex()}"
    if line != want:
        raise Violation(clause, f"{what}: answered {line!r}, expected {want!r}")


def answer_err(h: Harness, clause: str, what: str) -> None:
    line = h.answer(clause, what)
    if not line.startswith("err"):
        raise Violation(clause, f"{what}: answered {line!r}, expected an error")


def holds(h: Harness, mappable_id: int) -> bool | None:
    fds = h.open_fds()
    if not fds:
        return None  # /proc does not tell
    return any(f"mbconf-{mappable_id} " in target for target in fds)


Step = tuple[str, Callable[[Harness, Memfds], None]]


def _map_fault(h: Harness, mem: Memfds) -> None:
    mem.make(1)
    rng = fault(h, "read 0x1010 16", 0x1010)
    if rng.start < 0 or rng.end > MIB:
        raise Violation("FAULT-REQUEST", f"asked for {rng} for one access at 0x1010")
    h.send_stream(m.Map(MemoryRange(0, MIB), 1, 0, True))
    h.send_fd(m.FdGrant(1, MIB, True), mem.fds[1])
    answer_ok(h, "MAP-APPLY", "read after Map", mem.read(1, 0x1010, 16))
    h.command("write 0x2ffe 0badcafe")
    answer_ok(h, "MAP-APPLY", "write to a writable Map")
    if mem.read(1, 0x2FFE, 4) != bytes.fromhex("0badcafe"):
        raise Violation("MAP-APPLY", "a write did not reach the shared memfd")
    # the same fd again at an offset: no FdGrant follows (the mapper holds it)
    h.send_stream(m.Map(MemoryRange(5 * MIB, 5 * MIB + 0x10000), 1, 0x20000, True))
    barrier(h)
    h.command(f"read {5 * MIB + 0x3000:#x} 8")
    answer_ok(h, "MAP-APPLY", "read at a file offset", mem.read(1, 0x23000, 8))


def _late_fd(h: Harness, mem: Memfds) -> None:
    mem.make(2)
    fault(h, f"read {MIB + 0x40:#x} 8", MIB + 0x40)
    h.send_stream(m.Map(MemoryRange(MIB, 2 * MIB), 2, 0, True))
    h.wait_for(lambda: False, 0.3)  # the fd comes late (and what arrives meanwhile is taken)
    h.send_fd(m.FdGrant(2, MIB, True), mem.fds[2])
    answer_ok(h, "MAP-LATE-FD", "read after a late fd", mem.read(2, 0x40, 8))


def _unsolicited(h: Harness, mem: Memfds) -> None:
    mem.make(3)
    h.send_stream(m.Map(MemoryRange(2 * MIB, 3 * MIB), 3, 0, True))
    h.send_fd(m.FdGrant(3, MIB, True), mem.fds[3])
    h.send_stream(m.Map(MemoryRange(0, MIB), 1, 0, True))  # held already: a duplicate
    barrier(h)
    for gpa, mappable in ((2 * MIB + 0x5000, 3), (0x1010, 1)):
        h.command(f"read {gpa:#x} 8")
        h.wait_for(lambda: h.lines or h.fd_msgs)
        if h.fd_msgs and isinstance(h.fd_msgs[0], m.SendMappings):
            req = h.fd_msgs.popleft()
            h.send_stream(m.Map(MemoryRange(2 * MIB, 3 * MIB), 3, 0, True))
            h.answer("MAP-IDEMPOTENT", "read")
            raise Violation("MAP-IDEMPOTENT", f"faulted {req} inside a Map it was sent")
        answer_ok(
            h, "MAP-IDEMPOTENT", "read of an unsolicited Map", mem.read(mappable, gpa % MIB, 8)
        )


def _denied_and_gaps(h: Harness, mem: Memfds) -> None:
    rng = fault(h, f"read {4 * MIB:#x} 8", 4 * MIB)
    h.send_stream(m.Map(MemoryRange(4 * MIB, 5 * MIB), 9, 0, True))
    h.send_fd(m.FdDenied(9, "conformance: denied"))
    answer_err(h, "FD-DENIED", "read of a Map whose fd was denied")
    # the manager recorded it as a holder: the Unmap of a range it never mapped
    h.send_stream(m.Unmap(h.next_seq(), MemoryRange(4 * MIB, 5 * MIB), ()))
    expect_ack(h, h.seq, "UNMAP-ACK", "Unmap of a range whose fd was denied")
    rng = fault(h, f"read {32 * MIB + 0x10:#x} 4", 32 * MIB + 0x10)
    h.send_stream(m.NoMapping(rng))
    answer_err(h, "NOMAPPING", "read of a NoMapping")
    h.send_stream(m.Unmap(h.next_seq(), MemoryRange(40 * MIB, 41 * MIB), (77,)))
    expect_ack(h, h.seq, "UNMAP-ACK", "Unmap of a range never mapped")


def _read_only(h: Harness, mem: Memfds) -> None:
    mem.make(4)
    ro = os.open(f"/proc/self/fd/{mem.fds[4]}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        h.send_stream(m.Map(MemoryRange(3 * MIB, 4 * MIB), 4, 0, False))
        h.send_fd(m.FdGrant(4, MIB, False), ro)
    finally:
        os.close(ro)
    barrier(h)
    h.command(f"read {3 * MIB:#x} 4")
    answer_ok(h, "READ-ONLY", "read of a read-only Map", mem.read(4, 0, 4))
    before = mem.read(4, 0x100, 2)
    h.command(f"write {3 * MIB + 0x100:#x} 5a5a")
    h.wait_for(lambda: h.lines or h.fd_msgs)
    if h.fd_msgs and isinstance(h.fd_msgs[0], m.SendMappings):  # may ask: the answer is the same
        h.fd_msgs.popleft()
        h.send_stream(m.Map(MemoryRange(3 * MIB, 4 * MIB), 4, 0, False))
    answer_err(h, "READ-ONLY", "write to a read-only Map")
    if mem.read(4, 0x100, 2) != before:
        raise Violation("READ-ONLY", "a read-only mapping was written")


def _hostile_stream(h: Harness, mem: Memfds) -> None:
    for junk in (
        b"\xc1",  # not msgpack
        b"\x93\x01\x63\x00",  # unknown type 99
        b"\x92\x02\x0d",  # version 2
        b"\x94\x01\x0f\x05\x10",  # Unmap with too few fields
        m.Attached(m.ROLE_STREAM_FD),  # valid but unexpected
        m.Map(MemoryRange(ADDRESS_SPACE, ADDRESS_SPACE + MIB), 1, 0, True),  # beyond the space
    ):
        h.send_stream(junk)
    h.send_stream(m.Unmap(h.next_seq(), MemoryRange(50 * MIB, 51 * MIB), ()))
    expect_ack(h, h.seq, "ROBUST", "Unmap after invalid messages")
    if h.proc.poll() is not None:
        raise Violation("ROBUST", f"the mapper exited ({h.proc.returncode})")


def _hostile_fd(h: Harness, mem: Memfds) -> None:
    """Junk on fd.sock, read while the mapper waits for an fd, must not fail the Map."""
    mem.make(5)
    fault(h, f"read {6 * MIB + 0x20:#x} 4", 6 * MIB + 0x20)
    h.send_stream(m.Map(MemoryRange(6 * MIB, 7 * MIB), 5, 0, True))
    assert h.conn is not None
    for junk in (b"\xc1", b"\x93\x01\x63\x00", b"\x92\x01\x0d"):
        h.conn.send(junk)
    h.send_fd(m.FdGrant(5, MIB, True), mem.fds[5])
    answer_ok(h, "ROBUST", "read of a Map after junk on fd.sock", mem.read(5, 0x20, 4))


def _unmap_and_release(h: Harness, mem: Memfds) -> None:
    h.send_stream(m.Unmap(h.next_seq(), MemoryRange(0, MIB), (1,)))
    expect_ack(h, h.seq, "UNMAP-ACK", "Unmap of a mapped range")
    rng = fault(h, "read 0x1010 4", 0x1010)
    h.send_stream(m.NoMapping(rng))
    answer_err(h, "UNMAP-APPLY", "read of an unmapped range")
    # mappable 1 also backs 5 MiB..: still held until that goes too
    h.send_stream(m.Unmap(h.next_seq(), MemoryRange(5 * MIB, 5 * MIB + 0x10000), (1,)))
    expect_ack(h, h.seq, "UNMAP-ACK", "Unmap of a mapping at a file offset")
    if holds(h, 1):
        raise Violation("RELEASE-CLOSE", "the fd of mappable 1 is still open after its release")
    h.send_stream(m.Unmap(h.next_seq(), MemoryRange(MIB, 2 * MIB), ()))
    expect_ack(h, h.seq, "UNMAP-ACK", "Unmap without release")
    h.send_stream(m.Release(h.next_seq(), (2,)))
    expect_ack(h, h.seq, "RELEASE-ACK", "Release")
    if holds(h, 2):
        raise Violation("RELEASE-CLOSE", "the fd of mappable 2 is still open after Release")


def _shutdown(h: Harness, mem: Memfds) -> None:
    barrier(h)
    # a manager stopping for good, in the words the mapper negotiated (§9)
    stop = shutdown_for("conformance: the checker is done", m.SHUTDOWN_STOPPING, h.features)
    h.send_stream(stop)
    h.pump(0.2)  # (nothing acknowledges a Shutdown)
    h.command(f"read {2 * MIB + 0x10:#x} 4")  # mapped before: dropped at the stop
    answer_err(h, "SHUTDOWN", "read of memory mapped before a Shutdown `stopping`")
    h.command(f"read {20 * MIB:#x} 4")
    h.wait_for(lambda: h.lines or h.fd_msgs)
    if h.fd_msgs and isinstance(h.fd_msgs[0], m.SendMappings):
        h.fd_msgs.popleft()
        h.send_stream(m.NoMapping(MemoryRange(20 * MIB, 20 * MIB + 4096)))
        h.answer("SHUTDOWN", "read")
        raise Violation("SHUTDOWN", "faulted after Shutdown")
    answer_err(h, "SHUTDOWN", "read of unmapped memory after Shutdown")
    # After Shutdown nothing answers a Detach: `quit` closes without one (a Detach sent anyway
    # is harmless), and the mapper must not wait for a DetachAck past the checker's timeout.
    h.command("quit")
    h.expect_exit("SHUTDOWN", "quit after Shutdown")


def _evicted_while_stopped(h: Harness, mem: Memfds) -> None:
    """The manager evicts a mapper stopped past its unmap timeout (at least 1 s) and ends its
    registration; the write the mapper is asked for as it runs again must not land (§9)."""
    barrier(h)
    before = mem.read(1, 0x3000, 4)
    os.kill(h.pid, signal.SIGSTOP)
    try:
        time.sleep(1.2)
        # as a manager evicts, but the stream's copy of the Shutdown held back until the
        # answer: what fd.sock says must be enough (§9), or a mapper that reads the stream
        # alone passed by the luck of its timing
        farewell = shutdown_for("conformance: evicted", m.SHUTDOWN_EVICTED, h.features)
        h.send_fd(farewell)
        assert h.conn is not None
        h.conn.close()
        h.conn, h.fd_closed = None, True
        h.command("write 0x3000 deadbeef")
    finally:
        os.kill(h.pid, signal.SIGCONT)
    line = h.answer("LEASE", "write to memory held before an eviction while stopped")
    h.send_stream(farewell)
    if mem.read(1, 0x3000, 4) != before:
        raise Violation("LEASE", "a write after the eviction reached the memory it held")
    if not line.startswith("err"):
        raise Violation("LEASE", f"a write after the eviction answered {line!r}")
    h.command("quit")
    h.expect_exit("SHUTDOWN", "quit after an eviction")


def _tags(h: Harness, mem: Memfds) -> None:
    if not (h.features or 0) & m.FEATURE_TAGS:
        return  # not negotiated: nothing to check
    tags = set()
    for gpa in (30 * MIB, 30 * MIB + 0x10000):
        h.command(f"read {gpa:#x} 4")
        req = h.expect_fd(m.SendMappings, "FAULT-REQUEST", "read")
        assert isinstance(req, m.SendMappings)
        if req.tag is None or req.tag in tags:
            raise Violation("TAGS", f"request without a tag of its own: {req}")
        tags.add(req.tag)
        h.send_stream(m.Error("not-attached", "conformance: refused", req.tag))
        line = h.answer("TAGS", "read refused by a tagged Error")
        if not line.startswith("err"):
            raise Violation("TAGS", f"a refused request answered {line!r}")


def _detach(h: Harness, mem: Memfds) -> None:
    h.command("quit")
    h.expect_stream(m.Detach, "DETACH", "leaving")
    if (h.features or 0) & m.FEATURE_DETACH_ACK:
        h.wait_for(lambda: h.fd_closed, 0.3)
        if h.fd_closed:
            raise Violation("DETACH", "fd.sock closed before DetachAck")
        h.send_stream(m.DetachAck())
    if not h.wait_for(lambda: h.fd_closed):
        raise Violation("DETACH", "fd.sock still open after Detach")
    h.answer("DETACH", "quit")
    h.expect_exit("DETACH", "quit")


SESSIONS: tuple[tuple[Step, ...], ...] = (
    (
        ("map a fault", _map_fault),
        ("a late fd", _late_fd),
        ("unsolicited and duplicate Maps", _unsolicited),
        ("FdDenied, NoMapping, Unmap of ranges never mapped", _denied_and_gaps),
        ("read-only", _read_only),
        ("tagged requests", _tags),
        ("invalid messages on the stream", _hostile_stream),
        ("invalid messages on fd.sock", _hostile_fd),
        ("Unmap and Release", _unmap_and_release),
        ("detach", _detach),
    ),
    (
        ("map a fault", _map_fault),
        ("unsolicited and duplicate Maps", _unsolicited),
        ("Shutdown", _shutdown),
    ),
    (
        ("map a fault", _map_fault),
        ("evicted while stopped", _evicted_while_stopped),
    ),
)


def run(command: Sequence[str], timeout: float = 5.0) -> Report:
    """Run every session against fresh instances of the mapper `command`."""
    report = Report()
    for steps in SESSIONS:
        h = Harness(command, timeout)
        mem = Memfds()
        try:
            register(h)
            for _, step in steps:
                step(h, mem)
                report.passed.append(step.__name__.strip("_"))
        except Violation as exc:
            report.violations.append(exc)
        finally:
            report.stderr.append(h.close())
            mem.close()
    return report
