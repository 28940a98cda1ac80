"""Operator mistakes in command-line arguments: a negative number typed for a numeric argument
is refused as negative (not taken for an unknown option) while unknown options keep click's
error, and a runtime directory too long for a socket path is named with the limit; status 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click

from membacking.cli import cli
from membacking.cli.common import NumericArgs, Whole, _Size

from conftest import RunningManager, Worker, cli_env, run_cli


def usage_error(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    """Status 2, the fragment in stderr, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert fragment in result.stderr, result.stderr


def test_negative_numbers_as_arguments_are_refused_as_negative(manager: RunningManager) -> None:
    before = manager.client().regions()
    for args, message in (
        (("mem", "read", "-1", "4"), "'GPA': address '-1' must not be negative"),
        (("mem", "read", "0", "-0x10"), "'LENGTH': size '-0x10' must not be negative"),
        (("mem", "dump", "-0x10", "4"), "'GPA': address '-0x10' must not be negative"),
        (("mem", "fill", "0", "16", "-1"), "'BYTE': byte '-1' must not be negative"),
        (("mem", "write", "-1", "--hex", "00"), "'GPA': address '-1' must not be negative"),
        (("region", "add", "x", "-4096", "4K"), "'GPA': address '-4096' must not be negative"),
        (("region", "add", "x", "0", "-4K"), "'SIZE': size '-4K' must not be negative"),
        (("region", "move", "ram0", "-4096"), "'GPA': address '-4096' must not be negative"),
        (("region", "enable", "ram0", "-4096"), "'[GPA]': address '-4096' must not be negative"),
        (("region", "map", "ram0", "-4096", "4K"), "'OFFSET': offset '-4096' must not be"),
        (("region", "unmap", "ram0", "0", "-4K"), "'SIZE': size '-4K' must not be negative"),
        (("mapper", "evict", "-1"), "'ID': mapper id must be a whole number of at least 1"),
        # an option's value was taken as given already: it says the same
        (("mem", "find", "--start", "-1", "abc"), "'--start': address '-1' must not be"),
    ):
        result = manager.cli(*args)
        usage_error(result, f"Error: Invalid value for {message}")
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert manager.client().regions() == before  # nothing reached the daemon


def test_unknown_options_keep_clicks_error(manager: RunningManager) -> None:
    for args in (
        ("mem", "read", "0", "4", "--bogus"),
        ("mem", "read", "--bogus", "-1", "4"),  # the first mistake is the unknown option
        ("region", "add", "-x", "0", "4K"),
    ):
        result = manager.cli(*args)
        usage_error(result, "No such option")
        assert "Usage: membacking" in result.stderr  # click's usage line, as for any such
    # a negative number where no argument is left is an extra argument, as click says
    usage_error(manager.cli("mem", "read", "0", "4", "-1"), "unexpected extra argument (-1)")
    # options still go anywhere among the arguments
    read = manager.cli("mem", "read", "0", "--format", "hex", "4")
    assert (read.returncode, read.stdout.strip()) == (0, "00000000"), read.stderr


def _commands(group: click.Group, path: str = "") -> list[tuple[str, click.Command]]:
    found: list[tuple[str, click.Command]] = []
    ctx = click.Context(group)  # the group's listing: its commands load when asked for
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None, name
        if isinstance(command, click.Group):
            found += _commands(command, f"{path}{name} ")
        else:
            found.append((f"{path}{name}", command))
    return found


def test_every_command_with_a_numeric_argument_takes_negative_numbers_as_values() -> None:
    numeric = [
        name
        for name, command in _commands(cli)
        if any(
            isinstance(p, click.Argument) and isinstance(p.type, (_Size, Whole))
            for p in command.params
        )
    ]
    assert {"mem read", "mem fill", "region add", "region enable", "mapper evict"} <= set(numeric)
    commands = dict(_commands(cli))
    assert [name for name in numeric if not isinstance(commands[name], NumericArgs)] == []


def test_a_runtime_directory_too_long_for_a_socket_is_a_usage_mistake(tmp_path: Path) -> None:
    too_long = tmp_path / ("x" * 120)  # its sockets' paths are over 107 bytes
    config = tmp_path / "c.toml"
    config.write_text(f"runtime_dir = {str(too_long)!r}\n")
    limit = "over the limit of 107 bytes for a Unix socket path; choose a shorter directory"
    commands = (("regions",), ("mem", "read", "0", "4"), ("mapper", "attach"), ("manager", "run"))
    for command in commands:
        for given, named in (
            (("--runtime-dir", str(too_long)), f"--runtime-dir {too_long} is too long"),
            (("--config", str(config)), f"runtime_dir {too_long} in {config} is too long"),
        ):
            result = run_cli(*command, *given)
            usage_error(result, f"Error: {named}: its socket control.ipc would have a path of ")
            assert limit in result.stderr and len(result.stderr.strip().splitlines()) == 1
        result = run_cli(*command, runtime_dir=too_long)  # $MEMBACKING_RUNTIME_DIR
        usage_error(result, f"Error: $MEMBACKING_RUNTIME_DIR {too_long} is too long")
    assert not too_long.exists()  # manager run made nothing


def test_an_interrupted_change_says_the_manager_goes_on_with_it(
    manager: RunningManager, spawn_worker: Callable[..., Worker]
) -> None:
    """Ctrl-C on a `region remove` that waits for a stopped holder: the command says the
    removal goes on in the manager (it printed only "Aborted.")."""
    manager.client().add_region("held", 0x40000000, 1 << 20)
    worker = spawn_worker(manager, "stopped")
    worker.ask("read 0x40000000 1")
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "membacking", "region", "remove", "held"],
            env=cli_env(manager.runtime_dir),
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 30
        while {r["name"]: r["state"] for r in manager.client().regions()}["held"] != "removing":
            assert time.monotonic() < deadline, "the removal never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    assert proc.returncode == 130, err
    assert "the manager goes on with the remove_region already sent" in err, err
    assert "Traceback" not in err
