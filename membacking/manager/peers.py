"""Mappers as the state machine sees them: registration, ZeroMQ socket binding, messages,
eager upgrades, eviction and shutdown.
"""

from __future__ import annotations

import logging
import mmap
import secrets
from collections import OrderedDict
from typing import Any

from ..protocol import messages as m
from ..protocol.messages import Channel, Message
from ..protocol.shutdowns import shutdown_for
from ..units import format_duration
from . import reattach
from .awaited import AwaitedMappers
from .dropping import Dropping
from .errors import Refused
from .model import (
    Disconnect,
    Effect,
    MapperEntry,
    Operation,
    Send,
    SendFd,
)
from .reattach import check_holdings, listed, take_holdings
from .steps import Replay
from .table import TableState

log = logging.getLogger("membacking.manager")

#: the host's page size, told to mappers in Welcome (ranges on the wire are multiples of it)
HOST_PAGE_SIZE = mmap.PAGESIZE
#: ZeroMQ identities of mappers removed lately, whose last messages (a Detach that lost the race
#: with the fd socket's close) are dropped without counting them as a stranger's
MAX_DEPARTED = 1024
#: mapper ids are handed out in blocks of this many, each journaled before its first id goes
#: out: a manager that restarts from the journal starts past every id its predecessor issued
MAPPER_ID_BLOCK = 1024


#: PackedHoldings a mapper may send before its stream's Attach arrives (more are checked as
#: Holdings before Attach: refused)
MAX_EARLY_HOLDINGS = 64


