"""The conformance check (`membacking conformance`) against the Python mapper and the foreign
mini mapper, which both conform, and against mini mappers with a defect on purpose, which it must
name by clause."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from membacking.conformance import CLAUSES, run
from membacking.conformance.harness import Violation

from conftest import run_cli

TESTS = Path(__file__).parent
MINI = [sys.executable, str(TESTS / "foreign" / "mini_mapper.py")]
PYTHON_MAPPER = [sys.executable, str(TESTS / "worker.py"), "{runtime_dir}", "conformance"]
PROTOCOL = (TESTS.parent / "docs" / "PROTOCOL.md").read_text()


def clauses_violated(violations: list[Violation]) -> set[str]:
    return {v.clause for v in violations}


@pytest.mark.parametrize("command", [PYTHON_MAPPER, MINI], ids=["python", "foreign"])
def test_both_mappers_conform(command: list[str]) -> None:
    report = run(command, timeout=10)
    assert report.ok, [str(v) for v in report.violations] + report.stderr
    assert "detach" in report.passed and "shutdown" in report.passed
    assert "evicted_while_stopped" in report.passed


def test_a_mapper_that_offers_no_features_conforms(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hello without a feature mask (the earlier layout): no tags, Detach not acknowledged."""
    monkeypatch.setenv("MINI_MAPPER_DEFECTS", "plain-hello")
    report = run(MINI, timeout=10)
    assert report.ok, [str(v) for v in report.violations] + report.stderr


@pytest.mark.parametrize(
    ("defect", "clause"),
    [
        ("ack-only-held", "UNMAP-ACK"),
        ("crash-on-junk", "ROBUST"),
        ("keep-fds", "RELEASE-CLOSE"),
        ("no-lease", "LEASE"),
    ],
)
def test_the_checker_names_the_clause_a_defect_violates(
    defect: str, clause: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MINI_MAPPER_DEFECTS", defect)
    report = run(MINI, timeout=2)
    assert clause in clauses_violated(report.violations), [str(v) for v in report.violations]


def test_a_mapper_still_running_after_quit_is_a_violation_not_a_crash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After Shutdown a Detach is never answered: a mapper that sends one on `quit` and waits for
    the DetachAck is reported under SHUTDOWN (the checker once died of TimeoutExpired)."""
    monkeypatch.setenv("MINI_MAPPER_DEFECTS", "wait-after-shutdown")
    report = run(MINI, timeout=1)
    shutdown = [v for v in report.violations if v.clause == "SHUTDOWN"]
    assert shutdown and "still running 1 s later" in shutdown[0].detail, [
        str(v) for v in report.violations
    ]
    assert "shutdown" not in report.passed


def test_a_mapper_that_hangs_up_after_hello_is_reported_not_a_crash() -> None:
    """The checker's Welcome meets a closed fd.sock: a violation, not a BrokenPipeError."""
    hangs_up = (
        "import os, socket, time\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
        "s.connect(os.environ['MEMBACKING_RUNTIME_DIR'] + '/fd.sock')\n"
        "s.send(bytes.fromhex('930101a4766d2d31'))\n"  # Hello("vm-1")
        "s.close()\n"
        "time.sleep(30)\n"
    )
    report = run([sys.executable, "-c", hangs_up], timeout=0.5)
    assert clauses_violated(report.violations) <= {"ROBUST", "REG-ATTACH"}
    assert report.violations and not report.passed


def test_a_mapper_that_never_registers_violates_reg_hello() -> None:
    report = run([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    assert clauses_violated(report.violations) == {"REG-HELLO"}


def test_every_clause_is_in_the_specification() -> None:
    in_doc = set(re.findall(r"\[([A-Z]+(?:-[A-Z]+)*)\]", PROTOCOL))
    assert set(CLAUSES) <= in_doc, set(CLAUSES) - in_doc


def test_the_cli_runs_it(tmp_path: Path) -> None:
    import subprocess

    env = {**os.environ, "MINI_MAPPER_DEFECTS": "ack-only-held"}
    bad = subprocess.run(
        [sys.executable, "-m", "membacking", "conformance", "--timeout", "2", "--", *MINI],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert bad.returncode == 1
    assert "FAIL  UNMAP-ACK" in bad.stdout
    listed = subprocess.run(
        [sys.executable, "-m", "membacking", "conformance", "--clauses"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0 and "RELEASE-CLOSE" in listed.stdout


def test_a_command_that_cannot_start_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    """A mistyped command is an error of one line (it was a traceback), and the private
    runtime directory made for the run is removed."""
    before = set(Path("/tmp").glob("mbconf-*"))
    done = run_cli("conformance", "--", str(tmp_path / "no-such-mapper"))
    assert done.returncode == 1, done
    assert done.stderr.strip() == (
        f"Error: cannot start {tmp_path / 'no-such-mapper'}: No such file or directory"
    ), done.stderr
    assert set(Path("/tmp").glob("mbconf-*")) <= before
