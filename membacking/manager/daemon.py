"""The manager daemon: the I/O shell around `ManagerState`.

One thread polls the mapper ROUTER, the control ROUTER, the fd socket (SEQPACKET) and its
connections; it decodes each message, feeds it to the state machine and carries out the effects.
A bad message is rejected and counted; nothing a peer sends can stop the loop.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterable
from types import FrameType
from typing import TYPE_CHECKING, Any

import zmq

from .. import trace
from ..protocol import messages as m
from ..protocol.codec import decode, encode
from ..protocol.errors import ProtocolError
from ..protocol.messages import Channel
from ..runtime import RuntimePaths
from . import fdroom, handover, reattach, sdnotify, shutdown, startup
from .backing import MemfdStore
from .control import STOPPING_OPS, addressed_elsewhere
from .errors import Refused
from .fdconn import FdConn, kill_evicted
from .fdserver import MAX_UNREGISTERED, FdServer
from .fdstore import FdStore
from .heap import Heap
from .persist import READ_ONLY_OPS, Persistence, unjournaled
from .routers import IPC_FILE_OUTLIVES_CLOSE, bind_router, new_router, open_to_other_users
from .rundir import RuntimeDirLock, raise_fd_limit
from .settings import ManagerConfig, config_widens
from .state import Disconnect, Effect, ManagerState, Send, SendFd
from .strikes import StreamStrikes

if TYPE_CHECKING:
    from .metrics import ManagerMetrics

#: frames of one message kept beyond the identity; every valid message has 1 (mapper) or 2
#: (control); more are received and dropped, and the message is refused as malformed
MAX_FRAMES = 4

log = logging.getLogger("membacking.manager")

#: the Error text answering a message of more than one frame on the mapper socket
ONE_FRAME = "send exactly one frame per message"
#: descriptors kept free below the open-file limit, for ZeroMQ's own accepts and short needs
FD_HEADROOM = 64
# plain ints: pyzmq's flag enums make every `&` a call into the enum module
_POLLIN, _POLLOUT, _RCVMORE = int(zmq.POLLIN), int(zmq.POLLOUT), int(zmq.RCVMORE)


class Daemon(FdServer):
    """Serves one runtime directory until `stop()` (or SIGINT/SIGTERM under `run`)."""

    def __init__(self, config: ManagerConfig) -> None:
        self.config = config
        self.paths = RuntimePaths.resolve(config.runtime_dir)
        self.persist = Persistence(config.persist, self.paths) if config.persist.enabled else None
        self.fdstore = FdStore.attach(config.persist, str(self.paths.root))  # under systemd
        self.store, self.state = self._empty_state()
        self._lock = RuntimeDirLock(self.paths)
        self.instance = self._lock.instance
        self._conns: dict[int, FdConn] = {}
        self._conn_of_mapper: dict[int, FdConn] = {}
        self._stop_reason: str | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._allowed_uids = {os.getuid(), 0, *config.allow_uids}
        self._allowed_gids = set(config.allow_gids)
        self._strikes = StreamStrikes()  # undecodable messages on the mapper socket
        self._journal_due = False  # a change to journal before the next reply (or the tick)
        self._accept_paused = False
        self._evict_kill = config.evict_kill
        self._fd_ceiling = 1 << 30  # set from the open-file limit at start
        self._poller: zmq.Poller | None = None
        self.heap = Heap()  # what the garbage collector walks (heap.py)
        #: the state the heap was settled with before a handover was asked for, if any
        self.settled_early: ManagerState | None = None
        self.metrics: ManagerMetrics | None = None  # made to serve them (startup.serve_metrics)
        #: the port metrics are served on, once started (None: not served)
        self.metrics_port: int | None = None
        #: with `takeover`: the answer of the daemon that handed over
        self.handed_over: dict[str, Any] | None = None
        #: once this daemon agreed to hand over: (send on the handover channel, with the state)
        self.handing_over: tuple[bool, bool] | None = None
        #: set by a process that ends right after a handover (`manager run`): the memory
        #: descriptors are left for the kernel to close at its exit (closing 1,000 of them one
        #: by one took about 1.2 ms of CPU in the handover's gap)
        self.exit_after_handover = False
        #: the last refused handover's (asking pid, code): a new daemon asks again while busy
        self.handover_refused: tuple[Any, str] | None = None

    def _empty_state(self) -> tuple[MemfdStore, ManagerState]:
        config = self.config
        store = MemfdStore(self.persist.dir if self.persist else None, prealloc=config.prealloc)
        state = ManagerState(
            store,
            address_space=config.address_space,
            unmap_timeout=config.unmap_timeout,
            limits=config.limits,
        )
        state.evict_kill = config.evict_kill
        return store, state

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Claim the runtime directory, create the initial regions, bind every socket and
        serve the metrics; a start that fails leaves no directory it created."""
        limit = raise_fd_limit()
        # libzmq aborts the process when it cannot accept a connection for want of descriptors,
        # so the daemon never lets its own descriptors come within FD_HEADROOM of the limit.
        self._fd_ceiling = limit - FD_HEADROOM
        self.store.fd_ceiling = self._fd_ceiling
        limits = self.config.limits
        wanted = limits.max_regions + 3 * limits.max_mappers + FD_HEADROOM
        if limit < wanted:
            log.warning(
                "open-file limit %d is below what --max-regions and --max-mappers may need "
                "(%d); beyond it new mappers and regions are refused (raise LimitNOFILE=)",
                limit,
                wanted,
            )
        # the ZeroMQ context and its ROUTERs, bound once the runtime directory is this
        # daemon's: made before a takeover asks, while the running daemon still serves
        self._ctx = zmq.Context()
        self._mapper, self._control = new_router(self._ctx), new_router(self._ctx, control=True)
        try:
            taken = startup.take_over(self)
        except BaseException:
            self._drop_zmq()
            raise
        try:
            self._lock.acquire()
        except BaseException:
            startup.failed(self, taken)
            self._drop_zmq()
            raise
        trace.mark("daemon.locked")
        try:
            startup.adopt(self, taken)
            # the mappers of the manager before, still running, are awaited back (awaited.py)
            back = self.state.awaited.begin(self.state._monotonic(), self.state.unmap_timeout)
            if back:
                # they register again at once: the block of ids they get is journaled by the save
                # below, not by a save of its own at the first Hello (0.3 ms in a handover's gap)
                self.state.reserve_mapper_id()
            if taken is None:  # (a takeover made room before it asked: not in its gap)
                # their connections and the first others' fit in the descriptor table now,
                # not by growing it as they are accepted
                fdroom.make_room(
                    fdroom.PER_MAPPER * (len(back) + MAX_UNREGISTERED) + fdroom.SPARE,
                    self._fd_ceiling,
                )
            trace.mark("daemon.adopted")
            self._save_state()
            trace.mark("daemon.saved")
            bind_router(self._mapper, self.paths.mapper_endpoint, self.paths.mapper_socket)
            bind_router(self._control, self.paths.control_endpoint, self.paths.control_socket)
            self._listen = socket.socket(
                socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
            )
            # listening before it is in place: a mapper that sees fd.sock appear (sockwatch.py
            # wakes it at once) never finds a socket that refuses connections
            staging = self.paths.fd_socket_staging
            self._listen.bind(os.fspath(staging))
            os.chmod(staging, 0o666 if config_widens(self.config) else 0o600)
            self._listen.listen(128)
            os.rename(staging, self.paths.fd_socket)
            self._listen.setblocking(False)
            if config_widens(self.config):
                open_to_other_users(self.paths, self.config.allow_uids, self.config.allow_gids)
            trace.mark("daemon.bound")
            startup.serve_metrics(self)
            if self.persist is not None:
                self.persist.announce()
            startup.log_held(self)
        except BaseException:
            startup.failed(self, taken)
            self._close_all()
            raise

    def _drop_zmq(self) -> None:
        """A start that failed before the runtime directory was claimed: close the ROUTERs
        (never bound) and the context."""
        self._mapper.close(0)
        self._control.close(0)
        self._ctx.term()

    def _save_state(self) -> None:
        """Journal the region table if it changed (before any reply says a change is done)."""
        self._journal_due = False
        self.state.awaited.saved()
        if self.persist is not None and not self.persist.save_logged(self.state, self.store):
            self.state.rejected["internal"] += 1
        if self.fdstore is not None:
            self.fdstore.sync(self.state, self.store)

    def stop(self, reason: str = "stopped") -> None:
        """Ask the loop to shut down (safe from signal handlers and other threads)."""
        self._stop_reason = reason
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def run(
        self, on_ready: Callable[[Daemon], None] | None = None, install_signals: bool = True
    ) -> None:
        """Start, serve until stopped, then shut down cleanly."""
        self.start()
        if install_signals:
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, self._on_signal)
        try:
            # the state is adopted, initial regions exist; a state prepared before a handover
            # was asked for was settled then (handover.take_over): only what came since now
            reattach.warm(self.state)  # done already if prepared before a handover's ask
            self.heap.settle(self._size(), full=self.settled_early is not self.state)
            trace.mark("daemon.settled")
            if on_ready is not None:
                on_ready(self)
            sdnotify.notify("READY=1")
            trace.mark("daemon.serving")
            self._loop()
        finally:
            self._shutdown()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop(f"received {signal.Signals(signum).name}")

    def _shutdown(self) -> None:
        shutdown.shut_down(self)

    def _close_all(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        for conn in list(self._conns.values()):
            conn.close()  # and the fd copies waiting in its outbox
        self._conns.clear()
        for name in ("_mapper", "_control"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close()
        if getattr(self, "_listen", None) is not None:
            self._listen.close()
        if self.persist is not None:
            self.persist.close(self.state, self.store, clean=False)  # if not closed already
        if self.fdstore is not None:
            self.fdstore.close()
        ctx = getattr(self, "_ctx", None)
        if ctx is not None and not IPC_FILE_OUTLIVES_CLOSE:
            ctx.term()  # its listeners would unlink a successor's socket files as they close
            ctx = None
        # the runtime directory is free for a successor now (in a handover it is waiting for
        # it); what follows concerns this process alone: the context's end waits for what is
        # still queued (the mappers' Shutdown) to be delivered, up to the ROUTERs' linger
        self._lock.release()
        if ctx is not None:
            ctx.term()
        if self.handing_over is None or not self.exit_after_handover:
            self.store.close_all()
        self._wake_r.close()
        self._wake_w.close()
        self.heap.close()

    # ---- loop ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        next_tick = time.monotonic() + 1.0
        # One poller for the daemon's life: connections are added and removed as they come
        # and go (rebuilding it per iteration cost a measurable part of each fault).
        poller = self._poller = zmq.Poller()
        poller.register(self._mapper, zmq.POLLIN)
        poller.register(self._control, zmq.POLLIN)
        poller.register(self._listen.fileno(), zmq.POLLIN)
        poller.register(self._wake_r.fileno(), zmq.POLLIN)
        for fileno in self._conns:
            poller.register(fileno, zmq.POLLIN)
        while self._stop_reason is None:
            # work a change left for later (state.work, state.step): between messages, unwaited
            busy = self.state.has_steps or self.state.has_work
            timeout = 0 if busy else int(max(0.0, next_tick - time.monotonic()) * 1000) + 1
            ready = dict(zmq.zmq_poll(poller.sockets, timeout))
            if self._mapper in ready:
                self._drain(self._mapper, self._on_mapper_frames)
            if self._control in ready:
                self._drain(self._control, self._on_control_frames)
            if self._listen.fileno() in ready:
                self._guard("accept", None, self._accept)
            for fileno in [f for f in ready if isinstance(f, int) and f in self._conns]:
                conn = self._conns.get(fileno)  # None: dropped while handling another
                if conn is not None and ready[fileno] & _POLLOUT:
                    self._flush_outbox(conn)
                if conn is not None and ready[fileno] & ~_POLLOUT and conn.sock.fileno() != -1:
                    self._on_fd_conn(conn)
            if self._wake_r.fileno() in ready:
                with contextlib.suppress(BlockingIOError):
                    self._wake_r.recv(64)
            if self.state.has_steps:  # a batch of a change's messages (steps.py)
                self._guard("step", None, lambda: self._apply(self.state.step()))
            elif self.state.has_work:
                self._guard("work", None, self.state.work)
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + 1.0
                self._guard("tick", None, functools.partial(self._tick, not ready))

    def _tick(self, idle: bool = False) -> None:
        self._tick_awaited()  # mappers awaited back after a restart
        if self._journal_due or self.state.awaited.dirty:  # changes, mappers: within a second
            self._save_state()
        self._replay_deferred()
        self._resume_accepting()
        self._apply(self.state.tick())
        if self.persist is not None:  # rollbacks made on acks; files of completed removals
            self.persist.tick(self.state, self.store)
        if self.fdstore is not None:  # completed removals, rollbacks
            self.fdstore.tick(self.state, self.store)
        self._sweep()  # connections that never registered, mappers whose process is gone
        self.heap.tick(idle, self._size())

    def _size(self) -> int:
        """What the state holds, as the heap's policy measures its growth (heap.py)."""
        return len(self.state.regions) + len(self.state.table) + len(self.state.mappers)

    def _drain(self, sock: zmq.Socket[bytes], handler: Callable[[list[bytes]], None]) -> None:
        """Handle the messages waiting on a ROUTER the poller found readable."""
        ready = [(sock, _POLLIN)]
        for i in range(256):  # bounded, so one busy socket cannot starve the others
            # The poller has answered for the first message. After it, a zero-timeout zmq_poll
            # costs half of what an empty receive's exception costs (and less than
            # getsockopt(EVENTS), which builds an enum member per call).
            if i and not zmq.zmq_poll(ready, 0):
                return
            try:
                # Frame by frame (recv_multipart costs about 3x as much for two frames). A
                # ROUTER always puts the sender's identity before at least one frame.
                frames = [sock.recv(zmq.NOBLOCK), sock.recv()]
            except zmq.Again:
                return
            while sock.getsockopt(_RCVMORE):
                frame = sock.recv()
                if len(frames) <= MAX_FRAMES:  # the rest of an oversized message is dropped
                    frames.append(frame)
            self._guard("zmq message", None, functools.partial(handler, frames))

    def _guard(self, what: str, pid: int | None, action: Callable[[], object]) -> None:
        """Run one handler; an unexpected exception is logged and counted, never fatal."""
        try:
            action()
        except Exception:
            self.state.rejected["internal"] += 1
            log.exception("internal error while handling %s from pid %s", what, pid)

    def _apply(self, effects: Iterable[Effect], journal_first: bool = True) -> None:
        """Carry out the state machine's effects; a reply (but that of a read-only request,
        `journal_first` false) is sent only once the changes made so far are journaled."""
        for effect in effects:
            if isinstance(effect, Send):
                data = encode(effect.msg)
                if effect.channel is Channel.MAPPER:
                    awaited = self.state.awaited
                    if (awaited.unjournaled or awaited.dirty) and awaited.due_before(effect.msg):
                        self._save_state()  # the mappers' records first (awaited.due_before)
                    self._mapper.send(effect.identity, zmq.SNDMORE)  # cheaper than send_multipart
                    self._mapper.send(data)
                else:
                    if self._journal_due and journal_first:
                        self._save_state()
                        data = unjournaled(self.state, effect.msg, data)  # said, if so
                    self._control.send(effect.identity, zmq.SNDMORE)
                    self._control.send(b"", zmq.SNDMORE)
                    self._control.send(data)
            elif isinstance(effect, SendFd):
                conn = self._conn_of_mapper.get(effect.mapper_id)
                if conn is not None:
                    fd = None
                    if isinstance(effect.msg, m.FdGrant):
                        fd = self.store.grant_fd(effect.msg.mappable_id)
                    self._fd_send(conn, effect.msg, fd)
            elif isinstance(effect, Disconnect):
                conn = self._conn_of_mapper.pop(effect.mapper_id, None)
                if effect.unresponsive and self._evict_kill:
                    kill_evicted(effect.mapper_id, conn, self.state.counters)
                if conn is not None:
                    self._drop_conn(conn, "evicted", effect.reason)
                else:
                    self._apply(self.state.farewell(effect.mapper_id, effect.reason))
                self._apply(self.state.mapper_gone(effect.mapper_id, "evicted"))

    # ---- ZeroMQ channels -----------------------------------------------------------------------

    def _on_mapper_frames(self, frames: list[bytes]) -> None:
        identity = frames[0]
        mapper_id = self.state.mapper_of(identity)
        if mapper_id is None and self._strikes.ignored(identity):
            self.state.rejected["ignored"] += 1  # a ROUTER cannot hang up on it: stop answering
            return
        if len(frames) != 2:
            detail = f"{len(frames) - 1} frames on the mapper socket"
            self._undecodable(identity, mapper_id, "malformed", detail, ONE_FRAME)
            return
        try:
            msg = decode(frames[1], Channel.MAPPER, sender="mapper")
        except ProtocolError as exc:
            self._undecodable(identity, mapper_id, exc.reason, str(exc), str(exc))
            return
        rejections = self.state.rejections
        effects = self.state.handle_mapper(identity, msg)
        if mapper_id is not None and self.state.rejections == rejections:  # acted on: §11.2
            self._strikes.valid(mapper_id)
        if mapper_id is None:
            if self.state.mapper_of(identity) is not None:
                self._strikes.attached(identity)
            elif any(isinstance(e, Send) and isinstance(e.msg, m.Error) for e in effects):
                self._strikes.stranger(identity)
        self._apply(effects)
        if isinstance(msg, m.Attach):
            self._attached(msg.mapper_id)  # its fd socket read again (fdserver.py), and more

    def _undecodable(
        self, identity: bytes, mapper_id: int | None, reason: str, detail: str, answer: str
    ) -> None:
        """A message on the mapper socket that does not decode (docs/PROTOCOL.md §11.2: not one
        frame, or refused by the codec): answered with an Error and a strike of its sender, the
        attached mapper it belongs to or the unattached peer it comes from."""
        entry = self.state.mappers.get(mapper_id) if mapper_id is not None else None
        if entry is not None:
            detail = f"mapper {entry.id} ({entry.name}): {detail}"
        self.state.reject(reason, detail, entry.pid if entry is not None else None)
        self._apply([Send(Channel.MAPPER, identity, m.Error(reason, answer[:1000]))])
        if mapper_id is None:
            self._strikes.stranger(identity)
        elif (strikes := self._strikes.mapper(mapper_id)) is not None:
            who = f"mapper {mapper_id}" + (
                f" ({entry.name}, pid {entry.pid})" if entry is not None else ""
            )
            log.error("%s evicted: %d undecodable messages in a row on its stream", who, strikes)
            self.count_strike_eviction()
            reason = f"{m.SHUTDOWN_EVICTED}: {strikes} undecodable messages in a row"
            self._apply([Disconnect(mapper_id, reason)])

    def _on_control_frames(self, frames: list[bytes]) -> None:
        if len(frames) != 3 or frames[1] != b"":
            self.state.reject("malformed", "control message without a REQ envelope")
            return
        identity = frames[0]
        try:
            msg = decode(frames[2], Channel.CONTROL, sender="client")
        except ProtocolError as exc:
            self.state.reject(exc.reason, str(exc))
            self._apply([Send(Channel.CONTROL, identity, m.Error(exc.reason, str(exc)[:1000]))])
            return
        refusal = isinstance(msg, m.ControlRequest) and addressed_elsewhere(msg.args, self.instance)
        if refusal:
            self.state.reject("wrong-instance", refusal.message)
            self._apply([Send(Channel.CONTROL, identity, refusal)])
            return
        self._control_request(identity, msg)

    def _control_request(self, identity: bytes, msg: m.Message) -> None:
        """A control request addressed to this daemon (also one that waited: awaited.py)."""
        if isinstance(msg, m.ControlRequest) and (
            msg.op == handover.OP or self._stop_reason is not None
        ):
            self._apply(handover.answer(self, identity, msg))
            return
        try:
            effects = self.state.handle_control(identity, msg)
            if (
                isinstance(msg, m.ControlRequest)
                and msg.op in STOPPING_OPS
                and any(isinstance(e, Send) and isinstance(e.msg, m.ControlReply) for e in effects)
            ):
                shutdown.stop_keeping(self, msg.args)  # (`manager stop --keep-state`)
                self.stop("stop requested on the control socket")
        except Refused as exc:
            effects = [Send(Channel.CONTROL, identity, m.Error(exc.code, str(exc)))]
        except Exception as exc:
            log.exception("control request failed")
            self.state.rejected["internal"] += 1
            effects = [Send(Channel.CONTROL, identity, m.Error("internal", str(exc)[:1000]))]
        journaled = self.persist is not None or self.fdstore is not None
        if not journaled or getattr(msg, "op", None) in READ_ONLY_OPS:
            self._apply(effects, journal_first=False)
            return
        # Mappers' messages first, the journal before the answer (a removal's: after the acks).
        self._apply(
            e for e in effects if not (isinstance(e, Send) and e.channel is Channel.CONTROL)
        )
        self._journal_due = True
        self._apply(e for e in effects if isinstance(e, Send) and e.channel is Channel.CONTROL)

    # ---- fd socket -----------------------------------------------------------------------------
