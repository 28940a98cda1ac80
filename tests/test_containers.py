"""docker-compose.yml and the Dockerfile: well-formed, wired to one shared runtime directory, and
every command they run is a real CLI command. (No Docker engine runs here: the services are not
started; `membacking <command> --help` proves each command line parses.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

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
