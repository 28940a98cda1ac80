"""Client for the manager's control channel (used by the CLI and by the Python API).

Each call sends one ControlRequest over a ZeroMQ REQ socket and waits, with a timeout, for the
ControlReply; refusals become `ControlError`, an absent manager `ManagerUnavailableError`. A
request names the daemon instance it is for (from the lock file), so only that daemon runs it;
if that daemon dies while the call waits, the call notices within a fraction of a second: a
read-only request (regions, mappers, stats) is asked once more of its successor, any other fails
saying it may or may not have been carried out.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from . import units
from .errors import LEFT_OVER, NO_SOCKET, ControlError, ManagerUnavailableError
from .protocol import messages as m
from .protocol.codec import MAX_REPLY_BYTES, decode, encode
from .protocol.errors import ProtocolError
from .protocol.messages import Channel
from .runtime import RuntimePaths

_U64_LIMIT = 1 << 64

#: Seconds to wait for operations that wait on every affected mapper.
LONG_TIMEOUT = 120.0
#: how often a waiting call checks that the daemon it asked is still there
LIVENESS_INTERVAL = 0.2
#: operations that change nothing: asked again of a restarted daemon
READ_ONLY_OPS = frozenset({"regions", "mappings", "mappers", "mapper_held", "stats", "status"})


class _Died(Exception):
    """The daemon a request was addressed to died (or was replaced) while the call waited."""


def _check_args(args: dict[str, Any]) -> None:
    """Refuse, as the manager would, arguments that are no request's: a region name outside the
    name rule (`bad-name`), an integer beyond 64 bits (msgpack cannot carry it) or a value of a
    type the protocol has not (`bad-request`)."""
    for key, value in args.items():
        if key in ("name", "after") and value is not None:
            try:
                units.check_name(value, "region name" if key == "name" else key)
            except ValueError as exc:
                raise ControlError("bad-name", str(exc)) from None
        elif type(value) is int and not -_U64_LIMIT < value < _U64_LIMIT:
            raise ControlError(
                "bad-request", f"argument {key!r} ({value:#x}) does not fit in 64 bits"
            )
        elif value is not None and type(value) not in (bool, int, str):
            raise ControlError(
                "bad-request",
                f"argument {key!r} must be an integer, a boolean or a string, "
                f"not {type(value).__name__}",
            )


def where_to_look(op: str) -> str:
    """Where a change `op` whose answer did not come can be seen going on ("" if nowhere)."""
    return "`membacking regions` shows where it stands" if "region" in op or "range" in op else ""


def _goes_on(op: str) -> str:
    """What may still happen to a change whose answer did not come, and where to look."""
    where = where_to_look(op)
    return f"may still be under way there{f' ({where})' if where else ''}"


class ControlClient:
    """Talks to the manager serving `runtime_dir` (default: see `membacking.runtime`)."""

    #: the operation of the last request sent whose answer was not read (an interrupted
    #: command says that the manager goes on with it)
    unanswered: str | None = None

    def __init__(
        self,
        runtime_dir: str | os.PathLike[str] | None = None,
        timeout: float = 10.0,
        long_timeout: float = LONG_TIMEOUT,
    ) -> None:
        self.paths = RuntimePaths.resolve(runtime_dir)
        self.timeout = timeout
        #: seconds to wait for changes that wait on every affected mapper
        self.long_timeout = long_timeout
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._local = threading.local()
        #: called with (op, reason) when a change was made but could not be journaled (its
        #: answer's `not_journaled`): a crash of the manager before it can would lose it
        self.on_unjournaled: Callable[[str, str], None] | None = None

    def _socket(self, wait: float) -> zmq.Socket[bytes]:
        """This thread's REQ socket to the manager (kept between calls: connecting costs more
        than a round trip)."""
        sock: zmq.Socket[bytes] | None = getattr(self._local, "sock", None)
        if sock is None:
            sock = self._ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.paths.control_endpoint)
            self._local.sock = sock
        sock.setsockopt(zmq.RCVTIMEO, int(wait * 1000))
        sock.setsockopt(zmq.SNDTIMEO, int(wait * 1000))
        return sock

    def _drop_socket(self) -> None:
        sock = getattr(self._local, "sock", None)
        if sock is not None:
            sock.close()
            self._local.sock = None

    def close(self) -> None:
        """Close this thread's socket (others close when their threads' sockets are collected)."""
        self._drop_socket()

    def _no_manager(self, detail: str) -> ManagerUnavailableError:
        self._drop_socket()
        return ManagerUnavailableError(
            f"no membacking manager at {self.paths.root} ({detail}; is `membacking manager run` "
            "running there?)"
        )

    def instance(self) -> str | None:
        """The instance of the daemon holding the runtime directory, from its lock file (None
        if it cannot be read)."""
        try:
            with open(self.paths.lock, "rb") as lock:
                words = lock.read(64).split()
        except OSError:
            return None
        return words[1].decode(errors="replace") if len(words) >= 2 else None

    def _gone(self, instance: str | None) -> bool:
        """Whether the daemon `instance` is gone: none holds the lock, or another does."""
        if self.paths.manager_running() is False:
            return True
        return instance is not None and self.instance() not in (instance, None)

    def call(self, op: str, timeout: float | None = None, **args: Any) -> Any:
        """Run operation `op` and return its result. Arguments the manager would refuse by
        their form (a bad region name, an integer beyond 64 bits, a float) are refused here
        with the same `ControlError` codes, before anything is sent."""
        _check_args(args)
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        try:
            result = self._call(op, wait, args)
        except _Died as exc:
            if op not in READ_ONLY_OPS:
                raise ManagerUnavailableError(str(exc)) from None
            died = str(exc)
        else:
            if isinstance(result, dict) and "not_journaled" in result and self.on_unjournaled:
                self.on_unjournaled(op, result["not_journaled"])
            return result
        # read-only: ask its successor, once, if one takes the directory within the timeout
        while not (self._socket_there() and self.paths.manager_running()):
            if time.monotonic() >= deadline:
                raise ManagerUnavailableError(f"{died}; no manager took its place in {wait:g}s")
            time.sleep(0.1)
        try:
            return self._call(op, max(0.1, deadline - time.monotonic()), args)
        except _Died as exc:
            raise ManagerUnavailableError(str(exc)) from None

    def _denied(self, path: Path) -> ManagerUnavailableError:
        """The control socket (or its directory) is not this user's to use."""
        try:
            owner = f"uid {path.stat().st_uid}"
        except OSError:
            owner = "its owner"
        return ManagerUnavailableError(
            f"permission denied: {path} (uid {os.getuid()}): control commands are for the user "
            f"the manager runs as ({owner}) and root; --allow-uid lets other users map guest "
            "memory (fd.sock, mapper.ipc), not control the manager"
        )

    def _socket_there(self) -> bool:
        """Whether the control socket exists; ManagerUnavailableError if this user may not
        reach it (a private runtime directory, or a control socket of another user: a connect
        would then wait for the whole timeout)."""
        sock = self.paths.control_socket
        try:
            there = sock.exists()
        except PermissionError:
            raise self._denied(self.paths.root) from None
        if there and not os.access(sock, os.R_OK | os.W_OK, effective_ids=True):
            raise self._denied(sock)
        return there

    def _call(self, op: str, timeout: float | None, args: dict[str, Any]) -> Any:
        if not self._socket_there():
            raise self._no_manager(NO_SOCKET)
        if getattr(self._local, "sock", None) is None and self.paths.manager_running() is False:
            raise self._no_manager(LEFT_OVER)
        wait = self.timeout if timeout is None else timeout
        instance = self.instance()
        sock = self._socket(wait)
        request = dict(args, instance=instance) if instance is not None else args
        try:
            sock.send(encode(m.ControlRequest(op, request)))
            ControlClient.unanswered = op  # (left set only by an interruption: KeyboardInterrupt)
            data = self._receive(sock, wait, instance)
            ControlClient.unanswered = None
        except zmq.Again:
            ControlClient.unanswered = None
            if self.paths.manager_running() is False:
                raise self._no_manager("it stopped while this request waited") from None
            self._drop_socket()  # a REQ socket that missed its reply cannot be reused
            going = "" if op in READ_ONLY_OPS else f"; the {op} it was sent {_goes_on(op)}"
            raise ManagerUnavailableError(
                f"the manager at {self.paths.root} did not answer within {wait:g}s{going}"
            ) from None
        except zmq.ZMQError as exc:
            ControlClient.unanswered = None
            self._drop_socket()
            raise ManagerUnavailableError(f"cannot reach the manager: {exc}") from None
        try:
            reply = decode(data, Channel.CONTROL, max_bytes=MAX_REPLY_BYTES, sender="manager")
        except ProtocolError as exc:
            raise ControlError("bad-reply", f"the manager sent an invalid reply: {exc}") from None
        if isinstance(reply, m.Error) and reply.code == "wrong-instance":
            raise _Died(f"the manager at {self.paths.root} was replaced: {reply.message}")
        if isinstance(reply, m.Error):
            raise ControlError(reply.code, reply.message)
        if not isinstance(reply, m.ControlReply):
            raise ControlError("bad-reply", f"unexpected {type(reply).__name__} from the manager")
        return reply.result

    def _receive(self, sock: zmq.Socket[bytes], wait: float, instance: str | None) -> bytes:
        """The reply, checking every LIVENESS_INTERVAL that the daemon asked is still there."""
        deadline = time.monotonic() + wait
        while not sock.poll(
            int(min(LIVENESS_INTERVAL, max(0.0, deadline - time.monotonic())) * 1000)
        ):
            if time.monotonic() >= deadline:
                raise zmq.Again()
            if self._gone(instance):
                self._drop_socket()  # and the request with it: no other daemon may get it
                raise _Died(
                    f"the manager at {self.paths.root} died while this request waited; it may "
                    "or may not have been carried out (look, then ask again)"
                )
        return sock.recv()

    def regions(self) -> list[dict[str, Any]]:
        """Every region, by guest address (unplaced ones last), each with all its `mappings`.
        The manager lists them a page at a time (and the pieces of a region with many a page
        at a time), so a listing is not one snapshot when regions change meanwhile."""
        out: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            args: dict[str, Any] = {} if after is None else {"after": after}
            page = self._page("regions", args)
            if not page:
                break
            for region in page:
                if region.get("pieces", 0) > len(region["mappings"]):
                    region["mappings"] = self._all_mappings(region["name"])
            out.extend(page)
            after = page[-1]["name"]
        out.sort(key=lambda r: (r["gpa"] is None, r["gpa"] or 0, -r["priority"]))
        return out

    def _page(self, op: str, args: dict[str, Any]) -> list[dict[str, Any]]:
        """One page of a listing; none after the first from a manager of an earlier release,
        which lists everything at once and knows no page arguments."""
        try:
            page: list[dict[str, Any]] = self.call(op, **args)
        except ControlError as exc:
            if args and exc.code == "bad-request" and "unknown argument" in str(exc):
                return []
            raise
        return page

    def _all_mappings(self, name: str) -> list[dict[str, Any]]:
        return self._gather(
            "mappings", "mappings", {"name": name}, "offset", lambda p: p["offset"] + p["size"]
        )

    def _gather(
        self,
        op: str,
        key: str,
        args: dict[str, Any],
        cursor: str,
        after: Callable[[Any], int],
    ) -> list[Any]:
        """Every item of a paged listing `op` (its items under `key`), page after page: the
        next page starts at `cursor` = after(the last item). Empty if what it lists was removed
        meanwhile (`not-found`)."""
        items: list[Any] = []
        position = 0
        while True:
            try:
                page = self.call(op, **args, **{cursor: position})[key]
            except ControlError as exc:
                if exc.code == "not-found":  # removed meanwhile
                    return items
                raise
            if not page:
                return items
            items.extend(page)
            position = after(page[-1])

    def mappers(self) -> list[dict[str, Any]]:
        """Every mapper, by id, each with all its `held` ranges (gathered a page at a time)."""
        out: list[dict[str, Any]] = []
        after = 0
        while True:
            page = self._page("mappers", {"after_id": after} if after else {})
            if not page:
                return out
            for mapper in page:
                if mapper.get("ranges", 0) > len(mapper["held"]):
                    mapper["held"] = self._all_held(mapper["id"])
            out.extend(page)
            after = page[-1]["id"]

    def _all_held(self, mapper_id: int) -> list[list[int]]:
        return self._gather("mapper_held", "held", {"id": mapper_id}, "gpa", lambda r: r[0] + r[1])

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("stats")
        return result

    def status(self) -> dict[str, Any]:
        """pid, version, uptime, region and mapper counts, process resources, health."""
        result: dict[str, Any] = self.call("status")
        return result

    def stop(self, keep_state: bool | None = None) -> dict[str, Any]:
        """Ask the manager to shut down as on SIGTERM; returns once it has agreed to.
        `keep_state` keeps (True) or ends (False) its state whatever `--keep-state` said."""
        args = {} if keep_state is None else {"keep_state": keep_state}
        result: dict[str, Any] = self.call("stop", **args)
        return result

    def evict_mapper(self, mapper_id: int) -> dict[str, Any]:
        """Cut mapper `mapper_id` off (it is told why); returns its id, name and pid."""
        result: dict[str, Any] = self.call("evict_mapper", id=mapper_id)
        return result

    def add_region(
        self,
        name: str,
        gpa: int | None,
        size: int,
        readonly: bool = False,
        *,
        priority: int = 0,
        disabled: bool = False,
        file: str | os.PathLike[str] | None = None,
        hugetlb: bool = False,
        private: bool = False,
    ) -> dict[str, Any]:
        """Add a region (memfd-backed unless `file`, `hugetlb` or `private` says otherwise);
        returns once every eager mapper has mapped it."""
        args: dict[str, Any] = {"name": name, "size": size, "readonly": readonly}
        if gpa is not None:
            args["gpa"] = gpa
        if priority:
            args["priority"] = priority
        if disabled:
            args["disabled"] = True
        if file is not None:
            args["file"] = os.fspath(os.path.abspath(file))
        if hugetlb:
            args["hugetlb"] = True
        if private:
            args["private"] = True
        result: dict[str, Any] = self.call("add_region", timeout=self.long_timeout, **args)
        return result

    def remove_region(self, name: str) -> dict[str, Any]:
        """Remove a region; returns after every mapper holding it acknowledged the unmap."""
        result: dict[str, Any] = self.call("remove_region", timeout=self.long_timeout, name=name)
        return result

    def enable_region(self, name: str, gpa: int | None = None) -> dict[str, Any]:
        """Enable a region (at `gpa`, if given): it hides lower-priority regions beneath it."""
        args: dict[str, Any] = {"name": name}
        if gpa is not None:
            args["gpa"] = gpa
        result: dict[str, Any] = self.call("enable_region", timeout=self.long_timeout, **args)
        return result

    def disable_region(self, name: str) -> dict[str, Any]:
        """Disable a region: the best region beneath it becomes visible again."""
        result: dict[str, Any] = self.call("disable_region", timeout=self.long_timeout, name=name)
        return result

    def move_region(self, name: str, gpa: int) -> dict[str, Any]:
        """Move a region to another guest address (contents are kept)."""
        result: dict[str, Any] = self.call(
            "move_region", timeout=self.long_timeout, name=name, gpa=gpa
        )
        return result

    def map_range(
        self,
        name: str,
        offset: int,
        size: int,
        *,
        file: str | os.PathLike[str] | None = None,
        file_offset: int = 0,
        readonly: bool = False,
    ) -> dict[str, Any]:
        """Back [offset, offset+size) of a region with new memory (or `file`), replacing what
        was there atomically for readers."""
        args: dict[str, Any] = {"name": name, "offset": offset, "size": size}
        if file is not None:
            args["file"] = os.fspath(os.path.abspath(file))
            args["file_offset"] = file_offset
        if readonly:
            args["readonly"] = True
        result: dict[str, Any] = self.call("map_range", timeout=self.long_timeout, **args)
        return result

    def unmap_range(self, name: str, offset: int, size: int) -> dict[str, Any]:
        """Remove [offset, offset+size) of a region's backing (splitting what straddles it).
        The region map answered has `unmapped_bytes`: how much of the range had a backing (0:
        it was a hole already, and nothing changed)."""
        result: dict[str, Any] = self.call(
            "unmap_range", timeout=self.long_timeout, name=name, offset=offset, size=size
        )
        return result
