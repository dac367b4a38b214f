"""Run the shell commands of README.md and docs/*.md as a new user would: from a fresh copy.

    .venv/bin/python scripts/check_docs.py                 # every runnable block (fast and slow), fresh copy
    .venv/bin/python scripts/check_docs.py --fast          # only the blocks the suite runs
    .venv/bin/python scripts/check_docs.py --list          # every shell block with its marker
    .venv/bin/python scripts/check_docs.py --match backtest --in-place   # here, with ../shared if present

Every fenced ``bash``/``sh``/``shell``/``cron`` block must carry a marker on the line before it
(docs/README.md says which to choose):

    <!-- docs-test: fast -->            run by the suite (tests/test_docs_commands.py), seconds
    <!-- docs-test: slow -->            run by this script (training, backtests, benchmarks)
    <!-- docs-test: skip (why) -->      never run (a cluster, Docker, a live exchange); the reason says
                                        which test covers it instead

Whatever the marker, the repository paths a block names (``serve_config.yaml``, ``bench/x.py``,
``.venv/bin/serve``, the module of every ``python -m``) must exist, unless the block creates them
first (``cp``, ``mkdir``, ``--out``, ``--report``, ``>``). A runnable block runs with
``bash -euo pipefail`` from the root of a fresh copy of the working tree (the files git tracks or
would track, no models/, no ../shared beside it: the sample fallbacks are what runs) with ``.venv``
linked to the running interpreter's environment. Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHELL_FENCES = ("bash", "sh", "shell", "cron")
MARKER = re.compile(r"<!--\s*docs-test:\s*(fast|slow|skip)\s*(?:\((.*)\))?\s*-->")
# Tokens that name a file of the repository: a known top-level entry, or a relative path with a suffix.
TOP_LEVEL = ("bench/", "configs/", "data/", "deployments/", "docs/", "features/", "ops/", "scripts/",
             "tests/", "training/", ".venv/")
SUFFIXES = (".py", ".yaml", ".yml", ".json", ".md", ".sh", ".toml", ".parquet", ".example", ".lock", ".txt")
CREATES = ("--out", "--report", "--wf-dir", "-o", "--output")


@dataclass(frozen=True)
class Block:
    """One fenced shell block of a Markdown file and what its marker says."""

    file: str  # relative to the repository root
    line: int  # of the opening fence
    fence: str
    kind: str | None  # fast | slow | skip | None (unmarked)
    reason: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def script(self) -> str:
        """What runs: a crontab's lines reduced to their commands (variables exported first)."""
        if self.fence != "cron":
            return self.text
        out = []
        for raw in self.text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", line):
                out.append("export " + line)
            else:
                out.append(line.split(None, 5)[5])
        return "\n".join(out) + "\n"


def doc_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def extract_blocks(path: Path, root: Path = ROOT) -> list[Block]:
    """Every shell fence of ``path`` with the marker on the line before it (if any)."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\w+)\s*$", lines[i])
        if not m:
            i += 1 if not lines[i].startswith("```") else _skip_fence(lines, i)
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
        if m.group(1) in SHELL_FENCES:
            marker = MARKER.search(lines[i - 1]) if i else None
            blocks.append(Block(str(path.relative_to(root)), i + 1, m.group(1),
                                marker.group(1) if marker else None,
                                (marker.group(2) or "") if marker else "", "\n".join(lines[i + 1:end]) + "\n"))
        i = end + 1
    return blocks


def _skip_fence(lines: list[str], i: int) -> int:
    """Length of an unnamed fence starting at ``i`` (its content is not read as fences)."""
    end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
    return end - i + 1


def all_blocks(root: Path = ROOT) -> list[Block]:
    return [b for f in doc_files(root) for b in extract_blocks(f, root)]


def _words(text: str) -> list[list[str]]:
    """Shell words of each logical line (continuations joined, comments dropped)."""
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        try:
            out.append(shlex.split(line, comments=True))
        except ValueError:
            out.append(line.split())
    return out


def _is_repo_path(token: str) -> bool:
    if not token or token[0] in "-$/~<{" or "://" in token or "$" in token or token.startswith(".."):
        return False
    return token.startswith(TOP_LEVEL) or (token.endswith(SUFFIXES) and "*" not in token and " " not in token)


def missing_paths(block: Block, root: Path) -> list[str]:
    """Repository paths and ``python -m`` modules the block names that do not exist (and it does not create)."""
    created: set[str] = set()
    missing: list[str] = []
    for words in _words(block.script()):
        for k, w in enumerate(words):
            prev = words[k - 1] if k else ""
            value = (w.split("=", 1)[1] if re.match(r"^[A-Za-z_]+=", w) else w).rstrip(";)}|&")
            if prev in CREATES or prev in (">", ">>") or (words[0] in ("cp", "mkdir", "touch") and k == len(words) - 1):
                created.add(value.rstrip("/"))
                continue
            if prev == "-m" and k >= 2 and "python" in words[k - 2]:
                if not _module_file(root, value) and not _importable(value):
                    missing.append(f"python -m {value}")
                continue
            if _is_repo_path(value) and not any(value == c or value.startswith(c + "/") for c in created):
                if not _resolve(root, value).exists():
                    missing.append(value)
    return missing


def _resolve(root: Path, rel: str) -> Path:
    """``.venv/...`` is the environment running this check (a checkout's own .venv, or the one the
    suite runs in); anything else is relative to the repository root."""
    return Path(sys.prefix) / rel[len(".venv/"):] if rel.startswith(".venv/") else root / rel


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def _module_file(root: Path, module: str) -> bool:
    base = root.joinpath(*module.split("."))
    return base.with_suffix(".py").exists() or (base / "__main__.py").exists()


def fresh_copy(dest: Path, root: Path = ROOT) -> Path:
    """The working tree as a fresh clone would have it (tracked + untracked-not-ignored files), plus
    ``.venv`` linked to this interpreter's environment."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=root, capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = root / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / ".venv").symlink_to(Path(sys.prefix))
    return dest


