"""What an operator reaches for, against a real daemon: status, manager stop, mapper evict,
--timeout against a stopped daemon, --json on every command that changes something, the
progress of a slow removal, and counters that tell a misbehaving peer from a normal refusal."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

import membacking
from membacking.manager.model import Limits
from membacking.manager.statedir import default_state_dir
from membacking.runtime import RuntimePaths

from conftest import RunningManager, Worker, cli_env

Spawn = Callable[..., Worker]
Start = Callable[..., RunningManager]


def test_status_says_who_serves_and_how_well(manager: RunningManager) -> None:
    result = manager.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["pid"] == manager.pid and status["runtime_dir"] == str(manager.runtime_dir)
    assert status["version"] and status["version"] == manager.client().stats()["version"]
    assert (status["regions"], status["mappers"], status["health"]) == (2, 0, "ok")
    for key in ("open_fds", "max_fds", "rss_bytes", "vmas"):
        assert type(status[key]) is int and status[key] > 0, key
    assert status["open_fds"] < status["max_fds"]
    text = manager.cli("status").stdout
    assert text.startswith("membacking manager: ok\n")
    assert f"pid           {manager.pid}" in text and " s\n" in text  # uptime with its unit
    stats = manager.cli("stats").stdout
    assert "uptime" in stats and any(
        line.startswith("uptime") and line.endswith(" s") for line in stats.splitlines()
    )
    assert "version" in stats and "refused                0" in stats


def test_status_names_the_state_directory_and_what_a_stop_does(start_manager: Start) -> None:
    default = start_manager("--region", "ram0=0:1M")
    status = json.loads(default.cli("status", "--json").stdout)
    state_dir = str(default_state_dir(RuntimePaths.resolve(default.runtime_dir)))
    assert (status["state_dir"], status["keep_state"], status["fd_store"]) == (
        state_dir,
        False,
        False,
    )
    assert f"state         {state_dir}; ended at a clean stop\n" in default.cli("status").stdout
    kept = start_manager("--region", "ram0=0:1M", "--keep-state")
    assert "; kept at a clean stop\n" in kept.cli("status").stdout
    none = start_manager("--region", "ram0=0:1M", "--no-state")
    assert json.loads(none.cli("status", "--json").stdout)["state_dir"] is None
    assert "state         none (--no-state)\n" in none.cli("status").stdout


def test_manager_stop(start_manager: Start) -> None:
    running = start_manager("--region", "ram0=0:1M")
    result = running.cli("manager", "stop")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"manager (pid {running.pid}) at {running.runtime_dir} stopped; its state ends"
    )
    assert running.proc.wait(10) == 0
    assert list(running.runtime_dir.iterdir()) == []  # sockets and lock removed, as on SIGTERM
    assert "shutting down: stop requested on the control socket" in running.log()
    again = running.cli("manager", "stop")
    assert again.returncode == 1 and "no membacking manager" in again.stderr


@pytest.mark.parametrize("keep", [False, True])
def test_manager_stop_names_the_vms_that_run_on(
    start_manager: Start, spawn_worker: Spawn, keep: bool
) -> None:
    """A VM's launcher pinned ram0: `manager stop` said only "stopped" while the guest ran on
    memory nothing would serve or guard any more (or, with the state kept, until a next start)."""
    running = start_manager("--region", "ram0=0:1M", "--region", "ram1=0x100000:1M")
    launcher = spawn_worker(running, "launcher")
    launcher.ask("read 0 1")
    vm = {"label": "VM 'web'", "pid": launcher.pid, "regions": ["ram0"]}
    running.client().call("pin_regions", mapper=launcher.mapper_id, **vm | {"regions": "ram0"})
    assert running.client().status()["vms"] == [vm | {"journaled": False}]
    flag = "--keep-state" if keep else "--no-keep-state"
    result = running.cli("manager", "stop", flag)
    assert result.returncode == 0, result.stderr
    lent = f"VM 'web' (pid {launcher.pid}) runs on ram0"
    if keep:
        said = f"note: {lent}: the next manager started on this state pins it again"
        assert said in result.stdout.splitlines() and not result.stderr
    else:
        said = f"warning: {lent}, which no manager serves or guards now: stop the VM"
        assert result.stderr.splitlines() == [said]
    assert running.proc.wait(10) == 0
    # the next manager: the pin journaled with the kept state holds while its process runs
    again = start_manager("--region", "ram0=0:1M", runtime_dir=running.runtime_dir)
    if keep:  # shown, though no mapper of it is attached: it keeps ram0 from change
        said = f"VM            VM 'web' (pid {launcher.pid}) on ram0; pinned before a restart"
        assert said in again.cli("status").stdout
    agreed = again.cli("manager", "stop", "--json")
    assert agreed.returncode == 0, agreed.stderr
    assert json.loads(agreed.stdout)["vms"] == ([vm | {"kept": True}] if keep else [])


def test_mapper_evict(manager: RunningManager, spawn_worker: Spawn) -> None:
    worker = spawn_worker(manager, "idle")
    worker.ask("read 0 1")
    result = manager.cli("mapper", "evict", str(worker.mapper_id), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "id": worker.mapper_id,
        "name": "idle",
        "pid": worker.pid,
        "pin": None,  # it lent nothing to a VM
    }
    assert manager.client().mappers() == []
    # the mapper is told, in words that say it was evicted (not that the manager shut down)
    with pytest.raises(Exception, match="the manager evicted this mapper: an operator ran"):
        worker.ask("read 0xfff00000 1")  # a region it has not mapped yet: a fault
    with pytest.raises(Exception, match="MappingsDroppedError"):
        worker.ask("read 0 1")  # and what it had mapped is gone too (--help and OPERATIONS.md)
    unknown = manager.cli("mapper", "evict", "999")
    assert unknown.returncode == 1 and unknown.stderr.strip() == (
        "Error: no mapper 999 is attached"
    )
    stats = manager.client().stats()
    # counted, apart from the mappers evicted for not answering
    assert (stats["evictions_by_operator"], stats["evictions"]) == (1, 0)
    metrics = manager.cli("stats", "--json")
    assert json.loads(metrics.stdout)["evictions_by_operator"] == 1
    assert "evictions_by_operator  1" in manager.cli("stats").stdout


def _attach_cli(manager: RunningManager, *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "membacking", "mapper", "attach", *args],
        env=cli_env(manager.runtime_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    assert ready and "attached" in proc.stdout.readline()
    return proc


def test_mapper_attach_says_once_why_it_stopped(
    manager: RunningManager, start_manager: Start
) -> None:
    evicted = _attach_cli(manager, "--name", "victim")
    mapper_id = manager.client().mappers()[0]["id"]
    assert manager.cli("mapper", "evict", str(mapper_id)).returncode == 0
    assert evicted.wait(10) == 1
    assert evicted.stderr is not None
    assert evicted.stderr.read().strip().splitlines() == [
        f"Error: mapper {mapper_id}: the manager evicted this mapper: an operator ran "
        "`membacking mapper evict`"
    ]
    running = start_manager("--region", "ram0=0:1M")
    follower = _attach_cli(running)
    running.stop()
    assert follower.wait(10) == 1 and follower.stderr is not None
    assert follower.stderr.read().strip().splitlines() == [
        "Error: mapper 1: the manager shut down (received SIGTERM)"
    ]
    # a clean detach is nothing a peer did wrong
    follower2 = _attach_cli(manager)
    follower2.send_signal(signal.SIGTERM)
    assert follower2.wait(10) == 0
    time.sleep(0.2)
    assert manager.client().stats()["rejected"] == {}


def test_timeout_against_a_stopped_daemon(manager: RunningManager) -> None:
    os.kill(manager.pid, signal.SIGSTOP)
    try:
        for command in (("regions",), ("mem", "read", "0", "4"), ("status",)):
            started = time.monotonic()
            result = manager.cli(*command, "--timeout", "0.5")
            assert time.monotonic() - started < 8
            assert result.returncode == 1, result.stderr
            assert result.stderr.strip() == (
                f"Error: the manager at {manager.runtime_dir} did not answer within 0.5s"
            ), command
        # a change sent meanwhile is said to be possibly under way (it may have reached the
        # daemon, as a change waiting on mappers has)
        result = manager.cli("region", "remove", "rom", "--timeout", "0.5")
        assert result.returncode == 1 and result.stderr.strip().endswith(
            "within 0.5s; the remove_region it was sent may still be under way there "
            "(`membacking regions` shows where it stands)"
        ), result.stderr
    finally:
        os.kill(manager.pid, signal.SIGCONT)
    assert manager.cli("regions", "--timeout", "5").returncode == 0


def test_json_output_of_changing_commands(manager: RunningManager) -> None:
    def run(*args: str) -> object:
        result = manager.cli(*args, "--json")
        assert result.returncode == 0, (args, result.stderr)
        return json.loads(result.stdout)

    added = run("region", "add", "dev0", "0x10000000", "2M")
    assert isinstance(added, dict) and added["name"] == "dev0" and added["size"] == 2 << 20
    assert isinstance(run("region", "disable", "dev0"), dict)
    assert run("region", "move", "dev0", "0x20000000")["gpa"] == 0x20000000  # type: ignore[index]
    assert isinstance(run("region", "enable", "dev0"), dict)
    assert isinstance(run("region", "map", "dev0", "0", "4K"), dict)
    assert isinstance(run("region", "unmap", "dev0", "0", "4K"), dict)
    assert run("mem", "write", "0x1000", "--hex", "cafe") == {"gpa": 0x1000, "bytes": 2}
    assert run("mem", "fill", "0x2000", "3", "7") == {"gpa": 0x2000, "bytes": 3, "byte": 7}
    assert run("mem", "dump", "0x1000", "2") == {"gpa": 0x1000, "length": 2, "hex": "cafe"}
    removed = run("region", "remove", "dev0")
    assert isinstance(removed, dict) and removed["name"] == "dev0"
    assert removed["unmapped_from"] == []
    lines = manager.cli("watch", "--count", "2", "--interval", "0.1", "--json").stdout.splitlines()
    frames = [json.loads(line) for line in lines]
    assert len(frames) == 2 and frames[0]["rates"] == {} and "faults" in frames[1]["rates"]


def test_sizes_in_json_are_integers(manager: RunningManager, spawn_worker: Spawn) -> None:
    worker = spawn_worker(manager, "w")
    worker.ask("read 0 1")
    (entry,) = json.loads(manager.cli("mappers", "--json").stdout)
    assert type(entry["rss"]) is int and entry["rss"] > 0 and type(entry["bytes"]) is int
    assert manager.cli("mappers").stdout.count("MiB") >= 2  # people still read units


def test_remove_says_whom_it_waits_for(start_manager: Start, spawn_worker: Spawn) -> None:
    running = start_manager("--region", "ram0=0:1M", "--unmap-timeout", "2")
    holder = spawn_worker(running, "slow")
    holder.ask("view 0 4096")  # a view held open: the Unmap waits until the mapper is evicted
    remove = subprocess.Popen(
        [sys.executable, "-m", "membacking", "region", "remove", "ram0"],
        env=cli_env(running.runtime_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # while the removal waits, `mappers` says what the holder still has to unmap
    listed = running.cli("mappers")
    while "unmapping" not in listed.stdout and remove.poll() is None:
        listed = running.cli("mappers")
    assert "0 (+1 unmapping)" in listed.stdout and "0 B (+1 MiB unmapping)" in listed.stdout
    assert (
        f"mapper {holder.mapper_id} (slow) has not yet acknowledged the unmapping of "
        "1 range (1 MiB)" in listed.stdout
    )
    out, err = remove.communicate(timeout=30)
    result = subprocess.CompletedProcess(remove.args, remove.returncode, out, err)
    assert result.returncode == 0, result.stderr
    # evicted, not unmapped: the command and the log say so
    assert f"(mapper {holder.mapper_id} evicted after not answering for 2." in result.stdout
    assert "unmapped from" not in result.stdout
    assert f"region ram0 removed (mapper {holder.mapper_id} evicted after" in running.log()
    waiting = [line for line in result.stderr.splitlines() if line.startswith("removing ram0 for ")]
    assert waiting, result.stderr
    assert f"mapper {holder.mapper_id} (slow, pid {holder.pid}, " in waiting[0]
    assert "a mapper is evicted after 2.0 s" in waiting[0]


def test_add_says_which_eager_mapper_it_waits_for(
    start_manager: Start, spawn_worker: Spawn
) -> None:
    running = start_manager("--region", "ram0=0:1M", "--unmap-timeout", "2")
    eager = spawn_worker(running, "stopped", "--eager")
    eager.ask("read 0 1")
    os.kill(eager.pid, signal.SIGSTOP)  # it cannot acknowledge the new region's Map
    try:
        result = running.cli("region", "add", "e1", "0x10000000", "1M")
    finally:
        os.kill(eager.pid, signal.SIGCONT)
    assert result.returncode == 0, result.stderr
    waiting = [line for line in result.stderr.splitlines() if line.startswith("adding e1 for ")]
    assert waiting, result.stderr
    assert "(stopped, pid " in waiting[0] and "to acknowledge the change" in waiting[0]
    # it ends by evicting the mapper, and says so as a removal does
    assert f"(mapper {eager.mapper_id} evicted after not answering for " in result.stdout


def test_refusals_are_counted_apart(start_manager: Start, spawn_worker: Spawn) -> None:
    running = start_manager("--max-mappers", "1")
    spawn_worker(running, "one")
    result = running.cli("mem", "read", "0", "1")
    assert result.returncode == 1 and "limit of 1 mappers" in result.stderr
    stats = running.client().stats()
    assert stats["refused"] == {"limit": 1} and stats["rejected"] == {}


def test_private_ram_is_refused_with_several_mappers(
    manager: RunningManager, spawn_worker: Spawn
) -> None:
    one, two = spawn_worker(manager, "one"), spawn_worker(manager, "two")
    result = manager.cli("region", "add", "pram", "0x10000000", "1M", "--private")
    assert result.returncode == 1
    assert (
        f"2 are attached: {one.mapper_id} (one), {two.mapper_id} (two); detach all but one"
        in result.stderr
    )
    assert "pram" not in {r["name"] for r in manager.client().regions()}


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        text: str = response.read().decode()
    return text


def test_metrics_export_version_process_and_every_counter(
    start_manager: Start, spawn_worker: Spawn
) -> None:
    running = start_manager("--region", "ram0=0:1M", "--metrics-port", "0")
    evicted = spawn_worker(running, "evicted")
    assert running.cli("mapper", "evict", str(evicted.mapper_id)).returncode == 0
    text = _scrape(running.ready_line.split("metrics=")[1].strip())
    assert "\nmembacking_evictions_by_operator_total 1.0" in text
    assert "\nmembacking_evictions_total 0.0" in text
    version = running.client().stats()["version"]
    assert f'membacking_build_info{{version="{version}"}} 1.0' in text
    for name in (
        "process_open_fds",
        "process_max_fds",
        "process_resident_memory_bytes",
        "membacking_process_vmas",
        "membacking_rollbacks_total",
        "membacking_demotions_total",
        "membacking_invalidations_total",
        "membacking_refused_requests",
    ):
        assert f"\n{name}" in text or f"# TYPE {name}" in text, name


def _ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_ipv6_metrics_url_has_brackets(start_manager: Start) -> None:
    running = start_manager("--metrics-port", "0", "--metrics-addr", "::1")
    url = running.ready_line.split("metrics=")[1].strip()
    assert url.startswith("http://[::1]:")
    assert "membacking_regions" in _scrape(url)


def test_ready_line_is_json_with_json_logs(start_manager: Start) -> None:
    running = start_manager("--log-format", "json", "--region", "a=0:4K")
    ready = json.loads(running.ready_line)
    assert ready["msg"] == "membacking manager ready" and ready["pid"] == running.pid
    assert ready["runtime_dir"] == str(running.runtime_dir) and ready["regions"] == 1


def test_region_names_complete_from_the_daemon(manager: RunningManager) -> None:
    env = {
        **cli_env(manager.runtime_dir),
        "_MEMBACKING_COMPLETE": "bash_complete",
        "COMP_WORDS": "membacking region remove r",
        "COMP_CWORD": "3",
    }
    result = subprocess.run(
        [sys.executable, "-c", "from membacking.cli import main; main()"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["plain,ram0", "plain,rom"]


def test_debug_logging_says_what_the_daemon_does(start_manager: Start) -> None:
    running = start_manager("--region", "ram0=0:1M", "--log-level", "debug")
    assert running.cli("mem", "read", "0x1000", "1").returncode == 0
    assert running.cli("region", "add", "dev", "0x10000000", "4K").returncode == 0
    log = running.log()
    assert "DEBUG membacking.manager: mapper 1 faults" in log
    assert "DEBUG membacking.manager: control request add_region" in log
    quiet = start_manager("--region", "ram0=0:1M")
    assert quiet.cli("mem", "read", "0", "1").returncode == 0
    assert "DEBUG" not in quiet.log()


def test_unmap_of_a_hole_says_nothing_changed(manager: RunningManager) -> None:
    """`region unmap` of a range with no backing is refused in one line (exit 1): nothing was
    mapped there; a range partly a hole says how much it unmapped."""
    done = manager.cli("region", "unmap", "ram0", "0", "8K")
    assert done.returncode == 0 and done.stdout.startswith("unmapped 8 KiB at offset 0x0 ")
    again = manager.cli("region", "unmap", "ram0", "0", "8K")
    assert (again.returncode, again.stdout, again.stderr.strip()) == (
        1,
        "",
        "Error: nothing is mapped in the 8 KiB at offset 0x0 of region ram0 (it is a hole "
        "already): nothing changed",
    )
    as_json = manager.cli("region", "unmap", "ram0", "0", "8K", "--json")
    assert as_json.returncode == 1 and "nothing is mapped" in as_json.stderr
    assert json.loads(as_json.stdout)["unmapped_bytes"] == 0  # the answer all the same
    part = manager.cli("region", "unmap", "ram0", "0", "16K")
    assert part.returncode == 0, part.stderr
    assert part.stdout.startswith("unmapped 8 KiB of the 16 KiB at offset 0x0 (the rest was")
    assert manager.client().unmap_range("ram0", 0, 16 << 10)["unmapped_bytes"] == 0


def test_limit_refusals_name_where_the_limit_was_set(start_manager: Start, tmp_path: Path) -> None:
    """A limit's refusal names the config file's key when the limit came from the file, the
    option when it was typed (which overrides the file), the default when neither set it."""
    config = tmp_path / "limits.toml"
    config.write_text("[limits]\nmax_regions = 1\nmax_mappers = 1\nmax_fds_per_mapper = 1\n")
    spans = ("--region", "ram0=0:1M", "--no-state", "--config", str(config))
    from_file = start_manager(*spans)
    added = from_file.cli("region", "add", "b", "1M", "1M")
    assert added.returncode == 1 and added.stderr.strip() == (
        f"Error: the manager holds 1 region, its limit (limits.max_regions in {config}) is 1"
    )
    with membacking.attach(from_file.runtime_dir):
        second = from_file.cli("mem", "read", "0", "1")
    assert second.returncode == 1
    assert f"limit of 1 mappers (limits.max_mappers in {config})" in second.stderr
    typed = start_manager(*spans, "--max-regions", "2", "--max-mappers", "1")
    assert typed.cli("region", "add", "b", "1M", "1M").returncode == 0
    refused = typed.cli("region", "add", "c", "2M", "1M")
    assert "its limit (--max-regions) is 2" in refused.stderr, refused.stderr
    fds = typed.cli("mem", "read", "0xff000", "0x2000")  # two regions: two fds
    assert fds.returncode == 1
    assert f"its limit of 1 fds (limits.max_fds_per_mapper in {config})" in fds.stderr
    with membacking.attach(typed.runtime_dir):
        second = typed.cli("mem", "read", "0", "1")
    assert "its limit of 1 mappers (--max-mappers)" in second.stderr, second.stderr
    assert Limits().origin("max_regions") == "the default of --max-regions"


def test_status_shows_the_limits_evict_kill_prealloc_and_metrics(
    manager: RunningManager, start_manager: Start, tmp_path: Path
) -> None:
    """`status` (and its --json) shows the limits with where each was set, --evict-kill,
    --prealloc and the metrics URL, besides its other fields."""
    plain = json.loads(manager.cli("status", "--json").stdout)
    assert plain["limits"] == {
        "max_mappers": 1024,
        "max_regions": 16384,
        "max_fds_per_mapper": 4096,
    }
    assert plain["limit_origins"]["max_regions"] == "the default of --max-regions"
    assert (plain["evict_kill"], plain["metrics"], plain["regions"]) == (False, None, 2)
    assert plain["prealloc"] is False
    # what tells two releases apart where the package version may not
    assert plain["versions"] == {"protocol": 1, "features": 0x1F, "handover": 2, "journal": 1}
    text = manager.cli("status").stdout
    assert "  evict kill    off\n" in text and "  metrics       not served\n" in text
    assert "  prealloc      off: RAM is allocated as it is first touched\n" in text
    assert f"  version       {plain['version']} (protocol 1, features 0x1f, handover 2, " in text
    config = tmp_path / "c.toml"
    config.write_text("evict_kill = true\nprealloc = true\n[limits]\nmax_mappers = 3\n")
    running = start_manager(
        "--config", str(config), "--max-regions", "9", "--metrics-port", "0", "--no-state"
    )
    status = json.loads(running.cli("status", "--json").stdout)
    assert status["limits"] == {"max_mappers": 3, "max_regions": 9, "max_fds_per_mapper": 4096}
    assert status["limit_origins"] == {
        "max_mappers": f"limits.max_mappers in {config}",
        "max_regions": "--max-regions",
        "max_fds_per_mapper": "the default of --max-fds-per-mapper",
    }
    assert status["evict_kill"] is True and status["prealloc"] is True
    assert status["metrics"].startswith("http://127.0.0.1:") and "metrics=" in running.ready_line
    assert status["metrics"] in running.ready_line
    with urllib.request.urlopen(status["metrics"], timeout=10) as page:
        assert b"membacking_regions" in page.read()
    text = running.cli("status").stdout
    assert f"  max mappers   3 (limits.max_mappers in {config})\n" in text
    assert "  max regions   9 (--max-regions)\n" in text
    assert "  max fds       4096 per mapper (the default of --max-fds-per-mapper)\n" in text
    assert "  evict kill    on: " in text and f"  metrics       {status['metrics']}\n" in text
    assert "  prealloc      on: each RAM region's memory is allocated when it is made\n" in text
