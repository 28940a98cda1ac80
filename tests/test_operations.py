"""Operating the daemon: TOML config (and its errors), Prometheus metrics scraped over loopback
HTTP, systemd readiness on a real datagram socket, JSON logs."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import zmq

from membacking.manager.config import ConfigError, load_config, parse_config

from conftest import RunningManager, cli_env, launch_manager, run_cli, short_tmpdir


def write(tmp_path: Path, text: str, name: str = "membacking.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_config_file_parses_every_key(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
runtime_dir = "/run/mb"
address_space = "64G"
unmap_timeout = 5
evict_kill = true
log_level = "debug"
log_format = "json"
metrics_port = 9464
metrics_addr = "127.0.0.1"
allow_uids = [1000]
allow_gids = []
[limits]
max_mappers = 8
max_regions = 100
max_fds_per_mapper = 50
[[regions]]
name = "ram0"
gpa = 0
size = "64M"
[[regions]]
name = "rom"
gpa = "0xfff00000"
size = 1048576
readonly = true
""",
        )
    )
    assert config["address_space"] == 64 << 30
    assert config["unmap_timeout"] == 5.0
    assert config["evict_kill"] is True
    assert config["max_mappers"] == 8 and config["max_fds_per_mapper"] == 50
    assert config["allow_uids"] == (1000,)
    assert config["regions"] == [
        {"name": "ram0", "gpa": 0, "size": 64 << 20},
        {"name": "rom", "gpa": 0xFFF00000, "size": 1 << 20, "readonly": True},
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour = 'red'", "key 'colour': unknown key"),
        ("address_space = 'lots'", "key 'address_space': invalid size 'lots'"),
        ("unmap_timeout = -1", "key 'unmap_timeout': must be a number of at least 1, got -1"),
        ("unmap_timeout = 0", "key 'unmap_timeout': must be a number of at least 1, got 0"),
        ("log_level = 'loud'", "key 'log_level': must be one of debug, info, warning, error"),
        ("metrics_port = 70000", "key 'metrics_port': must be a TCP port number"),
        ("metrics_port = '9464'", "key 'metrics_port': must be a number, not a string: write"),
        ("allow_uids = ['root']", "key 'allow_uids': 'root' is not a uid/gid"),
        ("limits = 3", "key 'limits': must be a table"),
        ("[limits]\nmax_mappers = 0", "key 'limits.max_mappers': must be a whole number of at"),
        ("[limits]\nmax_pies = 3", "key 'limits.max_pies': unknown key"),
        ("[[regions]]\nname = 'a'\ngpa = 0", "key 'regions[0].size': missing"),
        ("[[regions]]\nname = 'a b'\ngpa = 0\nsize = 1", "key 'regions[0].name': invalid name"),
        ("[[regions]]\nname='a'\ngpa=0\nsize=1\nro=1", "key 'regions[0].ro': unknown key"),
        ("[[regions]]\nname='a'\ngpa=1\nsize=4096", "key 'regions[0].gpa': gpa 0x1 must be"),
        ("[[regions]]\nname='a'\ngpa=0\nsize=0", "key 'regions[0].size': size 0x0 must be a non-"),
        (
            "[[regions]]\nname='a'\ngpa=0\nsize=5000",
            "key 'regions[0].size': size 0x1388 (5000) must be a non-zero multiple of 4096",
        ),
        (
            "[[regions]]\nname='a'\ngpa=0\nsize=4096\n[[regions]]\nname='a'\ngpa=8192\nsize=4096",
            "key 'regions[1].name': 'a' is already the name of regions[0]",
        ),
        (
            "address_space = '5K'",
            "key 'address_space': address space 0x1400 (5120) is less than the 1 MiB minimum",
        ),
        ("unmap_timeout = 0.001", "key 'unmap_timeout': must be a number of at least 1, got"),
        ("evict_kill = 1", "key 'evict_kill': must be true or false"),
        # a client reading the file from another directory would look elsewhere
        ("runtime_dir = 'run/mb'", "key 'runtime_dir': must be an absolute path, got 'run/mb'"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert str(err.value).startswith(f"config {tmp_path / 'membacking.toml'}: {message}"), str(
        err.value
    )


def test_config_not_toml_or_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "this is = = not toml"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")
    assert parse_config({}) == {}


def test_cli_reports_config_errors_cleanly(tmp_path: Path) -> None:
    bad = write(tmp_path, "[limits]\nmax_regions = 'many'\n")
    result = run_cli("manager", "run", "--config", str(bad), "--runtime-dir", str(tmp_path / "r"))
    # a mistake in the file named on the command line is a usage mistake, as the same
    # mistake typed as an option is: status 2, in the same words
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"Error: config {bad}: key 'limits.max_regions': must be a whole number of at least 1, "
        "got 'many'"
    )
    flag = run_cli("manager", "run", "--max-regions", "many", "--runtime-dir", str(tmp_path))
    assert flag.returncode == 2
    assert "limit must be a whole number of at least 1, got 'many'" in flag.stderr
    for args in (
        ("manager", "run", "--config", str(tmp_path / "missing.toml")),
        ("regions", "--config", str(tmp_path / "missing.toml")),
        ("regions", "--config", str(bad)),
        ("regions", "--config", str(tmp_path)),  # a directory
    ):
        result = run_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith("Error: ") and "Traceback" not in result.stderr


def test_flags_override_the_config_file(
    tmp_path: Path, start_manager: Callable[..., RunningManager]
) -> None:
    config = write(
        tmp_path,
        """
address_space = "64G"
[[regions]]
name = "fromfile"
gpa = 0
size = "1M"
""",
    )
    from_file = start_manager("--config", str(config))
    stats = from_file.client().stats()
    assert stats["address_space"] == 64 << 30
    assert [r["name"] for r in from_file.client().regions()] == ["fromfile"]
    overridden = start_manager(
        "--config", str(config), "--address-space", "2G", "--region", "flag=0:2M"
    )
    assert overridden.client().stats()["address_space"] == 2 << 30
    assert [r["name"] for r in overridden.client().regions()] == ["flag"]


def test_flags_override_settings_of_the_file_they_cannot_go_with(
    tmp_path: Path, start_manager: Callable[..., RunningManager]
) -> None:
    """A typed option sets aside the file's rival setting (--state-dir over no_state, ...),
    and every flag the file can set on has its off form: the command line always wins."""
    state_dir = Path("/dev/shm") / f"mb-test-state-{uuid.uuid4().hex[:12]}"
    try:
        no_state = write(tmp_path, "no_state = true\nkeep_state = true\nmetrics_port = 0\n")
        typed = start_manager(
            "--config",
            str(no_state),
            "--state-dir",
            str(state_dir),
            "--no-keep-state",
            "--no-metrics",
        )
        status = typed.client().status()
        assert status["state_dir"] == str(state_dir) and not status["keep_state"], status
        assert "metrics=" not in typed.ready_line, typed.ready_line
        typed.stop()
        with_dir = write(tmp_path, f'state_dir = "{state_dir}"\n', name="dir.toml")
        without = start_manager("--config", str(with_dir), "--no-state")
        assert without.client().status()["state_dir"] is None
        both = write(tmp_path, f'state_dir = "{state_dir}"\nno_state = true\n', name="both.toml")
        refused = run_cli("manager", "run", "--config", str(both), "--runtime-dir", str(tmp_path))
        assert refused.returncode == 2, refused.stderr
        # the file's keys, named with the file
        assert f"no_state in {both} and state_dir in {both} cannot go" in refused.stderr
        kept = write(tmp_path, "no_state = true\nkeep_state = true\n", name="kept.toml")
        refused = run_cli("manager", "run", "--config", str(kept), "--runtime-dir", str(tmp_path))
        assert refused.returncode == 2, refused.stderr
        assert f"keep_state in {kept} with no_state in {kept} keeps" in refused.stderr
        rivals = run_cli(
            "manager", "run", "--no-metrics", "--metrics-port", "0", "--runtime-dir", str(tmp_path)
        )
        assert rivals.returncode == 2, rivals.stderr  # (it was accepted and served nothing)
        assert "--no-metrics and --metrics-port cannot go together" in rivals.stderr
        alone = run_cli("manager", "run", "--metrics-addr", "::1", "--runtime-dir", str(tmp_path))
        assert alone.returncode == 2 and "--metrics-addr needs --metrics-port" in alone.stderr
        flag = write(tmp_path, "unmap_timeout = true\n", name="flag.toml")
        shown = run_cli("manager", "run", "--config", str(flag), "--runtime-dir", str(tmp_path))
        assert "got true" in shown.stderr, shown.stderr  # as TOML spells it, not Python's True
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_metrics_endpoint(start_manager: Callable[..., RunningManager]) -> None:
    running = start_manager("--region", "ram0=0:1M", "--metrics-port", "0")
    url = running.ready_line.split("metrics=")[1].strip()
    assert url.startswith("http://127.0.0.1:")
    before = scrape(url)
    assert before["membacking_regions"] == 1
    assert before["membacking_region_bytes"] == 1 << 20
    assert before["membacking_mappers"] == 0
    client = running.client()
    client.add_region("dev", 0x100000, 0x2000)
    client.remove_region("dev")
    with pytest.raises(Exception, match="does not exist"):
        client.remove_region("dev")
    after = scrape(url)
    assert after["membacking_removals_total"] == 1
    assert after["membacking_invalidation_seconds_count"] == 1
    assert after["membacking_regions"] == 1


def test_metrics_port_in_use_is_a_clean_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli(
            "manager", "run", "--runtime-dir", str(short_tmpdir()), "--metrics-port", str(port)
        )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr


def test_systemd_readiness_on_a_datagram_socket() -> None:
    sockdir = short_tmpdir("mbsd-")
    path = sockdir / "notify"
    runtime_dir = short_tmpdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(path))
        notify.settimeout(20)
        env = cli_env()
        env["NOTIFY_SOCKET"] = str(path)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "membacking",
                "manager",
                "run",
                "--runtime-dir",
                str(runtime_dir),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert notify.recv(256) == b"READY=1"
            assert (runtime_dir / "control.ipc").exists()  # ready means serving
            proc.terminate()
            assert notify.recv(256) == b"STOPPING=1"
            assert proc.wait(15) == 0
        finally:
            proc.kill()
            proc.wait()
    os.unlink(path)
    sockdir.rmdir()
    runtime_dir.rmdir()


