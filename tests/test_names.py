"""The one rule for region and mapper names (units.check_name), enforced by the manager on every
control request naming a region, by the codec on name fields, by the CLI and by ControlClient;
and ControlClient's refusal of integers msgpack cannot carry."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq

from membacking import ControlClient, ControlError, units
from membacking.protocol import messages as m
from membacking.protocol.codec import decode, encode
from membacking.protocol.errors import ProtocolError
from membacking.protocol.fdpass import recv_message
from membacking.runtime import RuntimePaths

from conftest import RunningManager, short_tmpdir

#: every kind of bad name the control API used to take (or to fail on with a misleading code)
BAD_NAMES = [
    "",
    "a\nb",
    "ram0\n",  # a trailing newline: `$` in a regular expression matches before it
    "a\tb",
    "a b",
    "\x1b[31mred\x1b[0m",  # an ANSI escape: `membacking regions` printed it raw
    "../..",
    "-rf",
    "x" * 1024,  # the memfd name limit made this `no-memory`, its error text `bad-reply`
    "x" * 65,
    "a\x00b",  # NUL: `internal`
    "é",
    "a/b",
]
GOOD_NAMES = ["a", "ram0", "rom.bin", "pci:00.0", "bar_0-lo", "x" * 64, "0", ".", "..", "a-"]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_the_rule_accepts(name: str) -> None:
    assert units.check_name(name) == name


@pytest.mark.parametrize("name", [*BAD_NAMES, None, 7, b"ram0"])
def test_the_rule_refuses(name: object) -> None:
    with pytest.raises(ValueError, match="invalid name") as info:
        units.check_name(name)
    assert "\x1b" not in str(info.value) and "\n" not in str(info.value)  # shown escaped
    assert len(str(info.value)) < 200


@pytest.mark.parametrize("name", BAD_NAMES)
def test_the_codec_refuses_bad_name_fields(name: str) -> None:
    """A Hello naming a mapper (and any other name field) is checked by the same rule."""
    data = msgpack.packb([m.PROTOCOL_VERSION, m.Hello.TYPE, name])
    with pytest.raises(ProtocolError, match=r"invalid field 'Hello\.name'") as info:
        decode(data, m.Channel.FD)
    assert info.value.reason == "bad-field"
    assert decode(encode(m.Hello("mapper-1.a:b")), m.Channel.FD) == m.Hello("mapper-1.a:b")


def _requests(name: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every control operation that names a region, naming it `name`."""
    yield "add_region", {"name": name, "gpa": 0x10000000, "size": 4096}
    yield "remove_region", {"name": name}
    yield "enable_region", {"name": name}
    yield "disable_region", {"name": name}
    yield "move_region", {"name": name, "gpa": 0x20000000}
    yield "map_range", {"name": name, "offset": 0, "size": 4096}
    yield "unmap_range", {"name": name, "offset": 0, "size": 4096}
    yield "mappings", {"name": name}
    yield "regions", {"after": name}


def test_the_manager_refuses_bad_names_on_every_operation(manager: RunningManager) -> None:
    """Sent as they are (not through ControlClient, which refuses them itself): each is
    answered `bad-name`, nothing is created, and the manager keeps serving."""
    ctx = zmq.Context()
    try:
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.setsockopt(zmq.RCVTIMEO, 5000)
        req.connect(f"ipc://{manager.runtime_dir / 'control.ipc'}")
        for name in BAD_NAMES:
            for op, args in _requests(name):
                req.send(encode(m.ControlRequest(op, args)))
                reply = decode(req.recv(), m.Channel.CONTROL, max_bytes=1 << 20)
                assert isinstance(reply, m.Error), (op, name, reply)
                assert reply.code == "bad-name", (op, name, reply)
                assert "invalid" in reply.message and "\x1b" not in reply.message
        req.close()
    finally:
        ctx.term()
    client = manager.client()
    assert [r["name"] for r in client.regions()] == ["ram0", "rom"]
    assert client.stats()["regions"] == 2


def test_the_manager_refuses_a_hello_with_a_bad_name(manager: RunningManager) -> None:
    paths = RuntimePaths.resolve(manager.runtime_dir)
    for name in ("a b", "\x1b[2J", "-x"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.settimeout(5)
            sock.connect(str(paths.fd_socket))
            sock.send(msgpack.packb([m.PROTOCOL_VERSION, m.Hello.TYPE, name]))
            reply, fds = recv_message(sock)
            assert isinstance(reply, m.Error) and reply.code == "bad-field" and not fds, reply
    assert manager.client().mappers() == []


def test_control_client_refuses_bad_names_and_integers_it_cannot_send() -> None:
    """Refused before anything is sent (no manager is needed) with the codes the manager uses:
    an add with a GPA of 2**64 raised OverflowError from msgpack."""
    client = ControlClient(short_tmpdir())
    calls = [
        lambda: client.add_region("a", 1 << 64, 4096),
        lambda: client.add_region("a", 0, 1 << 64),
        lambda: client.add_region("a", 0, 4096, priority=1 << 70),
        lambda: client.enable_region("a", 1 << 64),
        lambda: client.move_region("a", 1 << 64),
        lambda: client.map_range("a", 1 << 64, 4096),
        lambda: client.map_range("a", 0, 4096, file="/x", file_offset=1 << 64),
        lambda: client.unmap_range("a", 0, 1 << 64),
        lambda: client.unmap_range("a", -(1 << 64), 4096),
    ]
    for call in calls:
        with pytest.raises(ControlError, match="does not fit in 64 bits") as info:
            call()
        assert info.value.code == "bad-request"
    with pytest.raises(ControlError, match="must be an integer") as info:
        client.add_region("a", 0.5, 4096)  # type: ignore[arg-type]
    assert info.value.code == "bad-request"
    for name in BAD_NAMES:
        for call in (
            lambda n=name: client.add_region(n, 0, 4096),
            lambda n=name: client.remove_region(n),
            lambda n=name: client.unmap_range(n, 0, 4096),
        ):
            with pytest.raises(ControlError, match="invalid region name") as info:
                call()
            assert info.value.code == "bad-name"


def test_the_cli_refuses_bad_names_in_one_line(manager: RunningManager) -> None:
    commands = [
        ("region", "add", "--", "{}", "0x10000000", "4K"),
        ("region", "remove", "--", "{}"),
        ("region", "move", "--", "{}", "0x10000000"),
        ("region", "unmap", "--", "{}", "0", "4K"),
    ]
    cases = [(c, n) for c in commands[:1] for n in BAD_NAMES if "\x00" not in n]
    cases += [(c, "a\nb") for c in commands[1:]] + [(commands[3], "-rf")]
    for command, name in cases:
        args = [name if a == "{}" else a for a in command]
        result = manager.cli(*args)
        err = result.stderr
        assert result.returncode == 2, (args, err)  # a usage mistake
        assert "Traceback" not in err and "invalid region name" in err, (args, err)
        assert len(err.strip().splitlines()) == 1 and "\x1b" not in err, (args, err)
    assert manager.client().stats()["regions"] == 2
