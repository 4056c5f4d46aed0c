"""Fault-injection fixtures: the per-scenario summary lines are collected, printed at the end of the run
and written as a Markdown table to <pytest basetemp>/fault-summary.md (and $PRODCAT_FAULT_REPORT if set)."""
from __future__ import annotations

import os

import pytest

from tests.faults.harness import Outcome

HEADER = ("| scenario | N | lost | duplicates | DLQ | recovery s | note |\n"
          "|---|---:|---:|---:|---:|---:|---|")
_rows: list[Outcome] = []


@pytest.fixture
def report():
    """Call with the Outcome of a scenario: it joins the summary table."""
    return _rows.append


def pytest_terminal_summary(terminalreporter, config):
    if not _rows:
        return
    table = "\n".join([HEADER, *(o.row() for o in _rows)]) + "\n"
    terminalreporter.write_sep("=", "fault-injection summary")
    for o in _rows:
        terminalreporter.write_line(o.line())
    terminalreporter.write_line("")
    terminalreporter.write(table)
    paths = [os.path.join(str(config._tmp_path_factory.getbasetemp()), "fault-summary.md")]
    if os.environ.get("PRODCAT_FAULT_REPORT"):
        paths.append(os.environ["PRODCAT_FAULT_REPORT"])
    for path in paths:
        with open(path, "w") as f:
            f.write(table)
    terminalreporter.write_line(f"table written to {', '.join(paths)}")
