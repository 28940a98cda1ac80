"""State directories as an operator sees them (`manager state list|remove`): a held one is held,
a killed manager's one whose runtime directory still names it is kept, one whose runtime
directory is gone or moved on is stale; removal refuses held and kept ones, and anything that is
not a state directory (real daemons, real directories); a refused start leaves no runtime
directory it created."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from membacking.manager import journal, statelist
from membacking.manager.statedir import default_state_dir
from membacking.runtime import RuntimePaths

from conftest import RunningManager, run_cli, short_tmpdir

Start = Callable[..., RunningManager]
REGION = ("--region", "ram=0:1M")


@pytest.fixture
def state_dirs() -> Iterator[Callable[[], Path]]:
    """Factory of state directory paths on /dev/shm (not created), removed at the end."""
    made: list[Path] = []

    def new() -> Path:
        made.append(Path("/dev/shm") / f"mb-test-state-{uuid.uuid4().hex[:12]}")
        return made[-1]

    yield new
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


def listed(*paths: Path) -> dict[str, dict[str, object]]:
    args = [a for p in paths for a in ("--state-dir", str(p))]
    done = run_cli("manager", "state", "list", "--json", *args)
    assert done.returncode == 0, done.stderr
    return {e["path"]: e for e in json.loads(done.stdout)}


def held_kept_stale(
    start_manager: Start, state_dirs: Callable[[], Path]
) -> list[tuple[RunningManager, Path]]:
    """Three managers of a region each, with their state directories: one running (held),
    one SIGKILLed (kept for a restart), one SIGKILLed whose runtime directory is gone
    (stale)."""
    made = []
    for kill, drop in ((False, False), (True, False), (True, True)):
        path = state_dirs()
        manager = start_manager(*REGION, "--state-dir", str(path))
        if kill:
            manager.stop(signal.SIGKILL)
        if drop:
            shutil.rmtree(manager.runtime_dir)
        made.append((manager, path))
    return made


def test_list_tells_held_kept_and_stale_apart(
    start_manager: Start, state_dirs: Callable[[], Path]
) -> None:
    (held, held_dir), (_, kept_dir), (gone, gone_dir) = held_kept_stale(start_manager, state_dirs)
    moved_dir, new_dir = state_dirs(), state_dirs()
    moved = start_manager(*REGION, "--state-dir", str(moved_dir))
    moved.stop(signal.SIGKILL)  # then a manager there starts afresh with another one
    start_manager(*REGION, "--state-dir", str(new_dir), "--fresh", runtime_dir=moved.runtime_dir)

    seen = listed(held_dir, kept_dir, gone_dir, moved_dir)
    assert seen[str(held_dir)]["status"] == "held"
    assert seen[str(held_dir)]["holder_pid"] == held.pid
    assert seen[str(held_dir)]["runtime_dir"] == str(held.runtime_dir)
    assert seen[str(kept_dir)]["status"] == "kept"
    assert seen[str(kept_dir)]["runtime_dir_exists"] is True
    assert seen[str(gone_dir)]["status"] == "stale"
    assert seen[str(gone_dir)]["runtime_dir_exists"] is False
    assert seen[str(moved_dir)]["status"] == "stale"
    assert seen[str(moved_dir)]["runtime_dir_names"] == str(new_dir)
    for path in (held_dir, kept_dir, gone_dir, moved_dir):
        entry = seen[str(path)]
        assert entry["regions"] == 1 and entry["memory_size"] == 1 << 20
    text = run_cli("manager", "state", "list", "--state-dir", str(gone_dir)).stdout
    line = next(x for x in text.splitlines() if x.startswith(str(gone_dir)))
    assert "stale" in line and f"{gone.runtime_dir} (gone)" in line, text
    # the hint names the directory given, which --stale alone would not look at
    assert f"`membacking manager state remove --stale --state-dir {gone_dir}`" in text, text
    # what the survey finds among these alone: the two stale ones
    found, errors = statelist.survey([held_dir, kept_dir, gone_dir, moved_dir], defaults=False)
    assert not errors
    assert sorted(str(i.path) for i in found if i.status == "stale") == sorted(
        [str(gone_dir), str(moved_dir)]
    )


def test_remove_refuses_held_and_kept_and_removes_stale(
    start_manager: Start, state_dirs: Callable[[], Path]
) -> None:
    (held, held_dir), (kept, kept_dir), (_, stale_dir) = held_kept_stale(start_manager, state_dirs)

    refused = run_cli("manager", "state", "remove", str(held_dir))
    said = " ".join(refused.stderr.split())
    assert refused.returncode == 1 and "Traceback" not in said
    assert f"held by a running manager (pid {held.pid}" in said and "--force" in said, said
    assert (held_dir / "journal").exists() and held.proc.poll() is None

    refused = run_cli("manager", "state", "remove", str(kept_dir))
    said = " ".join(refused.stderr.split())
    assert refused.returncode == 1 and "Traceback" not in said
    assert f"keeps the state of {kept.runtime_dir}" in said and "1 MiB of guest memory" in said
    assert (kept_dir / "journal").exists()

    removed = run_cli("manager", "state", "remove", str(stale_dir), "--json")
    assert removed.returncode == 0, removed.stderr
    answer = json.loads(removed.stdout)
    assert [e["path"] for e in answer["removed"]] == [str(stale_dir)] and not answer["refused"]
    assert not stale_dir.exists()

    forced = run_cli("manager", "state", "remove", str(kept_dir), "--force")
    assert forced.returncode == 0 and "removed" in forced.stdout, forced.stderr
    assert not kept_dir.exists()
    # the running manager still serves (its held directory was never touched)
    status = held.client().status()
    assert status["pid"] == held.pid and status["health"] == "ok", status

    # removed under it with --force: it serves on, and its status says nothing is journaled
    forced = run_cli("manager", "state", "remove", str(held_dir), "--force")
    assert forced.returncode == 0, forced.stderr
    deadline = time.monotonic() + 10
    while (status := held.client().status())["health"] == "ok" and time.monotonic() < deadline:
        time.sleep(0.1)  # noticed within a second
    assert status["health"] == "degraded", status
    assert any(f"{held_dir} was removed" in p for p in status["problems"]), status


def test_what_is_not_a_state_dir_is_never_removed(tmp_path: Path) -> None:
    lookalike = tmp_path / "lookalike"
    (lookalike / "mem").mkdir(parents=True)
    (lookalike / "journal").write_bytes(b"not a journal at all")
    crowded = tmp_path / "crowded"
    crowded.mkdir()
    (crowded / "state.lock").touch()
    (crowded / "notes.txt").write_text("mine")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    early = tmp_path / "early"  # a state directory, given through a symbolic link
    (early / "mem").mkdir(parents=True)
    (early / "state.lock").touch()
    link = tmp_path / "link"
    link.symlink_to(early)
    thesis = tmp_path / "thesis"  # the shape of a state directory, a user's file in mem/
    (thesis / "mem").mkdir(parents=True)
    (thesis / "state.lock").touch()
    (thesis / "mem" / "thesis.doc").write_text("years of work")
    for target, why in (
        (thesis, "is not named as a manager names guest memory"),
        (lookalike, "its journal is not a membacking journal"),
        (crowded, "it holds notes.txt"),
        (a_file, "not a directory"),
        (tmp_path / "missing", "does not exist"),
        (link, "is a symbolic link"),
    ):
        done = run_cli("manager", "state", "remove", "--force", str(target))
        said = " ".join(done.stderr.split())
        assert done.returncode == 1 and why in said and "Traceback" not in said, said
        assert len(done.stderr.strip().splitlines()) == 1
    assert (lookalike / "journal").exists() and (crowded / "notes.txt").exists()
    assert a_file.exists() and (early / "state.lock").exists()
    assert (thesis / "mem" / "thesis.doc").exists()
    listing = run_cli("manager", "state", "list", "--state-dir", str(lookalike))
    assert listing.returncode == 1 and "not a membacking journal" in listing.stderr
    usage = run_cli("manager", "state", "remove")
    assert usage.returncode == 2 and "--stale for every stale one" in usage.stderr
    usage = run_cli("manager", "state", "remove", "--stale", str(a_file))
    assert usage.returncode == 2 and "not both" in usage.stderr
    for empty in ("", "."):  # not the current directory
        usage = run_cli("manager", "state", "remove", "--force", empty)
        assert usage.returncode == 2 and "names no state directory" in usage.stderr


def test_a_state_dir_whose_manager_died_before_its_journal_is_stale(tmp_path: Path) -> None:
    """A lock file and an empty mem/ (a manager killed before it journaled anything): no
    runtime directory to name, nothing to adopt."""
    early = tmp_path / "early"
    (early / "mem").mkdir(parents=True)
    (early / "state.lock").write_text("123\n")
    info = statelist.describe(early)
    assert info.status == "new" and info.runtime_dir is None and info.holder is None
    with pytest.raises(statelist.RemovalRefused, match="a manager may be creating it"):
        statelist.remove(early)  # made a moment ago: a manager may be starting on it
    past = time.time() - statelist.NEW_FOR - 1
    os.utime(early, (past, past))
    assert statelist.describe(early).status == "stale"
    statelist.remove(early)
    assert not early.exists()


def test_a_state_dir_with_an_unreadable_journal_is_kept_unless_forced(tmp_path: Path) -> None:
    """A journal with the right magic that does not decode (corrupt, or written by a later
    release that a manager of that release may adopt) is not taken for stale."""
    odd = tmp_path / "odd"
    (odd / "mem").mkdir(parents=True)
    (odd / "mem" / "1.membacking:ram").write_bytes(b"x" * 4096)
    (odd / "journal").write_bytes(journal.MAGIC + b"\xff" * 40)
    info = statelist.describe(odd)
    assert info.status == "unreadable" and info.problem and info.memory_files == 1
    text = run_cli("manager", "state", "list", "--state-dir", str(odd)).stdout
    assert f"{odd}: unreadable: {info.problem}" in text, text  # why, not only in --json
    refused = run_cli("manager", "state", "remove", str(odd))
    said = " ".join(refused.stderr.split())
    assert refused.returncode == 1 and "cannot be read" in said and "--force" in said, said
    assert odd.exists()
    assert run_cli("manager", "state", "remove", "--force", str(odd)).returncode == 0
    assert not odd.exists()


def test_remove_state_of_frees_a_killed_managers_default_state(start_manager: Start) -> None:
    killed = start_manager(*REGION)
    killed.stop(signal.SIGKILL)
    default = default_state_dir(RuntimePaths.resolve(killed.runtime_dir))
    assert journal.read(default / "journal") is not None
    assert statelist.remove_state_of(killed.runtime_dir) == [default]
    assert not default.exists()
    running = start_manager(*REGION)  # one a manager holds is left alone
    held = default_state_dir(RuntimePaths.resolve(running.runtime_dir))
    assert statelist.remove_state_of(running.runtime_dir) == [] and held.exists()


def test_a_refused_start_leaves_no_runtime_dir_it_created(
    start_manager: Start, state_dirs: Callable[[], Path]
) -> None:
    shared = state_dirs()
    start_manager(*REGION, "--state-dir", str(shared))
    base = short_tmpdir()
    try:
        runtime = base / "new" / "rt"
        refused = run_cli(
            "manager", "run", "--runtime-dir", str(runtime), "--state-dir", str(shared)
        )
        assert refused.returncode == 1 and "in use by another membacking manager" in refused.stderr
        assert not (base / "new").exists(), os.listdir(base / "new")
        # a runtime directory that was there before stays, with what it held
        (base / "old").mkdir()
        (base / "old" / "keep").touch()
        refused = run_cli(
            "manager", "run", "--runtime-dir", str(base / "old"), "--state-dir", str(shared)
        )
        assert refused.returncode == 1
        assert sorted(os.listdir(base / "old")) == ["keep"]
        # refused at its last step, the metrics port (taken by another process), with its
        # state adopted and its sockets bound: nothing it created stays either
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = str(taken.getsockname()[1])
            refused = run_cli(
                "manager", "run", "--runtime-dir", str(runtime), *REGION, "--metrics-port", port
            )
        said = " ".join(refused.stderr.split())
        assert refused.returncode == 1 and "cannot serve metrics" in said, said
        assert "Traceback" not in said
        assert not (base / "new").exists(), os.listdir(base / "new")
    finally:
        shutil.rmtree(base, ignore_errors=True)


INNER = """
import os
import signal

