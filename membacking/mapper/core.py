"""`VaMapper`: one process's reservation of the guest address space, the table of what is mapped
in it, and the mapper thread that applies the manager's Map / NoMapping / Unmap in order.

Safety scheme (Python cannot recover from SIGSEGV): every access checks the table and copies
under one `lock` (aligned plain words excepted: see memory.py and Reservation.words); the mapper
thread takes the same lock before it maps or unmaps anything. Open views pin their range; an
Unmap touching a pinned range is acknowledged only after the last view on it closes, so an
UnmapAck always means no access can reach the old memory. Accesses also need a live lease
(lease.py): a mapper evicted while stopped drops every mapping before any access touches one.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable

import zmq

from ..errors import GuestMemoryError
from ..ffi import MADV_DONTDUMP, Reservation
from ..protocol import messages as m
from ..protocol.errors import ProtocolError
from ..protocol.messages import PRIVATE_MAPPABLE, Message
from ..protocol.ranges import MemoryRange
from . import forking, reconnect
from .acks import AckQueue
from .chunks import Chunk, ChunkTable, MapCountBudget
from .faulting import fault
from .fds import NEED_FD_SOCKET, MapperFds
from .lease import (
    FAREWELL_WAIT,
    POLL_MS,
    Lease,
    await_detach_ack,
    drop_every_mapping,
    on_hangup,
    on_shutdown,
    unmap_all,
)
from .link import ManagerLink
from .views import ViewPins, end_copy_on_write
from .waitlist import MAP_FAILED, WaiterSet

log = logging.getLogger("membacking.mapper")

# plain ints: pyzmq's flag enums make every `&` a call into the enum module
_POLLOUT, _POLLERR = int(zmq.POLLOUT), int(zmq.POLLERR)

#: faults one access may take before it gives up (each fault maps at least one page it needs)
MAX_FAULTS = 64

_monotonic = time.monotonic


class VaMapper:
    """Maps guest memory into this process on demand; see the module docstring for safety."""

    def __init__(
        self,
        link: ManagerLink,
        *,
        fault_timeout: float = 30.0,
        reconnect_timeout: float = 30.0,
        follow_fresh: bool = False,
    ) -> None:
        #: seconds to wait for a manager to come back after the connection is lost (0: never);
        #: `relinked` is clear while the mapper registers again (faults wait for it); whether
        #: it goes on with one that serves other memory (reconnect.py)
        self.reconnect_timeout, self.follow_fresh = reconnect_timeout, follow_fresh
        self.relinked = threading.Event()
        self.relinked.set()
        self.relink_reason = ""
        self.relink_announced = False  # begun by a Shutdown `restarting` (reconnect.py)
        #: called on the mapper thread each time it registered again: (kept, old mapper id)
        self.relink_hooks: list[Callable[[bool, int], None]] = []
        self.link = link
        self.id = link.mapper_id
        self.address_space = link.address_space
        self.fault_timeout = fault_timeout
        self.reservation = Reservation(self.address_space)
        self.reservation.set_name(0, self.address_space, "membacking-guest")
        #: the access lock: held for every check-then-copy and for every map or unmap
        self.lock = threading.Lock()
        self.chunks = ChunkTable()
        #: VMAs this mapper may split its reservation into (vm.max_map_count less headroom)
        self.map_budget = MapCountBudget.from_environment()
        #: [start, end, writable] of the chunk last accessed (checked first; reset on unmap),
        #: then the lease: the monotonic time before which accesses may touch memory (see
        #: lease.py), kept here so the hot path finds it in the list it has loaded already
        self.hot: list[int | bool | float] = [0, 0, False, 0.0]
        self.mv = self.reservation.buffer()
        self.waiters = WaiterSet()
        #: fds the manager pushed, each behind the Map needing it
        self.fds = MapperFds(self.link, self.id)
        #: what open views pin (their Unmaps wait)
        self.views = ViewPins()
        self._pending_unmaps: list[tuple[int, MemoryRange, tuple[int, ...]]] = []
        self.gone: str | None = None
        #: why every mapping was dropped (evicted, or the manager stopped), once it was
        self.dropped: str | None = None
        #: why this process cannot use the mapper: it was forked from the one that attached it
        self.forked: str | None = None
        self.eager, self.closed = False, False
        self._eager_done = threading.Event()
        self._eager_done.set()  # cleared while an eager upgrade waits for its EagerResult
        #: set when the manager answered Detach (FEATURE_DETACH_ACK) or is gone
        self._detach_acked = threading.Event()
        self.fds.on_error = self._refused
        self._eager_message = ""
        self._outbox: collections.deque[Message] = collections.deque()
        self.acks = AckQueue(self.link, self.fds, self.id, self._watch_for_room)
        #: the mapper thread's poller (while it runs); whether it polls the fd socket (till closed)
        self._poller: zmq.Poller | None = None
        self._fd_polled = False
        self._stream_ready = [(self.link.stream, zmq.POLLIN)]  # for a zero-timeout zmq_poll
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.lease = Lease(self.hot, self._wake)
        self._stop = False
        self._thread = threading.Thread(
            target=self._run, name=f"membacking-mapper-{self.id}", daemon=True
        )
        forking.track(self)  # a child forked from this process disowns it (forking.py)
        self._thread.start()

    # ---- the mapper thread ---------------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def post(self, msg: Message) -> None:
        """Have the mapper thread send `msg` on the stream socket."""
        self._outbox.append(msg)
        self._wake()

    def _run(self) -> None:
        while not self._stop:
            self._serve()
            if self._stop or self.relinked.is_set():
                break
            # False: no manager took the mapper back in time (it is gone for good: it dropped
            # every mapping, and new faults fail) or the mapper is closing
            try:
                reconnect.relink(self)
            except Exception as exc:  # a bug of ours: faults fail rather than wait forever
                log.exception("mapper %d: registering again failed", self.id)
                self.gone_for_good(f"registering again failed: {exc}")
        self.relinked.set()

    def _serve(self) -> None:
        """Serve the current connection until stopped, or until it is lost and the mapper is
        to register again with the manager's successor (reconnect.py)."""
        poller = self._poller = zmq.Poller()
        poller.register(self.link.stream, zmq.POLLIN)
        # hang-ups only: each fd is read by the Map that needs it, not on a wake-up of its own
        # (and room, while acks wait for it)
        poller.register(self.link.fd_sock.fileno(), _POLLERR)
        self._fd_polled = True
        poller.register(self._wake_r, zmq.POLLIN)
        fd_fileno = self.link.fd_sock.fileno()
        stream = self.link.stream
        # zmq_poll on the poller's own list: Poller.poll only adds a Python frame around it
        items = poller.sockets
        self._stream_ready = [(stream, zmq.POLLIN)]
        lease = self.lease
        while not self._stop and self.relinked.is_set():
            # taken before the poll: whatever the poll shows (the fd socket's end, a Shutdown)
            # was there no later than this, and is handled before the lease is renewed
            turn = _monotonic()
            try:
                events = dict(zmq.zmq_poll(items, POLL_MS))
            except zmq.ZMQError:
                break
            if self._wake_r in events:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
            try:
                if self._outbox:  # asked here: most wake-ups have nothing queued
                    self._flush_outbox()
                if self._pending_unmaps:
                    self._complete_unmaps()
                if stream in events:
                    self._drain_stream()  # first: a Shutdown says why the connection ends
                fd_events = events.get(fd_fileno)
                if fd_events is not None:
                    if fd_events & _POLLOUT:
                        self.acks.flush(lambda: self.gone is not None)
                    if fd_events & ~_POLLOUT and (self.gone is not None or self._read_fd_socket()):
                        # closed (or no longer of use): stop polling it, or poll would never
                        # block
                        poller.unregister(fd_fileno)
                        self._fd_polled = False
            except zmq.ZMQError as exc:
                if self._stop:
                    break
                log.error("mapper %d: socket error: %s", self.id, exc)
            except Exception:
                log.exception("mapper %d: unexpected error in the mapper thread", self.id)
            lease.end_turn(turn, renew=self.dropped is None)
        with contextlib.suppress(zmq.ZMQError):
            self._flush_outbox()  # a Detach posted just before the stop still goes out

    def _flush_outbox(self) -> None:
        while self._outbox and self.gone is None:
            self.link.send_stream(self._outbox.popleft())

    def _read_fd_socket(self) -> bool:
        """Take every fd message waiting; True if the manager closed the connection."""
        lost = self.fds.read_waiting()
        farewell = self.fds.take_farewell()
        if farewell is not None:
            self._handle(farewell)
        elif lost is not None and self.relinked.is_set():  # (a Shutdown has not decided yet)
            self._await_farewell()
        if lost is not None:
            on_hangup(self, lost)
        return lost is not None

    def _await_farewell(self) -> None:
        """The fd socket ended without a Shutdown on it (a manager evicting a mapper whose fd
        socket is full says so on the stream only): wait a little for one before taking the
        manager for dead (which keeps every mapping)."""
        deadline = _monotonic() + FAREWELL_WAIT
        while (
            self.gone is None and self.relinked.is_set() and (left := deadline - _monotonic()) > 0
        ):
            if zmq.zmq_poll(self._stream_ready, int(left * 1000) + 1):
                self._drain_stream()

    def _acknowledge(self, msg: m.UnmapAck | m.MapAck) -> None:
        if self.gone is None and self.fds.lost is None:  # else nobody to tell
            self.acks.send(msg)

    def _watch_for_room(self, on: bool) -> None:
        if self._poller is not None and self._fd_polled:
            fileno = self.link.fd_sock.fileno()
            self._poller.modify(fileno, _POLLERR | _POLLOUT if on else _POLLERR)

    def manager_gone(self, reason: str, final: bool = False, announced: bool = False) -> None:
        """Unless `final` (stopped for good, or evicted), mapped memory keeps working while
        faults wait for the manager's successor (reconnect.py); else every mapping is dropped.
        `announced`: the manager's Shutdown said so (no other word of it is awaited)."""
        if final or not reconnect.start_relink(self, reason, announced):
            self.gone_for_good(reason)

    def gone_for_good(self, reason: str) -> None:
        """No manager will take this mapper back: no removal could reach what it maps, so it
        drops every mapping (accesses raise MappingsDroppedError), unless it is detaching."""
        said = not self._stop and drop_every_mapping(self, reason)  # (it logs the reason)
        if self.gone is None:  # before the faults waiting for a relink wake: they read it
            if not said:
                log.warning("mapper %d: %s", self.id, reason)
            self.gone = reason
        self.relinked.set()
        self.waiters.shutdown(reason)
        self._detach_acked.set()  # nobody left to answer a Detach

    def _drain_stream(self) -> None:
        """Apply the messages waiting on the stream, which the poller found readable."""
        ready = self._stream_ready
        fds = self.fds
        moot = 0
        for i in range(1024):
            # The poller answered for the first message; after it, asking costs half of what
            # a receive that finds nothing costs (it raises), and a zero-timeout zmq_poll less
            # than getsockopt(EVENTS) (which builds an enum member per call).
            if i and not zmq.zmq_poll(ready, 0):
                break
            try:
                msg = self.link.recv_stream()
            except ProtocolError as exc:
                log.error("mapper %d: invalid message from the manager ignored: %s", self.id, exc)
                continue
            if msg is None:
                break
            if fds.lost is not None and isinstance(msg, NEED_FD_SOCKET):
                moot += 1  # its fd or its ack would travel on the fd socket, which is gone
                continue
            self._handle(msg)
        if moot:  # (a manager killed in a replay left hundreds: one line, not two each)
            log.info("mapper %d: %d Maps and Unmaps of a lost manager dropped", self.id, moot)

    def _handle(self, msg: Message) -> None:
        if isinstance(msg, m.Map):
            failure = self._apply_map(msg.range, msg.mappable_id, msg.file_offset, msg.writable)
            self.waiters.complete(
                msg.range, msg.writable, None if failure is None else MAP_FAILED + failure
            )
        elif isinstance(msg, m.MapEager):
            failure = self._apply_map(msg.range, msg.mappable_id, msg.file_offset, msg.writable)
            self.waiters.complete(
                msg.range, msg.writable, None if failure is None else MAP_FAILED + failure
            )
            self._acknowledge(m.MapAck(msg.seq, failure is None, (failure or "")[:1000]))
        elif isinstance(msg, m.NoMapping):
            self.waiters.complete(msg.range, None)
        elif isinstance(msg, m.Unmap):
            self._unmap(msg.seq, msg.range, msg.release)
        elif isinstance(msg, m.Release):
            self.fds.close(msg.release)
            self._acknowledge(m.UnmapAck(msg.seq))
        elif isinstance(msg, m.EagerResult):
            self.eager = msg.ok
            self._eager_message = msg.message
            self._eager_done.set()
        elif isinstance(msg, m.Shutdown):
            on_shutdown(self, msg)
        elif isinstance(msg, m.DetachAck):
            self._detach_acked.set()
        elif isinstance(msg, m.Error):
            self._refused(msg)
        else:
            log.warning("mapper %d: ignoring unexpected %s", self.id, type(msg).__name__)

    def _refused(self, msg: m.Error) -> None:
        """An Error from the manager: fails the access whose request it names (FEATURE_TAGS)."""
        why = f"{MAP_FAILED}the manager refused it ({msg.code}): {msg.message}"
        if msg.tag is None or not self.waiters.fail_tagged(msg.tag, why):
            log.warning("mapper %d: the manager rejected a message: %s", self.id, msg.message)

    def _apply_map(
        self, rng: MemoryRange, mappable_id: int, file_offset: int, writable: bool
    ) -> str | None:
        """Map `rng`; None on success, else why it failed."""
        if rng.end > self.address_space:
            return f"{rng} lies outside the address space"
        fd: int | None = None
        if mappable_id != PRIVATE_MAPPABLE:
            got = self.fds.for_map(mappable_id)
            if isinstance(got, str):
                log.warning("mapper %d: %s", self.id, got)
                return got
            fd = got
        with self.lock:
            if self.closed:
                return "the mapper is detached"
            if self.dropped is not None:
                return f"every mapping was dropped: {self.dropped}"
            hit = self.chunks.lookup(rng.start)
            if hit is not None and hit[0] == rng:
                chunk = hit[1]
                if (chunk.mappable_id, chunk.file_offset, chunk.writable) == (
                    mappable_id,
                    file_offset,
                    writable,
                ):
                    return None  # already mapped exactly so (two faults raced)
            over = self.map_budget.refuses(self.chunks, rng)
            if over is not None:
                self.map_budget.report(log, self.id, rng, over)  # (not a line each)
                return over
            self._remove_chunks(rng)
            # A writable view still open here (its Unmap is deferred) must not fault on a write
            # when the new backing is read-only: give it a private copy to write to.
            cow = not writable and self._pinned(rng, for_writing=True)
            try:
                if fd is None:
                    self.reservation.map_anon(rng.start, rng.len, writable or cow)
                else:
                    self.reservation.map_fd(
                        rng.start, rng.len, fd, file_offset, writable, copy_on_write=cow
                    )
            except OSError as exc:
                with contextlib.suppress(OSError):
                    self.reservation.unmap(rng.start, rng.len)
                log.error("mapper %d: cannot map %s: %s", self.id, rng, exc)
                return f"mmap failed: {exc.strerror}"
            try:  # noqa: SIM105 (contextlib.suppress costs three Python calls; every fault runs this)
                self.reservation.madvise(rng.start, rng.len, MADV_DONTDUMP)
            except OSError:
                pass  # kept out of core dumps where the kernel allows it; harmless otherwise
            self.chunks.insert(rng, Chunk(mappable_id, file_offset, writable, cow))
        return None

    def _remove_chunks(self, rng: MemoryRange) -> None:
        """Drop `rng` from the table, keeping the parts of straddling chunks (lock held)."""
        self.chunks.cut(rng)
        self.hot[0:2] = 0, 0  # one step: the fast paths of words read it without the lock

    def _pinned(self, rng: MemoryRange, for_writing: bool = False) -> bool:
        return self.views.pinned(rng, for_writing)

    def _unmap(self, seq: int, rng: MemoryRange, release: tuple[int, ...]) -> None:
        with self.lock:
            self._remove_chunks(rng)
            if self._pinned(rng):
                # An open view still reads this memory: the ack waits for it to close.
                self._pending_unmaps.append((seq, rng, release))
                return
            try:
                self.reservation.unmap(rng.start, rng.len)
            except OSError as exc:
                # The old memory is still mapped here (though no access reaches it: the table
                # no longer has it), so the ack would be a lie. Without it the manager evicts
                # this mapper after its --unmap-timeout, and the removal completes then.
                log.error(
                    "mapper %d: cannot unmap %s (%s): not acknowledging; expect eviction",
                    self.id,
                    rng,
                    exc.strerror or exc,
                )
                return
        self.fds.close(release)
        self._acknowledge(m.UnmapAck(seq))

    def _complete_unmaps(self) -> None:
        if not self._pending_unmaps:
            return
        done: list[tuple[int, MemoryRange, tuple[int, ...]]] = []
        with self.lock:
            self.views.release_escaped()
            waiting = []
            for item in self._pending_unmaps:
                if self._pinned(item[1]):
                    waiting.append(item)
                    continue
                for part, chunk in self.chunks.walk(item[1]):
                    if chunk is None:  # not mapped again since: put the placeholder back
                        self.reservation.unmap(part.start, part.len)
                    elif chunk.cow:  # the writable view is gone: the read-only backing itself
                        end_copy_on_write(self, part, chunk)
                done.append(item)
            self._pending_unmaps = waiting
        for seq, _, release in done:
            self.fds.close(release)
            if seq >= 0:  # -1: owed to a manager that is gone (reconnect.py)
                self._acknowledge(m.UnmapAck(seq))

    # ---- used by accessing threads -------------------------------------------------------------

    def unpin(self, view_id: int, escaped: object = None) -> None:
        """End a view's pin. With `escaped` (the view's exporter, still referenced by slices
        that outlived the block) the pin stays until those slices are gone: until then no Unmap
        of the range is acknowledged, so they can never reach unmapped memory."""
        with self.lock:
            kept = self.views.end(view_id, escaped)
            if kept is not None:  # (start, end)
                log.warning(
                    "mapper %d: a slice of the view of GPA %#x-%#x outlived its block; the range "
                    "stays pinned (Unmaps of it wait) until the slice is released",
                    self.id,
                    *kept,
                )
                return
            wake = bool(self._pending_unmaps)
        if wake:
            self._wake()

    def fault(self, gpa: int, end: int, write: bool) -> None:
        """Ask the manager to map [gpa, end) and wait; raises if it cannot be mapped."""
        fault(self, gpa, end, write)

    def set_eager(self, timeout: float) -> None:
        """Become eager: the manager replays every mapping; raises if that failed."""
        forking.check(self)
        self._eager_done.clear()
        self.post(m.SetEager())
        if not self._eager_done.wait(timeout):
            raise GuestMemoryError(f"the manager did not finish the eager upgrade in {timeout:g}s")
        if not self.eager:
            raise GuestMemoryError(f"could not become eager: {self._eager_message}")

    def close(self) -> None:
        """Detach: say goodbye, stop the thread, close sockets and fds, release the memory."""
        if self.closed or self.forked is not None:  # a forked child has nothing to close
            return
        if self.gone is None and self.relinked.is_set():  # (relinking: nobody to answer)
            self.post(m.Detach())
            if self.link.features & m.FEATURE_DETACH_ACK:
                await_detach_ack(self, self.id)  # fd.sock stays open until the Detach is taken
        self._stop = True
        self._wake()
        self._thread.join(10)
        with self.lock:
            self.views.release_escaped()
            views_open = bool(self.views)
            if views_open:  # kept open past the detach: they read zeros, not guest memory
                unmap_all(self)
            self.closed = True
            self.chunks.clear()
            self.hot[0:2] = 0, 0  # one step: the fast paths of words read it without the lock
        self.waiters.shutdown("detached")
        self.link.close()
        self.fds.close_all()
        wake, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in wake:  # (-1 from now: a late _wake() must not write into a reused number)
            with contextlib.suppress(OSError):
                os.close(fd)
        if views_open:
            log.warning("mapper %d detached with views open: they read zeros now", self.id)
        else:
            self.mv.release()
            self.reservation.release()
