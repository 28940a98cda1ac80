"""The control channel's operations: argument checking and the calls into `ManagerState`.

Each operation returns the effects to carry out; those that change mappings reply only once every
affected mapper has answered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..protocol import messages as m
from ..protocol.messages import PRIVATE_MAPPABLE, Channel
from .errors import Refused
from .state import Effect, ManagerState, Send, region_info

_NOTHING: dict[str, type] = {}


def expect_args(
    args: dict[str, Any], required: dict[str, type], optional: dict[str, type] | None = None
) -> None:
    """Refuse missing, unknown or mistyped arguments with a bad-request error."""
    optional = optional or {}
    for key, kind in {**required, **optional}.items():
        if key in args and args[key] is not None and type(args[key]) is not kind:
            raise Refused("bad-request", f"argument {key!r} must be of type {kind.__name__}")
    missing = [k for k in required if args.get(k) is None]
    if missing:
        raise Refused("bad-request", f"missing argument(s): {', '.join(missing)}")
    extra = [k for k in args if k not in required and k not in optional]
    if extra:
        raise Refused("bad-request", f"unknown argument(s): {', '.join(extra)}")


def _reply(identity: bytes, result: Any) -> list[Effect]:
    return [Send(Channel.CONTROL, identity, m.ControlReply(result))]


def _regions(state: ManagerState, identity: bytes, args: dict[str, Any]) -> list[Effect]:
    expect_args(args, _NOTHING)
    regions = sorted(state.regions.values(), key=lambda r: (r.gpa is None, r.gpa or 0, -r.priority))
    return _reply(identity, [region_info(state, r) for r in regions])


def _mappers(state: ManagerState, identity: bytes, args: dict[str, Any]) -> list[Effect]:
    expect_args(args, _NOTHING)
    out = []
    for e in sorted(state.mappers.values(), key=lambda e: e.id):
        held = sorted(e.held)
        out.append(
            {
                "id": e.id,
                "name": e.name,
                "pid": e.pid,
                "mode": "private" if e.held.maps(PRIVATE_MAPPABLE) else e.mode,
                "ranges": len(held),
                "bytes": sum(r.len for r in held),
                "held": [[r.start, r.len] for r in held],
                "fds": len(e.fds_sent),
                "connected_at": e.connected_at,
                "last_seen": e.last_seen,
            }
        )
    return _reply(identity, out)


def _stats(state: ManagerState, identity: bytes, args: dict[str, Any]) -> list[Effect]:
    expect_args(args, _NOTHING)
    return _reply(identity, state.stats())


def _add_region(state: ManagerState, identity: bytes, args: dict[str, Any]) -> list[Effect]:
    expect_args(
        args,
        {"name": str, "size": int},
        {
            "gpa": int,
            "readonly": bool,
            "priority": int,
            "disabled": bool,
            "file": str,
            "hugetlb": bool,
            "private": bool,
        },
    )
    _absolute_file(args)
    kinds = [k for k in ("file", "hugetlb", "private") if args.get(k)]
    if len(kinds) > 1:
        raise Refused("bad-request", f"choose one backing, not {' and '.join(kinds)}")
    backing = kinds[0] if kinds else "memfd"
    return state.add_region(
        args["name"],
        args.get("gpa"),
        args["size"],
        not args.get("readonly", False),
        priority=args.get("priority") or 0,
        enabled=not args.get("disabled", False),
        backing=backing,
        path=args.get("file"),
        reply_to=identity,
    )


def _absolute_file(args: dict[str, Any]) -> None:
    path = args.get("file")
    if path and not path.startswith("/"):
        raise Refused(
            "bad-request",
            f"file {path!r} must be an absolute path (the manager's working directory is not "
            "the client's)",
        )


def _remove_region(state: ManagerState, identity: bytes, args: dict[str, Any]) -> list[Effect]:
    expect_args(args, {"name": str})
    return state.remove_region(args["name"], identity)


def _enable_region(state: ManagerState, identity: bytes, args: dict[str, Any]) -> list[Effect]:
    expect_args(args, {"name": str}, {"gpa": int})
    return state.set_enabled(args["name"], True, args.get("gpa"), identity)


def _disable_region(state: ManagerState, identity: bytes, args: dict[str, Any]) -> list[Effect]:
    expect_args(args, {"name": str})
    return state.set_enabled(args["name"], False, None, identity)


def _move_region(state: ManagerState, identity: bytes, args: dict[str, Any]) -> list[Effect]:
    expect_args(args, {"name": str, "gpa": int})
    return state.move_region(args["name"], args["gpa"], identity)


def _map_range(state: ManagerState, identity: bytes, args: dict[str, Any]) -> list[Effect]:
    expect_args(
        args,
        {"name": str, "offset": int, "size": int},
        {"file": str, "file_offset": int, "readonly": bool},
    )
    _absolute_file(args)
    if args.get("file_offset") and not args.get("file"):
        raise Refused("bad-request", "file_offset needs a file")
    backing = "file" if args.get("file") else "memfd"
    return state.change_mappings(
        args["name"],
        args["offset"],
        args["size"],
        identity,
        replace=(
            backing,
            args.get("file"),
            args.get("file_offset") or 0,
            not args.get("readonly", False),
        ),
    )


def _unmap_range(state: ManagerState, identity: bytes, args: dict[str, Any]) -> list[Effect]:
    expect_args(args, {"name": str, "offset": int, "size": int})
    return state.change_mappings(args["name"], args["offset"], args["size"], identity)


OPS: dict[str, Callable[[ManagerState, bytes, dict[str, Any]], list[Effect]]] = {
    "regions": _regions,
    "mappers": _mappers,
    "stats": _stats,
    "add_region": _add_region,
    "remove_region": _remove_region,
    "enable_region": _enable_region,
    "disable_region": _disable_region,
    "move_region": _move_region,
    "map_range": _map_range,
    "unmap_range": _unmap_range,
}


#: the argument a client addresses a request with: the daemon instance of the lock file
INSTANCE_ARG = "instance"


def addressed_elsewhere(args: dict[str, Any], instance: str) -> m.Error | None:
    """A request addressed to another daemon instance (one that died, whose successor took
    the runtime directory) is refused, never executed: the client decides what to do. The
    argument is taken out of `args` otherwise."""
    wanted = args.pop(INSTANCE_ARG, None)
    if wanted is None or wanted == instance:
        return None
    return m.Error(
        "wrong-instance",
        f"this request was addressed to manager instance {wanted!r}, which is gone; this is "
        f"instance {instance!r}: nothing was done",
    )


def run_control(
    state: ManagerState, identity: bytes, op: str, args: dict[str, Any]
) -> list[Effect]:
    handler = OPS.get(op)
    if handler is None:
        raise Refused("bad-request", f"unknown operation {op!r}")
    return handler(state, identity, args)