from conftest import launch_manager, short_tmpdir


def test_kills_its_manager():
    running = launch_manager(short_tmpdir(), "--region", "ram=0:1M")
    running.stop(signal.SIGKILL)
    with open(os.environ["MB_INNER_OUT"], "a") as out:
        out.write(f"killed {running.runtime_dir} {running.pid}\\n")


def test_leaves_its_manager_running():
    if os.environ.get("MB_INNER_LEAK") != "1":
        return
    running = launch_manager(short_tmpdir(), "--region", "ram=0:1M")
    with open(os.environ["MB_INNER_OUT"], "a") as out:
        out.write(f"running {running.runtime_dir} {running.pid}\\n")
"""


def test_a_test_run_leaves_no_state_dir_and_fails_when_one_is_held(tmp_path: Path) -> None:
    """The cleanup in conftest.py: the state a killed manager kept for a test's runtime
    directory is removed after that test; one a manager left running still holds at the end
    of the session fails it, naming the runtime directory."""
    suite = tmp_path / "suite"
    suite.mkdir()
    shutil.copy(Path(__file__).with_name("conftest.py"), suite / "conftest.py")
    (suite / "test_inner.py").write_text(INNER)
    out = tmp_path / "out"
    results = {}
    for leak in ("0", "1"):
        env = {**os.environ, "MB_INNER_OUT": str(out), "MB_INNER_LEAK": leak}
        results[leak] = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(suite)],
            cwd=suite,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    lines = [line.split() for line in out.read_text().splitlines()]
    running = [(Path(r), int(pid)) for what, r, pid in lines if what == "running"]
    try:
        clean = results["0"]
        assert clean.returncode == 0, clean.stdout + clean.stderr
        assert "state directories left by 1 tests, removed after them" in clean.stdout
        for what, runtime, _ in lines:
            if what == "killed":
                assert not default_state_dir(RuntimePaths.resolve(runtime)).exists()
        leaky = results["1"]
        assert leaky.returncode == 1, leaky.stdout + leaky.stderr
        [(runtime, _)] = running
        assert f"a state directory of {runtime} is left on /dev/shm" in leaky.stdout
    finally:
        for runtime, pid in running:  # the manager the inner run left running
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while statelist.remove_state_of(runtime) == [] and time.monotonic() < deadline:
                if not default_state_dir(RuntimePaths.resolve(runtime)).exists():
                    break
                time.sleep(0.05)
            shutil.rmtree(runtime, ignore_errors=True)


def test_remove_stale_says_when_a_state_dir_given_is_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`remove --stale --state-dir X` with X no state directory (a typo, a symbolic link)
    exits 1 and says why, as `state list` does; the stale ones found are removed all the
    same. (The default place is an empty directory here: this machine's own state directories
    are not touched.)"""
    from click.testing import CliRunner

    from membacking.cli import cli

    monkeypatch.setattr(statelist, "DEFAULT_PARENT", tmp_path / "default")
    listed_anyway = tmp_path / "default" / f"membacking-{os.getuid()}-0123456789abcdef"
    (listed_anyway / "mem").mkdir(parents=True)
    (listed_anyway / "state.lock").touch()
    to_default = tmp_path / "to-default"  # a link to a state directory listed anyway
    to_default.symlink_to(listed_anyway)
    early = tmp_path / "early"  # a manager killed before its first journal, long ago: stale
    (early / "mem").mkdir(parents=True)
    (early / "state.lock").write_text("123\n")
    past = time.time() - statelist.NEW_FOR - 1
    os.utime(early, (past, past))
    link = tmp_path / "link"
    link.symlink_to(early)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    runner = CliRunner()
    for junk, why in (
        (tmp_path / "typo", "does not exist"),
        (link, "is a symbolic link"),
        (to_default, "is a symbolic link"),
        (a_file, "not a directory"),
    ):
        done = runner.invoke(
            cli, ["manager", "state", "remove", "--stale", "--state-dir", str(junk)]
        )
        assert done.exit_code == 1 and why in done.output and "not looked at" in done.output
        assert early.exists()
        listed = runner.invoke(cli, ["manager", "state", "list", "--state-dir", str(junk)])
        assert listed.exit_code == 1 and why in listed.output, listed.output
    assert a_file.read_text() == "mine"
    done = runner.invoke(
        cli,
        [
            "manager",
            "state",
            "remove",
            "--stale",
            "--state-dir",
            str(tmp_path / "typo"),
            "--state-dir",
            str(early),
            "--json",
        ],
    )
    assert done.exit_code == 1, done.output
    answer = json.loads(done.stdout)
    assert [e["path"] for e in answer["removed"]] == [str(early)]
    assert [e["path"] for e in answer["refused"]] == [str(tmp_path / "typo")]
    assert not early.exists()
