"""docker-compose.yml and the Dockerfile: well-formed, wired to one shared runtime directory, and
every command they run works. (No Docker engine runs here: the services' commands run as plain
processes on one runtime directory, which is what the shared volume gives the containers.)"""

from __future__ import annotations

import json
import re
import select
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

import membacking

from conftest import RunningManager, cli_env, run_cli

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


def test_compose_commands_run_together(start_manager: Callable[..., RunningManager]) -> None:
    """The services' commands, run as they are written (no Docker engine here: as processes on
    one runtime directory, which is what the shared volume gives the containers)."""
    services = compose()["services"]
    assert isinstance(services, dict)
    manager_args = list(services["manager"]["command"])
    assert manager_args[:2] == ["manager", "run"]
    # the only change: an ephemeral loopback metrics port, so the test cannot collide
    port = manager_args.index("--metrics-port")
    manager_args[port + 1] = "0"
    manager_args[manager_args.index("--metrics-addr") + 1] = "127.0.0.1"
    running = start_manager(*manager_args[2:])
    health = services["manager"]["healthcheck"]["test"][2:]
    checked = run_cli(*health, runtime_dir=running.runtime_dir)
    assert checked.returncode == 0 and json.loads(checked.stdout)["regions"] == 2
    mappers = []
    try:
        for name in ("mapper-a", "mapper-b"):
            proc = subprocess.Popen(
                [sys.executable, "-m", "membacking", *services[name]["command"]],
                env=cli_env(running.runtime_dir),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            mappers.append(proc)
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 30)
            assert ready and "attached" in proc.stdout.readline(), name
        attached = {p["name"]: p for p in running.client().mappers()}
        assert attached["device-a"]["mode"] == "lazy" and attached["device-a"]["ranges"] >= 1
        assert attached["device-b"]["mode"] == "eager"
    finally:
        for proc in mappers:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)


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


@pytest.mark.skipif(not _can_unshare(), reason="cannot create a pid namespace here (needs root)")
def test_a_takeover_from_another_pid_namespace_is_agreed(
    start_manager: Callable[..., RunningManager],
) -> None:
    """The new daemon's pid, as it tells it, means nothing in the running daemon's namespace
    (there it is pid 1, and the asker's pid may not exist): the handover goes on all the same."""
    running = start_manager("--region", "ram=0:1M", prefix=UNSHARE)
    try:
        with membacking.attach(running.runtime_dir, name="writer") as memory:
            memory.write_at(0, b"across")
        new = start_manager("--takeover", "--region", "ram=0:1M", runtime_dir=running.runtime_dir)
        assert "took-over-from" in new.ready_line, new.ready_line
        with membacking.attach(new.runtime_dir, name="reader") as memory:
            assert memory.read_at(0, 6) == b"across"
        assert new.stop() == 0
    finally:
        running.stop(signal.SIGKILL)


def _instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_image_runs_as_an_unprivileged_user() -> None:
    steps = _instructions()
    users = [rest for keyword, rest in steps if keyword == "USER"]
    assert users and users[-1] not in ("root", "0"), users
    entry = next(i for i, (keyword, _) in enumerate(steps) if keyword == "ENTRYPOINT")
    assert max(i for i, (keyword, _) in enumerate(steps) if keyword == "USER") < entry
    # the runtime directory a new volume copies is the user's own
    created = " ".join(rest for keyword, rest in steps if keyword == "RUN")
    assert "useradd --system --uid 10001" in created and "chown membacking" in created


def test_dependencies_are_installed_before_the_source_is_copied() -> None:
    """Layer caching: a change of the source must not reinstall the dependencies."""
    steps = _instructions()
    source = next(i for i, s in enumerate(steps) if s == ("COPY", "membacking ./membacking"))
    deps = next(i for i, (k, rest) in enumerate(steps) if k == "RUN" and "-r /tmp/req" in rest)
    assert deps < source
    copies_before = [rest for keyword, rest in steps[:deps] if keyword in ("COPY", "ADD")]
    assert copies_before == ["pyproject.toml README.md ./"]
    # the dependency list the image installs is pyproject's, read the way the RUN line does
    run = steps[deps][1]
    snippet = re.search(r'python -c "(.*?)" >', run)
    assert snippet is not None
    listed = subprocess.run(
        [sys.executable, "-c", snippet.group(1)], cwd=ROOT, capture_output=True, text=True
    )
    assert listed.returncode == 0, listed.stderr
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert listed.stdout.split() == project["dependencies"]
    final = next(rest for k, rest in steps[source:] if k == "RUN")
    assert "--no-deps" in final


def test_dockerignore_keeps_the_build_context_small() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git", "**/__pycache__", "tests"} <= ignored
    # what the Dockerfile copies is not ignored
    for kept in ("pyproject.toml", "README.md", "membacking"):
        assert kept not in ignored


def test_every_service_restarts() -> None:
    """`mapper attach` exits when its manager stops: every service needs a restart policy."""
    services = compose()["services"]
    assert isinstance(services, dict)
    for name, service in services.items():
        assert service.get("restart") in ("unless-stopped", "always", "on-failure"), name