class PeerState(TableState):
    """Adds the mapper registry (ids never reused) and mapper messages to the table."""

    #: names the memory this manager serves (Welcome.state_id): kept across restarts that adopt
    #: a state directory; empty: mappers cannot keep what they hold across a restart
    state_id: bytes = b""
    #: the daemon SIGKILLs a mapper it evicts for not answering (--evict-kill): said in the
    #: answers of the changes that waited on it
    evict_kill: bool = False
    #: when a connection on fd.sock was last turned away for want of descriptors (None: never)
    accept_refused_at: float | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._departed: OrderedDict[bytes, None] = OrderedDict()
        #: ids below this may have been handed out; the journal keeps it as next_mapper_id
        self.mapper_ids_reserved = self._next_mapper_id
        #: mappers that may come back holding memory after a restart, and those awaited now
        self.awaited = AwaitedMappers()
        #: evicted mappers within the grace their lease needs to drop what they held
        self.dropping = Dropping()

    def _maybe_finish(self, op: Operation) -> list[Effect]:
        if not op.waiting and not op.graced and self.dropping:
            # a change made right after an eviction waits for the evicted to drop what they
            # held (held here, once made: a change refused before it is made waits for nothing)
            self.dropping.hold(op)
            if op.waiting:
                return []
        return super()._maybe_finish(op)

    def unfinished(self) -> list[Operation]:
        ops = {id(op): op for op in super().unfinished()}
        ops.update((id(op), op) for op in self.dropping.ops())
        return list(ops.values())

    def reserve_mapper_id(self) -> bool:
        """Before a registration: whether the next id starts a new block (then the journal
        must record the block before the id is handed out)."""
        if self._next_mapper_id < self.mapper_ids_reserved:
            return False
        self.mapper_ids_reserved = self._next_mapper_id + MAPPER_ID_BLOCK
        return True

    def has_private_regions(self) -> bool:
        return self.regions.private > 0

    def register_mapper(self, name: str, pid: int) -> MapperEntry:
        """A mapper said Hello on the fd socket: give it an id (never reused) and a token."""
        if len(self.mappers) >= self.limits.max_mappers:
            self.refuse("limit", f"mapper {name!r} refused: {len(self.mappers)} attached", pid)
            raise Refused(
                "limit",
                f"the manager already serves its limit of {self.limits.max_mappers} mappers "
                f"({self.limits.origin('max_mappers')})",
            )
        if self.mappers and self.has_private_regions():
            self.refuse("private", f"mapper {name!r} refused: private RAM is in use", pid)
            raise Refused("private", "private RAM regions exist: only one mapper may attach")
        now = self._clock()
        token = secrets.token_bytes(m.TOKEN_BYTES)
        entry = MapperEntry(self._next_mapper_id, name, pid, token, now, now)
        self._next_mapper_id += 1
        self.mappers[entry.id] = entry
        log.info("mapper %d (%s, pid %d) registered", entry.id, name, pid)
        return entry

    def welcome(self, entry: MapperEntry, offered: int | None = None) -> m.Welcome:
        """Welcome a registered mapper; it offered feature bits `offered` (None: none at all,
        so Welcome carries none either) and gets the subset this manager will use."""
        entry.features = None if offered is None else offered & m.SUPPORTED_FEATURES
        if entry.features is not None and entry.features & m.FEATURE_REATTACH and self.state_id:
            self.awaited.register(entry.id, entry.pid)  # it keeps what it maps if we restart
            return m.Welcome(
                entry.id,
                entry.token,
                self.address_space,
                HOST_PAGE_SIZE,
                entry.features,
                self.state_id,
            )
        return m.Welcome(entry.id, entry.token, self.address_space, HOST_PAGE_SIZE, entry.features)

    def shutdown_message(self, entry: MapperEntry, reason: str, code: str) -> m.Shutdown:
        """Shutdown with its code, or a reason that says it, for this mapper (shutdowns.py)."""
        return shutdown_for(reason, code, entry.features)

    def mapper_of(self, identity: bytes) -> int | None:
        """The mapper a ZeroMQ socket identity is bound to, if any."""
        bound = self._by_identity.get(identity)
        return bound[0] if bound else None

    def mapper_gone(
        self, mapper_id: int, why: str = "disconnected", evicted: str | None = None
    ) -> list[Effect]:
        """A mapper detached, died or was evicted (`evicted`: how, e.g. `by an operator`):
        forget it and unblock what waited on it. A change that waited on an evicted mapper
        reports it as evicted, not as unmapped."""
        entry = self.mappers.pop(mapper_id, None)
        if entry is None:
            return []
        log.info("mapper %d (%s, pid %d) removed: %s", entry.id, entry.name, entry.pid, why)
        self.awaited.depart(mapper_id)
        for identity in (entry.stream, entry.requests):
            if identity is not None:
                self._by_identity.pop(identity, None)
                self._departed[identity] = None
                if len(self._departed) > MAX_DEPARTED:
                    self._departed.popitem(last=False)
        if len(entry.held):
            # its marks among the table's holders go on later turns (`work`, later.py): 10,000
            # holdings took 16 ms; meanwhile a cut passes it by (ids are never reused)
            self.departed[mapper_id] = entry.held
        effects: list[Effect] = []
        if evicted is not None:  # it may run on until its lease ends (dropping.py)
            self.dropping.evicted(mapper_id, self._monotonic())
        for seq in list(entry.unacked):
            op = self._pending.pop((mapper_id, seq), None)
            if op is not None:
                op.waiting.discard((mapper_id, seq))
                if evicted is not None:
                    op.unmapped_from.discard(mapper_id)
                    op.evicted[mapper_id] = evicted
                    self.dropping.hold(op, mapper_id)
                effects.extend(self._maybe_finish(op))
        return effects

    def handle_mapper(self, identity: bytes, msg: Message) -> list[Effect]:
        """A decoded message arrived on the mapper ROUTER from `identity`."""
        if isinstance(msg, m.Attach):
            return self._attach(identity, msg)
        bound = self._by_identity.get(identity)
        if bound is None and identity in self._departed and isinstance(msg, m.Detach):
            # a removed mapper's last words (its Detach, when its fd socket closed first)
            log.debug("%s from removed mapper socket %r dropped", type(msg).__name__, identity)
            return []
        if bound is None:
            if isinstance(msg, m.Detach):  # a mapper whose fd socket closed first: nothing wrong
                log.debug("Detach from a socket of a mapper already gone")
                return []
            self.reject("not-attached", f"{type(msg).__name__} from an unattached socket")
            return [self._error(identity, "not-attached", "send Attach first")]
        mapper_id, role = bound
        entry = self.mappers[mapper_id]
        entry.last_seen = self._clock()
        # mappers of earlier releases: requests on a requests socket, acks on the stream
        effects = (
            self._request(entry, msg)
            if role == m.ROLE_REQUESTS
            else self._acknowledgement(entry, msg)
        )
        if effects is not None:
            return effects
        if role != m.ROLE_REQUESTS:
            if isinstance(msg, m.SetEager):
                return self._upgrade(entry)
            if isinstance(msg, m.Detach):
                return self._detach(entry)
        self.reject("unexpected", f"{type(msg).__name__} on a role-{role} socket", entry.pid)
        return [self._error(identity, "unexpected", f"{type(msg).__name__} is not accepted here")]

    def handle_fd_message(self, mapper_id: int, msg: Message) -> list[Effect] | None:
        """A message a registered mapper sent on its fd socket after Hello: a request
        (SendMappings, ResendFd, Holdings) or an acknowledgement (UnmapAck, MapAck). None if
        `msg` is neither (the caller refuses it as `unexpected`); Refused if it is one that the
        mapper may not send (the caller answers Error(code) and counts a strike)."""
        entry = self.mappers.get(mapper_id)
        if entry is None:  # removed while this message waited
            return []
        entry.last_seen = self._clock()
        effects = self._request(entry, msg)
        return self._acknowledgement(entry, msg) if effects is None else effects

    def _detach(self, entry: MapperEntry) -> list[Effect]:
        """A clean detach: answered with DetachAck if negotiated (the mapper closes its fd
        socket only then), and never counted as a rejection."""
        ack: list[Effect] = []
        if entry.features is not None and entry.features & m.FEATURE_DETACH_ACK:
            ack.append(self._to_mapper(entry, m.DetachAck()))
        return ack + self.mapper_gone(entry.id, "detached")

    def _request(self, entry: MapperEntry, msg: Message) -> list[Effect] | None:
        if isinstance(msg, m.SendMappings):
            if entry.stream is None and msg.tag is not None:
                # nowhere to answer on the stream: refuse it here, so its waiter fails now
                self.reject("not-attached", "SendMappings before the stream socket", entry.pid)
                text = "SendMappings before Attach: the answer would have nowhere to go"
                return [SendFd(entry.id, m.Error("not-attached", text, msg.tag))]
            return self.send_mappings(entry.id, msg.range)
        if isinstance(msg, m.ResendFd):
            return self.resend_fd(entry, msg.mappable_id)
        if isinstance(msg, (m.Holdings, m.PackedHoldings)):
            check_holdings(entry, msg)  # Refused without REATTACH (PACKED_HOLDINGS), ...
            if (
                entry.stream is None
                and isinstance(msg, m.PackedHoldings)
                and len(entry.early_holdings) < MAX_EARLY_HOLDINGS
            ):
                # sent right behind the Attach, which travels through ZeroMQ's I/O threads
                # and may come later: checked once the stream is bound (_attach)
                entry.early_holdings.append(msg)
                return []
            return self._holdings(entry, msg)
        return None

    def _holdings(self, entry: MapperEntry, msg: m.Holdings | m.PackedHoldings) -> list[Effect]:
        if entry.stream is not None:  # (else not taken: take_holdings says so)
            entry.holdings_listed += listed(msg)
            if entry.holdings_listed > reattach.MAX_LISTED:  # not all can be taken: drop it all
                return self._evict_lister(entry)
        effects = take_holdings(self, entry, msg)
        awaited = self.awaited
        if not msg.fds and not msg.mappings and entry.stream:  # an empty one ends them
            entry.holdings_over = True
            if awaited.open or awaited.gave_up:
                awaited.arrived(entry.pid)
        return effects

    def _evict_lister(self, entry: MapperEntry) -> list[Effect]:
        most = reattach.MAX_LISTED
        self.reject("limit", f"Holdings past {most} entries: evicted", entry.pid)
        self.counters["evictions"] += 1
        reason = f"{m.SHUTDOWN_EVICTED}: its Holdings list more than {most} entries"
        effects = self.farewell(entry.id, reason)
        effects.append(Disconnect(entry.id, reason))
        why = f"listed more than {most} holdings"
        return effects + self.mapper_gone(entry.id, why, evicted=why)

    def _acknowledgement(self, entry: MapperEntry, msg: Message) -> list[Effect] | None:
        if isinstance(msg, m.UnmapAck):
            return self._ack(entry.id, msg.seq, None)
        if isinstance(msg, m.MapAck):
            return self._ack(entry.id, msg.seq, None if msg.ok else msg.message or "failed")
        return None

    def _error(self, identity: bytes, code: str, text: str) -> Send:
        return Send(Channel.MAPPER, identity, m.Error(code, text))

    def _attach(self, identity: bytes, msg: m.Attach) -> list[Effect]:
        entry = self.mappers.get(msg.mapper_id)
        if entry is None or not secrets.compare_digest(entry.token, msg.token):
            self.reject("bad-token", f"Attach for mapper {msg.mapper_id} with a wrong token")
            return [self._error(identity, "bad-token", "unknown mapper id or wrong token")]
        if msg.role not in (m.ROLE_STREAM, m.ROLE_REQUESTS, m.ROLE_STREAM_FD):
            self.reject("bad-role", f"Attach with role {msg.role}", entry.pid)
            return [
                self._error(identity, "bad-role", "role must be 0 or 2 (stream) or 1 (requests)")
            ]
        # role 2 is the stream too: it only says that requests and acks come on the fd socket
        role = m.ROLE_REQUESTS if msg.role == m.ROLE_REQUESTS else m.ROLE_STREAM
        current = entry.stream if role == m.ROLE_STREAM else entry.requests
        if current is not None or identity in self._by_identity:
            self.reject("already-attached", f"second role-{msg.role} socket", entry.pid)
            return [self._error(identity, "already-attached", "that role is already bound")]
        if role == m.ROLE_STREAM:
            entry.stream = identity
        else:
            entry.requests = identity
        self._by_identity[identity] = (entry.id, msg.role)  # as attached: logs name it so
        effects: list[Effect] = [Send(Channel.MAPPER, identity, m.Attached(msg.role))]
        if role == m.ROLE_STREAM and entry.early_holdings:
            early, entry.early_holdings = entry.early_holdings, []
            for holdings in early:
                assert isinstance(holdings, m.PackedHoldings)
                if entry.id in self.mappers:  # (not evicted by the ones before)
                    effects += self._holdings(entry, holdings)
        return effects

    def farewell(self, mapper_id: int, reason: str, code: str = m.SHUTDOWN_EVICTED) -> list[Effect]:
        """A Shutdown for a mapper about to be cut off, so it knows why (if still known)."""
        entry = self.mappers.get(mapper_id)
        if entry is None or entry.stream is None:
            return []
        return [self._to_mapper(entry, self.shutdown_message(entry, reason, code))]

    def tick(self) -> list[Effect]:
        """Evict mappers that left a request unanswered for longer than `unmap_timeout`; sum
        up the log lines `log_budget` left out."""
        now = self._monotonic()
        for text, extra in self.log_budget.summaries(now):
            log.warning("%s", text, extra=extra)
        effects: list[Effect] = []
        for op in self.dropping.due(now):  # evicted mappers' graces over
            effects.extend(self._maybe_finish(op))
        wall = self._clock()
        for entry in list(self.mappers.values()):
            if entry.stream is None and wall - entry.connected_at > self.unmap_timeout:
                # a Hello and no Attach: it held a slot of --max-mappers for nothing
                self.reject("timeout", "said Hello but never attached its stream", entry.pid)
                timeout = f"{self.unmap_timeout:g}s"
                reason = f"{m.SHUTDOWN_EVICTED}: it did not attach its stream in {timeout}"
                effects.append(Disconnect(entry.id, reason))
                effects.extend(self.mapper_gone(entry.id, "never attached its stream"))
                continue
            waited = now - min(entry.unacked.values()) if entry.unacked else 0.0
            if entry.unacked and waited > self.unmap_timeout:
                log.error(
                    "mapper %d (%s, pid %d) did not answer within %.1fs: evicted",
                    entry.id,
                    entry.name,
                    entry.pid,
                    self.unmap_timeout,
                )
                self.counters["evictions"] += 1
                reason = f"{m.SHUTDOWN_EVICTED}: it did not answer within {self.unmap_timeout:g}s"
                effects.extend(self.farewell(entry.id, reason))
                effects.append(Disconnect(entry.id, reason, unresponsive=True))
                silent = f"after not answering for {format_duration(waited)}"
                if self.evict_kill:
                    silent += " and killed (--evict-kill)"
                effects.extend(self.mapper_gone(entry.id, "unresponsive", evicted=silent))
        return effects

    def _upgrade(self, entry: MapperEntry) -> list[Effect]:
        """Replay every mapping the mapper lacks; it becomes eager once all of them are mapped."""
        if entry.eager or entry.upgrading:
            return [
                self._to_mapper(entry, m.EagerResult(entry.eager, "already eager or upgrading"))
            ]
        entry.upgrading = True
        op = self.start_op(f"upgrade mapper {entry.id}", None)
        # a batch now, the rest on later steps: the replay of 10,000 mappings held the loop
        # for about 140 ms in one turn (its EagerResult follows the last batch's acks)
        effects = self.steps.begin(Replay(entry.id, op))

        def done(op: Operation) -> list[Effect]:
            entry.upgrading = False
            if entry.id not in self.mappers:
                return []
            if op.failures:
                return [self._to_mapper(entry, m.EagerResult(False, "; ".join(op.failures)[:1000]))]
            entry.eager = True
            log.info("mapper %d (%s) is eager", entry.id, entry.name)
            return [self._to_mapper(entry, m.EagerResult(True, ""))]

        op.on_done = done
        return effects + self._maybe_finish(op)

    def shutdown(self, reason: str, code: str = m.SHUTDOWN_STOPPING) -> list[Effect]:
        """Tell every mapper and every waiting control client that the manager is stopping
        (`code`: for good, or restarting on the same state)."""
        effects: list[Effect] = []
        for entry in self.mappers.values():
            if entry.stream is not None:
                effects.append(self._to_mapper(entry, self.shutdown_message(entry, reason, code)))
        for op in self.unfinished():
            if op.reply_to is not None:
                effects.append(
                    Send(
                        Channel.CONTROL,
                        op.reply_to,
                        m.Error("shutting-down", f"the manager is stopping: {reason}"),
                    )
                )
        for identity in self.awaited.drop():  # changes that waited for mappers to come back
            effects.append(
                Send(
                    Channel.CONTROL,
                    identity,
                    m.Error("shutting-down", f"the manager is stopping: {reason}"),
                )
            )
        self._pending.clear()
        self.steps.clear()
        return effects
