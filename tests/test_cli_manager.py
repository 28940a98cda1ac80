"""The CLI against a real daemon: manager lifecycle, inspection and region commands, and their
error paths (one line on stderr, exit status 1, no traceback)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from membacking.manager.rundir import RuntimeDirLock
from membacking.runtime import RuntimePaths

from conftest import RunningManager, run_cli, short_tmpdir


def assert_clean_error(result: object, fragment: str, status: int = 1) -> None:
    """One line on stderr, no traceback, and the exit status: 1 for what the daemon or the
    system refuses, 2 for a usage mistake (click's convention)."""
    code = result.returncode
    err = result.stderr
    assert code == status, (code, err)
    assert "Traceback" not in err, err
    assert fragment in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_ready_line_and_clean_shutdown(manager: RunningManager) -> None:
    assert f"runtime-dir={manager.runtime_dir}" in manager.ready_line
    assert "regions=2" in manager.ready_line
    files = {p.name for p in manager.runtime_dir.iterdir()}
    assert files == {"manager.lock", "fd.sock", "mapper.ipc", "control.ipc", "state-dir"}
    assert manager.runtime_dir.stat().st_mode & 0o777 == 0o700
    for name in ("fd.sock", "mapper.ipc", "control.ipc"):
        assert (manager.runtime_dir / name).stat().st_mode & 0o777 == 0o600
    assert manager.stop(signal.SIGINT) == 0
    assert list(manager.runtime_dir.iterdir()) == []
    assert "shutting down: received SIGINT" in manager.log()


def test_second_daemon_on_the_same_directory_is_refused(manager: RunningManager) -> None:
    result = run_cli("manager", "run", "--runtime-dir", str(manager.runtime_dir))
    assert_clean_error(result, f"another membacking manager (pid {manager.pid})")
    assert manager.proc.poll() is None
    assert manager.client().stats()["regions"] == 2


def test_restart_after_sigkill_handles_stale_files(
    start_manager: Callable[..., RunningManager],
) -> None:
    first = start_manager("--region", "ram0=0:1M")
    first.stop(signal.SIGKILL)
    assert (first.runtime_dir / "fd.sock").exists()  # left behind by the killed daemon
    # commands say so at once instead of waiting for an answer that cannot come
    for command in (("regions",), ("region", "remove", "ram0")):
        result = first.cli(*command, timeout=5)
        assert_clean_error(result, f"no membacking manager at {first.runtime_dir}")
        assert "left over from one that is no longer running" in result.stderr
    second = start_manager("--region", "ram0=0:1M", runtime_dir=first.runtime_dir)
    assert second.client().regions()[0]["name"] == "ram0"


def test_a_liveness_check_does_not_stop_a_daemon_from_starting() -> None:
    """A client asking whether a daemon is alive holds a shared lock for a moment: a daemon
    taking the directory right then waits for it instead of refusing."""
    paths = RuntimePaths.resolve(short_tmpdir())
    lock = os.open(paths.lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_SH)
    assert paths.manager_running() is False  # shared holders are not daemons
    threading.Timer(0.2, os.close, (lock,)).start()
    claim = RuntimeDirLock(paths)
    try:
        claim.acquire()
        assert paths.manager_running() is True
    finally:
        claim.release()
        shutil.rmtree(paths.root, ignore_errors=True)


def test_regions_table_and_json(manager: RunningManager) -> None:
    table = manager.cli("regions")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "NAME",
        "GPA",
        "END",
        "SIZE",
        "MODE",
        "PRIO",
        "BACKING",
        "HOLDERS",
        "STATE",
    ]
    assert lines[1].split() == [
        "ram0",
        "0x0",
        "0x4000000",
        "64",
        "MiB",
        "rw",
        "0",
        "shm",  # the memory is a file of the state directory
        "-",
        "active",
    ]
    assert lines[2].split() == [
        "rom",
        "0xfff00000",
        "0x100000000",
        "1",
        "MiB",
        "ro",
        "0",
        "shm",  # the memory is a file of the state directory
        "-",
        "active",
    ]
    data = json.loads(manager.cli("regions", "--json").stdout)
    assert [(r["name"], r["gpa"], r["size"], r["writable"]) for r in data] == [
        ("ram0", 0, 64 << 20, True),
        ("rom", 0xFFF00000, 1 << 20, False),
    ]
    # `backing` is the kind asked for (as --region and region add give it), `memory` where the
    # memory lives: a file of the state directory
    assert [(r["backing"], r["memory"]) for r in data] == [("memfd", "shm")] * 2


