"""The conformance check of docs/PROTOCOL.md: a scripted manager that drives a mapper under test
through the protocol's cases (hostile ones included) and names the clauses it violates. Run it
with `membacking conformance -- COMMAND...`.
"""

from .cases import CLAUSES, Report, run

__all__ = ["CLAUSES", "Report", "run"]
