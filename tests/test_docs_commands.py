"""Every command README.md and docs/*.md show runs as shown from a fresh clone (issue 17, point 1).

The blocks and their markers are read by scripts/check_docs.py (docs/README.md has the convention):
here every shell block must be marked, every path it names must exist, and the blocks marked
``fast`` run from a fresh copy of the working tree. The ``slow`` ones (training, backtests,
benchmarks) run with ``.venv/bin/python scripts/check_docs.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts import check_docs

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = check_docs.all_blocks(ROOT)
FAST = [b for b in BLOCKS if b.kind == "fast"]


def test_every_shell_block_is_marked_and_names_only_existing_paths():
    assert len(BLOCKS) >= 15, [b.where for b in BLOCKS]  # README and docs really were read
    assert check_docs.problems_without_running(BLOCKS, ROOT) == []


def test_the_checker_catches_what_issue_17_found(tmp_path):
    """The broken commands of the issue, in a doc of their own: each is reported."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(
        "```bash\nmake test\n```\n\n"
        "<!-- docs-test: slow -->\n```bash\n.venv/bin/python -m training.evaluate --models models "
        "--candles BTCUSDT_5m.parquet \\\n    ETHUSDT_5m.parquet --start 2025-07-01\n```\n\n"
        "<!-- docs-test: skip -->\n```bash\ndocker compose --env-file ops/compose.env up -d\n```\n\n"
        "<!-- docs-test: fast -->\n```bash\ncp ops/compose.env.example ops/compose.env\n"
        "docker compose --env-file ops/compose.env config\n.venv/bin/python -m training.no_such_module\n```\n")
    (tmp_path / "ops").mkdir()
    (tmp_path / "ops" / "compose.env.example").write_text("")
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "evaluate.py").write_text("")
    found = check_docs.problems_without_running(check_docs.all_blocks(tmp_path), tmp_path)
    assert found == [
        "README.md:1: shell block without a <!-- docs-test: ... --> marker",
        "README.md:12: skip needs a reason",
        "README.md:6: no such path or module: BTCUSDT_5m.parquet",
        "README.md:6: no such path or module: ETHUSDT_5m.parquet",
        "README.md:12: no such path or module: ops/compose.env",
        "README.md:17: no such path or module: python -m training.no_such_module",
    ]


def test_a_failing_command_fails_its_block(tmp_path):
    block = check_docs.Block("x.md", 1, "bash", "fast", "", "true\nls no-such-file\necho never\n")
    ok, out, _ = check_docs.run_block(block, tmp_path, timeout=30)
    assert not ok and "exit 2" in out and "never" not in out


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    return check_docs.fresh_copy(tmp_path_factory.mktemp("clone") / "ml-engine", ROOT)


def test_the_fresh_copy_is_what_a_clone_has(fresh):
    assert (fresh / "data" / "sample" / "BTCUSDT_5m.parquet").exists()
    assert not (fresh / "models").exists() and not (fresh.parent / "shared").exists()
    assert (fresh / ".venv" / "bin" / "python").exists()


@pytest.mark.parametrize("block", FAST, ids=[b.where for b in FAST])
def test_fast_block_runs_from_a_fresh_copy(block, fresh):
    ok, out, _ = check_docs.run_block(block, fresh, timeout=120)
    assert ok, f"{block.where}:\n{block.text}\n{out}"