def test_stats_and_mappers(manager: RunningManager) -> None:
    stats = json.loads(manager.cli("stats", "--json").stdout)
    assert stats["regions"] == 2 and stats["region_bytes"] == 65 << 20
    assert stats["mappers"] == 0 and stats["rejected"] == {}
    text = manager.cli("stats").stdout
    assert "region_bytes" in text and "65 MiB" in text
    assert manager.cli("mappers").stdout.strip() == "no mappers"
    assert json.loads(manager.cli("mappers", "--json").stdout) == []


def test_region_add_and_remove(manager: RunningManager) -> None:
    added = manager.cli("region", "add", "dev0", "0x10000000", "2M", "--readonly")
    assert added.returncode == 0, added.stderr
    assert "added region dev0 at 0x10000000-0x10200000 (2 MiB, ro, shm, active)" in added.stdout
    names = [r["name"] for r in manager.client().regions()]
    assert names == ["ram0", "dev0", "rom"]
    removed = manager.cli("region", "remove", "dev0")
    assert removed.returncode == 0, removed.stderr
    assert "removed region dev0 (no mapper held it)" in removed.stdout
    assert [r["name"] for r in manager.client().regions()] == ["ram0", "rom"]


def test_region_errors_are_one_clean_line(manager: RunningManager) -> None:
    assert_clean_error(manager.cli("region", "add", "x", "0x1000", "64K"), "overlaps region 'ram0'")
    assert_clean_error(manager.cli("region", "add", "ram0", "0x10000000", "4K"), "already exists")
    assert_clean_error(manager.cli("region", "remove", "nope"), "region 'nope' does not exist")
    # value mistakes the command line checks itself are usage mistakes (status 2), and the
    # numbers are shown as typed (hex with the decimal beside)
    assert_clean_error(
        manager.cli("region", "add", "x", "0x10000100", "4K"),
        "address 0x10000100 (268435712) must be a multiple of 4096 (a page)",
        2,
    )
    assert_clean_error(
        manager.cli("region", "add", "dev2", "0x30000000", "0"),
        "size 0x0 must be a non-zero multiple of 4096",
        2,
    )
    assert_clean_error(
        manager.cli("region", "add", "dev2", "0x30000000", "5000"),
        "size 0x1388 (5000) must be a non-zero multiple of 4096 (a page)",
        2,
    )
    assert_clean_error(manager.cli("region", "move", "ram0", "0x30001"), "0x30001 (196609)", 2)
    assert_clean_error(manager.cli("region", "unmap", "ram0", "0", "5000"), "0x1388 (5000)", 2)
    # what only the daemon knows stays a refusal (status 1)
    assert_clean_error(manager.cli("region", "add", "x", "0x1000000000000", "4K"), "beyond the")
    backing = manager.runtime_dir.parent / f"{manager.runtime_dir.name}-file"
    backing.write_bytes(bytes(64 << 10))
    try:
        assert_clean_error(
            manager.cli(
                "region",
                "map",
                "ram0",
                "0",
                "4K",
                "--file",
                str(backing),
                "--file-offset",
                "0x1001",
            ),
            "file offset 0x1001 (4097) must be a multiple of 4096 (a page)",
            2,
        )
    finally:
        backing.unlink()
    usage = 2
    assert_clean_error(manager.cli("region", "add", "x", "0", "lots"), "invalid size 'lots'", usage)
    assert_clean_error(
        manager.cli("region", "add", "bad name", "0x10000000", "4K"), "invalid region name", usage
    )
    assert_clean_error(
        manager.cli("region", "add", "x", "0x10000000", "4K", "--priority", "300"), "300", usage
    )
    assert_clean_error(manager.cli("map", "--width", "15"), "15", usage)
    assert_clean_error(
        manager.cli("mem", "write", "0", "--file", "/nonexistent"), "/nonexistent", usage
    )
    assert_clean_error(
        run_cli("manager", "run", "--runtime-dir", "/tmp/unused", "--log-level", "trace"),
        "'trace' is not one of",
        usage,
    )
    assert_clean_error(
        manager.cli("region", "map", "ram0", "0", "4K", "--file", "/nonexistent/x"),
        "/nonexistent/x",
        1,  # a file the daemon cannot open is refused by it, not a usage mistake
    )


