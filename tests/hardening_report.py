"""One line per area of the hardening suite (issue 13) in the test run's summary.

Why: "nothing failed" is only worth something next to what was tried. Each hardening test calls
:func:`record` with what it tried, how many cases and what failed (an empty list when the test
passed); ``pytest_terminal_summary`` in tests/conftest.py prints the lines at the end of the run.
"""

from __future__ import annotations

LINES: list[str] = []


def record(area: str, tried: str, count: int, failed: list[str] | None = None) -> None:
    failures = failed or []
    shown = "none" if not failures else f"{len(failures)}: " + "; ".join(failures[:5])
    LINES.append(f"{area}: tried {tried}; {count} cases; failed: {shown}")
