"""One rule picks the runtime directory for the daemon and for every client command:
--runtime-dir, $MEMBACKING_RUNTIME_DIR, the configuration file's runtime_dir, $XDG_RUNTIME_DIR,
/tmp/membacking-<uid>. And access options are checked the same way on the command line and in
the file."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from membacking.manager import ManagerConfig
from membacking.runtime import choose_runtime_dir

from conftest import RunningManager, cli_env, run_cli, short_tmpdir


def test_choose_runtime_dir_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMBACKING_RUNTIME_DIR", "/env")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/xdg")
    assert choose_runtime_dir("/opt", "/cfg") == (Path("/opt"), "--runtime-dir")
    assert choose_runtime_dir(None, "/cfg") == (Path("/env"), "$MEMBACKING_RUNTIME_DIR")
    monkeypatch.delenv("MEMBACKING_RUNTIME_DIR")
    assert choose_runtime_dir(None, "/cfg") == (Path("/cfg"), "configuration file")
    assert choose_runtime_dir(None, None) == (Path("/xdg/membacking"), "$XDG_RUNTIME_DIR")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert choose_runtime_dir() == (Path(f"/tmp/membacking-{os.getuid()}"), "default")


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "membacking", "manager", "run", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("membacking manager ready"), line
    return proc


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "membacking", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def dirs() -> Iterator[list[Path]]:
    made = [short_tmpdir() for _ in range(3)]
    yield made
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


def test_clients_find_a_daemon_started_from_a_config_file(dirs: list[Path]) -> None:
    served, elsewhere, files = dirs
    config = files / "membacking.toml"
    config.write_text(f"runtime_dir = '{served}'\n[[regions]]\nname='ram0'\ngpa=0\nsize='1M'\n")
    env = cli_env()
    env.pop("XDG_RUNTIME_DIR", None)
    proc = _start(["--config", str(config)], env)
    try:
        by_option = _cli("regions", "--config", str(config), env=env)
        assert by_option.returncode == 0 and "ram0" in by_option.stdout, by_option.stderr
        by_env = _cli(
            "mem", "write", "0", "--hex", "01", env={**env, "MEMBACKING_CONFIG": str(config)}
        )
        assert by_env.returncode == 0, by_env.stderr
        # the environment variable and the option beat the file, for clients as for the daemon
        missed = _cli("regions", "--config", str(config), env=cli_env(elsewhere))
        assert missed.returncode == 1 and f"no membacking manager at {elsewhere}" in missed.stderr
        found = _cli(
            "stats", "--config", str(config), "--runtime-dir", str(served), env=cli_env(elsewhere)
        )
        assert found.returncode == 0, found.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    # the daemon follows the same rule: $MEMBACKING_RUNTIME_DIR beats the file's runtime_dir
    proc = _start(["--config", str(config)], cli_env(elsewhere))
    try:
        assert (elsewhere / "control.ipc").exists() and not (served / "control.ipc").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


def test_a_bad_config_file_is_a_clean_error_for_clients(tmp_path: Path) -> None:
    # a usage mistake (status 2), as `--config` naming a directory is
    result = run_cli("regions", "--config", str(tmp_path / "missing.toml"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"config {tmp_path / 'missing.toml'}: cannot read" in result.stderr


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--allow-uid", "-1"),
        ("--allow-uid", "99999999999"),
        ("--allow-gid", "-7"),
        ("--allow-gid", "4294967295"),
    ],
)
def test_bad_access_ids_are_refused(option: str, value: str) -> None:
    runtime_dir = short_tmpdir()
    try:
        result = run_cli("manager", "run", "--runtime-dir", str(runtime_dir), option, value)
        assert result.returncode == 2, result.stderr
        assert f"{value} is not a uid/gid" in result.stderr and "Traceback" not in result.stderr
        assert not (runtime_dir / "fd.sock").exists()
    finally:
        shutil.rmtree(runtime_dir, ignore_errors=True)


def test_bad_access_ids_are_refused_in_the_file_and_the_api(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("allow_gids = [-7]\n")
    result = run_cli("manager", "run", "--config", str(config), "--runtime-dir", str(tmp_path))
    assert result.returncode == 2 and "-7 is not a uid/gid" in result.stderr
    with pytest.raises(ValueError, match="99999999999 is not a uid/gid"):
        ManagerConfig(allow_uids=frozenset({99999999999}))


def test_the_runtime_directory_made_private_is_said_and_a_file_there_is_named(
    start_manager: Callable[..., RunningManager], tmp_path: Path
) -> None:
    """An existing runtime directory an operator opened (0777) is made 0700 with a warning
    (it was silent), and a file where the directory must be is named as such from the
    environment too (it was Python's errno text)."""
    opened = short_tmpdir()
    os.chmod(opened, 0o777)
    running = start_manager("--no-state", runtime_dir=opened)
    assert opened.stat().st_mode & 0o777 == 0o700
    assert f"runtime directory {opened} had mode 777: made 0700" in running.log()
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    env = {**cli_env(), "MEMBACKING_RUNTIME_DIR": str(blocked)}
    done = subprocess.run(
        [sys.executable, "-m", "membacking", "manager", "run", "--no-state"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert f"cannot create runtime directory {blocked}: it, or a directory above it, is a" in (
        done.stderr
    ), done.stderr
    assert "Errno" not in done.stderr