def test_commands_without_a_daemon_fail_cleanly() -> None:
    empty = short_tmpdir()
    try:
        for args in (
            ["regions"],
            ["mappers"],
            ["stats", "--json"],
            ["region", "add", "a", "0", "4K"],
            ["region", "remove", "a"],
            ["mem", "read", "0", "16"],
            ["mem", "write", "0", "--hex", "00"],
            ["mapper", "attach"],
        ):
            result = run_cli(*args, "--runtime-dir", str(empty))
            assert_clean_error(result, f"no membacking manager at {empty}")
        too_long = f"/tmp/{'x' * 120}"
        assert_clean_error(  # an operator's mistake in an argument: status 2 (test_cli_args)
            run_cli("mem", "read", "0", "4", "--runtime-dir", too_long), "too long", 2
        )
    finally:
        empty.rmdir()


def test_errors_name_the_address_the_user_asked_for(manager: RunningManager) -> None:
    """Not the start of its page: the first missing address of those asked for."""
    assert_clean_error(manager.cli("mem", "read", "0x5000010", "16"), "GPA 0x5000010")
    # a read that starts in ram0 (64 MiB) and runs past it: the first address it lacks
    assert_clean_error(manager.cli("mem", "read", "0x3fffff0", "32"), "GPA 0x4000000")


def test_address_space_must_be_one_a_mapper_can_reserve() -> None:
    runtime_dir = short_tmpdir()
    try:
        for value, reason in (
            ("0", "0 B is less than the 1 MiB minimum"),
            ("5K", "0x1400 (5120) is less than the 1 MiB minimum"),
            ("0x100001", "0x100001 (1048577) must be a multiple of 4096 (a page)"),
            ("128T", "128 TiB is more than the 64 TiB limit"),
            ("1000T", "1000 TiB is more than the 64 TiB limit"),
        ):
            result = run_cli(
                "manager", "run", "--runtime-dir", str(runtime_dir), "--address-space", value
            )
            assert_clean_error(result, f"address space {reason}", 2)
    finally:
        shutil.rmtree(runtime_dir)


def test_bad_region_spec_at_startup(tmp_path: Path) -> None:
    result = run_cli(
        "manager", "run", "--runtime-dir", str(short_tmpdir()), "--region", "ram0=0:64Q"
    )
    assert_clean_error(result, "invalid size '64Q'", 2)
    overlap = run_cli(
        "manager",
        "run",
        "--runtime-dir",
        str(short_tmpdir()),
        "--region",
        "a=0:2M",
        "--region",
        "b=1M:2M",
    )
    assert overlap.returncode == 1 and "Traceback" not in overlap.stderr
    assert overlap.stderr.strip().splitlines()[-1] == (
        "Error: cannot create the initial regions: 0x100000-0x300000 (priority 0) overlaps "
        "region 'a' (0x0-0x200000, priority 0): regions of equal priority may only overlap "
        "with identical ranges"
    )
    for twice in (("a=0:64M", "a=0x10000000:4K"), ("a=0:64M", "a=0:64M")):
        runtime = short_tmpdir() / "rt"
        args = [x for spec in twice for x in ("--region", spec)]
        doubled = run_cli("manager", "run", "--runtime-dir", str(runtime), "--fresh", *args)
        assert_clean_error(doubled, "region 'a' is given twice", 2)
        assert not runtime.exists()  # nothing was created: no state to speak of


def test_runtime_dir_from_environment(manager: RunningManager) -> None:
    result = run_cli("regions", "--json", runtime_dir=manager.runtime_dir)
    assert result.returncode == 0 and json.loads(result.stdout)[0]["name"] == "ram0"


