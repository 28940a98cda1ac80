"""docker-compose.yml and the Dockerfile: well-formed, wired to one shared runtime directory, and
every command they run is a real CLI command. (No Docker engine runs here: the services are not
started; `membacking <command> --help` proves each command line parses.)"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

import membacking

from conftest import RunningManager

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict[str, object]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_file_is_well_formed() -> None:
    data = compose()
    services = data["services"]
    assert isinstance(services, dict)
    assert set(services) == {"manager", "mapper-a", "mapper-b"}
    volumes = data["volumes"]
    assert isinstance(volumes, dict) and "membacking-run" in volumes
    dockerfile = (ROOT / "Dockerfile").read_text()
    runtime_dir = re.search(r"ENV MEMBACKING_RUNTIME_DIR=(\S+)", dockerfile)
    assert runtime_dir is not None
    assert 'ENTRYPOINT ["membacking"]' in dockerfile
    for name, service in services.items():
        assert f"membacking-run:{runtime_dir.group(1)}" in service["volumes"], name
        assert isinstance(service["command"], list), name
    for mapper in ("mapper-a", "mapper-b"):
        assert services[mapper]["depends_on"]["manager"]["condition"] == "service_healthy"
    health = services["manager"]["healthcheck"]["test"]
    assert health[:2] == ["CMD", "membacking"]


def test_every_compose_command_is_a_real_cli_command() -> None:
    services = compose()["services"]
    assert isinstance(services, dict)
    commands = [service["command"] for service in services.values()]
    commands.append(services["manager"]["healthcheck"]["test"][2:])
    for command in commands:
        result = subprocess.run(
            [sys.executable, "-m", "membacking", *command, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, (command, result.stderr)
        assert result.stdout.startswith("Usage: membacking"), command
    bogus = subprocess.run(
        [sys.executable, "-m", "membacking", "mapper", "attach", "--bogus", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bogus.returncode == 2  # the check above would notice a wrong option


UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]


def _can_unshare() -> bool:
    try:
        return subprocess.run([*UNSHARE, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _can_unshare(), reason="cannot create a pid namespace here (needs root)")
def test_mapper_in_another_pid_namespace_stays_attached(
    start_manager: Callable[..., RunningManager],
) -> None:
    """As across containers: the manager cannot see the mapper's pid (SO_PEERCRED gives 0), so
    it must rely on the fd socket, not on the pid, to know the mapper is alive."""
    running = start_manager("--region", "ram=0:1M", prefix=UNSHARE)
    try:
        with membacking.attach(running.runtime_dir, name="outside") as memory:
            memory.write_at(0, b"across")
            client = running.client()
            (entry,) = client.mappers()
            assert entry["pid"] == 0
            time.sleep(2.5)  # two liveness ticks
            assert [p["name"] for p in client.mappers()] == ["outside"]
            assert memory.read_at(0x1000, 4) == bytes(4)  # a new fault is still served
            assert memory.read_at(0, 6) == b"across"
        assert client.mappers() == []  # and its departure is noticed all the same
    finally:
        running.stop(signal.SIGKILL)  # unshare does not pass SIGTERM on; --kill-child does