def test_json_logs(tmp_path: Path) -> None:
    runtime_dir = short_tmpdir()
    running = launch_manager(runtime_dir, "--log-format", "json", "--region", "a=0:4K")
    try:
        running.client().add_region("b", 0x1000, 0x1000)
        ctx = zmq.Context()
        stranger = ctx.socket(zmq.DEALER)
        stranger.connect(f"ipc://{runtime_dir / 'mapper.ipc'}")
        stranger.send(b"\xc1")  # rejected: a peer with no pid the manager knows
        assert stranger.poll(5000)
        stranger.close(0)
        ctx.term()
        time.sleep(0.2)
    finally:
        assert running.stop() == 0
    lines = [json.loads(line) for line in running.log().splitlines()]  # every line is JSON
    messages = [entry["msg"] for entry in lines]
    assert "region b added (0x1000-0x2000, 4096 bytes, priority 0)" in messages
    assert all(entry["logger"].startswith("membacking") for entry in lines)
    assert {entry["level"] for entry in lines} <= {"info", "warning", "error", "debug"}
    assert messages[-1] == "membacking manager stopped"
    (rejection,) = [entry for entry in lines if entry.get("reason") == "malformed"]
    assert rejection["peer_pid"] is None  # JSON null, not the string "None"
    assert "from a peer of unknown pid (not a registered mapper)" in rejection["msg"]


def test_example_rom_needs_an_existing_file_only_when_it_names_one(
    tmp_path: Path, start_manager: Callable[..., RunningManager]
) -> None:
    """What the example configuration's comment says: a read-only region without `file` is
    zeroed memory; only a `file` naming a missing file stops the daemon."""
    example = Path(__file__).resolve().parent.parent / "docs" / "membacking.example.toml"
    comment = " ".join(example.read_text().replace("#", " ").split())
    assert "A read-only `file` that does not exist stops the daemon at startup" in comment
    rom = "[[regions]]\nname = 'rom'\ngpa = '0xfff00000'\nsize = '1M'\nreadonly = true\n"
    running = start_manager("--config", str(write(tmp_path, rom)))
    (region,) = running.client().regions()
    assert (region["name"], region["writable"]) == ("rom", False)
    missing = rom + f"file = '{tmp_path / 'missing.bin'}'\n"
    config = tmp_path / "missing.toml"
    config.write_text(missing)
    result = run_cli(
        "manager", "run", "--config", str(config), "--runtime-dir", str(tmp_path / "r")
    )
    assert result.returncode == 1 and "does not exist" in result.stderr