def test_bad_numbers_say_what_is_expected() -> None:
    for args, words in (
        (("mapper", "evict", "abc"), "mapper id must be a whole number of at least 1, got 'abc'"),
        (("status", "--timeout", "abc"), "seconds must be a number of at least 0.1, got 'abc'"),
        (("status", "--timeout", "0"), "seconds must be a number of at least 0.1, got '0'"),
        (("map", "--width", "15"), "width must be a whole number from 16 to 400, got '15'"),
    ):
        assert_clean_error(run_cli(*args), words, 2)


def test_no_daemon_is_said_alike_by_every_command() -> None:
    runtime_dir = short_tmpdir()
    try:
        expected = (
            f"Error: no membacking manager at {runtime_dir} (no socket to connect to; is "
            "`membacking manager run` running there?)"
        )
        for args in (
            ("status",),
            ("regions",),
            ("mem", "read", "0", "1"),
            ("mapper", "attach"),
            ("watch", "--count", "1"),  # it never started watching: no "stopped watching"
        ):
            result = run_cli(*args, "--runtime-dir", str(runtime_dir))
            assert (result.returncode, result.stderr.strip()) == (1, expected), args
    finally:
        shutil.rmtree(runtime_dir, ignore_errors=True)


def test_timeout_help_gives_the_default_that_applies() -> None:
    for command in (("regions",), ("status",), ("stats",), ("map",), ("mappers",)):
        shown = " ".join(run_cli(*command, "--help").stdout.split())
        assert "[default: 10]" in shown and "120" not in shown, command
    shown = " ".join(run_cli("region", "remove", "--help").stdout.split())
    assert "[default: 120]" in shown


def test_a_fatal_startup_error_is_a_json_record_with_json_logs() -> None:
    runtime_dir = short_tmpdir()
    try:
        overlapping = ("--region", "a=0:1M", "--region", "b=0x80000:1M")
        args = ("manager", "run", "--runtime-dir", str(runtime_dir), *overlapping)
        result = run_cli(*args, "--log-format", "json", timeout=30)
        assert result.returncode == 1
        records = [json.loads(line) for line in result.stderr.splitlines()]  # every line JSON
        assert records[-1]["level"] == "error" and records[-1]["fatal"] is True
        assert records[-1]["msg"].startswith("cannot create the initial regions: ")
        plain = run_cli(*args, timeout=30)  # as text: the one-line error, the same status
        assert plain.returncode == 1
        assert plain.stderr.splitlines()[-1].startswith("Error: cannot create the initial")
    finally:
        shutil.rmtree(runtime_dir, ignore_errors=True)


def test_a_region_flag_is_checked_as_the_configuration_file_is(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[[regions]]\nname = 'a'\ngpa = 0\nsize = 5000\n")
    for args in (("--region", "a=0:5000"), ("--config", str(config))):
        result = run_cli("manager", "run", "--runtime-dir", str(tmp_path / "r"), *args)
        assert_clean_error(result, "size 0x1388 (5000) must be a non-zero multiple of 4096", 2)


def test_a_refused_start_claims_no_region_added(
    start_manager: Callable[..., RunningManager],
) -> None:
    """A start refused after some initial regions were made leaves none of them behind: its
    log says nothing was added (the lines come once a start succeeds)."""
    overlap = ("--region", "a=0:1M", "--region", "b=0x100000:1M", "--region", "c=0x80000:1M")
    with socket.socket() as busy:  # a metrics port in use refuses the start after the regions
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        for args in (overlap, ("--region", "a=0:1M", "--metrics-port", port)):
            runtime = short_tmpdir() / "rt"
            result = run_cli("manager", "run", "--runtime-dir", str(runtime), "--no-state", *args)
            assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
            assert " added (" not in result.stderr, result.stderr
            assert not runtime.exists()
    started = start_manager("--region", "a=0:1M", "--region", "b=0x100000:1M")
    log = started.log()
    assert "region a added (0x0-0x100000" in log and "region b added (0x100000-0x200000" in log
