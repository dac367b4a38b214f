"""``python -m inference.registry``: list model versions, promote a set (or one model), roll back.

``promote-set <version>`` is how operators move the served models: all four of a version in one
atomic step (inference/registry.py explains the set pointer); rolling back is the same command with
an older version. ``promote <model> <version>`` moves one model and stays for special cases.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from configs.errors import ModelLoadError, ModelNotFoundError
from inference.registry import MODEL_NAMES, ModelRegistry


def _list(registry: ModelRegistry, as_json: bool) -> int:
    rows = []
    for model in registry.models():
        try:
            current = registry.current(model)
        except ModelNotFoundError:
            current = None
        for version in registry.versions(model):
            meta = registry.metadata(model, version)
            rows.append({"model": model, "version": version, "current": version == current,
                         "created": meta.get("created"), "data_range": meta.get("data_range"),
                         "feature_set_hash": meta.get("feature_set_hash"), "engine": meta.get("engine")})
    if as_json:
        print(json.dumps({"models": rows}, indent=1))
        return 0
    if not rows:
        print(f"no models in {registry.root}")
        return 0
    print(f"{'model':<18} {'version':<24} {'cur':<3} {'created':<25} {'data':<35} features")
    for r in rows:
        rng = r["data_range"] or {}
        data = f"{rng.get('start', '?')[:10]}..{rng.get('end', '?')[:10]}" if rng else "?"
        print(f"{r['model']:<18} {r['version']:<24} {'*' if r['current'] else '':<3} {str(r['created'])[:25]:<25} "
              f"{data:<35} {r['feature_set_hash']}")
    return 0


def _served(registry: ModelRegistry) -> str | None:
    """The served set in one word: its shared version, or model=version pairs when mixed."""
    try:
        versions = registry.current_versions()
    except ModelNotFoundError:
        return None
    shared = set(versions.values())
    return shared.pop() if len(shared) == 1 else ", ".join(f"{m}={v}" for m, v in versions.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inference.registry", description="List and promote model versions.")
    parser.add_argument("--root", type=Path, default=None, help="registry folder (default: Settings.models_dir)")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="every model version; * marks the current one")
    p_list.add_argument("--json", action="store_true")
    p_promote = sub.add_parser("promote", help="make one model's version current (prefer promote-set)")
    p_promote.add_argument("model", choices=MODEL_NAMES)
    p_promote.add_argument("version")
    p_set = sub.add_parser("promote-set", help="serve all four models of a version in one atomic step "
                                               "(also rolls back: promote-set an older version)")
    p_set.add_argument("version", help="the version id the four models share (`list` shows them)")
    args = parser.parse_args(argv)
    if args.root is None:
        from configs.settings import get_settings

        args.root = get_settings().models_dir
    registry = ModelRegistry(args.root)
    try:
        if args.command == "list":
            return _list(registry, args.json)
        if args.command == "promote-set":
            before = _served(registry)
            registry.promote_set(args.version)
            print(f"current set -> {args.version} (before: {before or 'none'})")
            return 0
        registry.promote(args.model, args.version)
        print(f"{args.model}: current -> {args.version}")
        return 0
    except (ModelNotFoundError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