def run_block(block: Block, cwd: Path, timeout: float) -> tuple[bool, str, float]:
    """Run one block with ``bash -euo pipefail``; (ok, output tail, seconds)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "MLE_"))}
    env.update(PYTHONPATH=str(cwd), RAY_USAGE_STATS_ENABLED="0", PYTHONDONTWRITEBYTECODE="1")
    t0 = time.monotonic()
    try:
        res = subprocess.run(["bash", "-euo", "pipefail", "-c", block.script()], cwd=cwd, env=env,
                             capture_output=True, text=True, timeout=timeout)
        ok, out = res.returncode == 0, f"exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    except subprocess.TimeoutExpired as exc:
        ok, out = False, f"timed out after {timeout:.0f} s\n{exc.stdout or ''}"[-3000:]
    return ok, out, time.monotonic() - t0


def problems_without_running(blocks: list[Block], root: Path = ROOT) -> list[str]:
    """Unmarked blocks and missing paths: what every block must satisfy whatever its marker."""
    out = [f"{b.where}: shell block without a <!-- docs-test: ... --> marker" for b in blocks if b.kind is None]
    out += [f"{b.where}: skip needs a reason" for b in blocks if b.kind == "skip" and not b.reason.strip()]
    for b in blocks:
        out += [f"{b.where}: no such path or module: {m}" for m in missing_paths(b, root)]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fast", action="store_true", help="only the blocks marked fast")
    p.add_argument("--match", default=None, help="only blocks whose file:line or text contains this")
    p.add_argument("--in-place", action="store_true", help="run in this checkout instead of a fresh copy")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per block")
    p.add_argument("--list", action="store_true", help="list the blocks and exit")
    args = p.parse_args(argv)
    blocks = all_blocks()
    if args.list:
        for b in blocks:
            print(f"{b.where:<28} {b.kind or 'UNMARKED':<5} {b.reason or b.text.splitlines()[0][:70]}")
        return 0
    failures = problems_without_running(blocks)
    kinds = ("fast",) if args.fast else ("fast", "slow")
    todo = [b for b in blocks if b.kind in kinds and (not args.match or args.match in b.where + b.text)]
    with tempfile.TemporaryDirectory(prefix="mle-docs-") as tmp:
        cwd = ROOT if args.in_place else fresh_copy(Path(tmp) / "ml-engine")
        for b in todo:
            ok, out, secs = run_block(b, cwd, args.timeout)
            print(f"{'ok  ' if ok else 'FAIL'} {b.where:<28} {b.kind:<5} {secs:7.1f} s", flush=True)
            if not ok:
                failures.append(f"{b.where}: {out}")
    for f in failures:
        print(f, file=sys.stderr)
    print(f"{len(todo)} blocks run, {len(failures)} problems")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
