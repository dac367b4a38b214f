"""The model registry: versioned boosters on disk, verified before they are trusted.

Layout (root = ``Settings.models_dir``)::

    models/<model>/<version>/*.ubj         XGBoost boosters (UBJSON, never pickles)
    models/<model>/<version>/*.json        side documents (e.g. the confidence calibrator)
    models/<model>/<version>/metadata.json features + feature_set_hash, data range, params,
                                           walk-forward metrics, versions, sha256 of every file
    models/<model>/current                 the served version (a one-line text file)

Why it is strict: a model that silently loads against a different feature definition, or whose
file was changed after training, produces plausible-looking nonsense. So loading checks every
file's sha256 and the feature-set hash and refuses with :class:`ModelLoadError` rather than guess.
Writes are atomic and durable: a version is written into a hidden temporary folder, every file
and the folder are fsynced, the folder is renamed into place, then ``current`` is swapped with
:func:`os.replace` and the model's folder fsynced, so neither a reader nor a power cut sees half a
model or a pointer to one. Old versions are kept for rollback (``promote`` an older one).

Names are checked wherever they come from (``current``, a pinned ``user_config``, the command
line): a version or model name is one path component of letters, digits, ``.``, ``_`` and ``-``,
never ``..`` -- a pointer cannot lead a loader out of the registry.

This module is on the inference path: it imports no training code and no Ray.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import xgboost as xgb

from features.errors import ModelLoadError, ModelNotFoundError

MODEL_NAMES: tuple[str, ...] = ("range_predictor", "tpsl_classifier", "signal_classifier", "meta_model")
METADATA_FILE = "metadata.json"
CURRENT_FILE = "current"
BOOSTER_SUFFIX = ".ubj"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(kind: str, name: str) -> str:
    """``name`` if it is a safe model or version name (one path component, no ``..``), else
    :class:`ModelNotFoundError` naming what was wrong (a pointer to nowhere serves nothing)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ModelNotFoundError(f"{kind} name {name!r} is not valid: one path component of letters, digits, "
                                 "'.', '_' and '-' (no '..', no separators)")
    return name


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def new_version(now: datetime | None = None) -> str:
    """A sortable, unique version id: UTC time to the second plus 4 random hex digits."""
    now = now or datetime.now(timezone.utc)
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + os.urandom(2).hex()


@dataclass(frozen=True)
class LoadedModel:
    """One verified model version: its boosters, side documents and metadata."""

    name: str
    version: str
    path: Path
    metadata: dict[str, Any]
    boosters: dict[str, xgb.Booster] = field(repr=False)
    documents: dict[str, Any] = field(default_factory=dict, repr=False)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable: fsync of the file alone is not."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class ModelRegistry:
    """Versioned models under ``root``; see the module docstring for the layout and guarantees.

    ``feature_hash`` is the feature-set hash this process computes (by default from the settings'
    feature parameters); a model trained with another one is refused at load time.
    """

    def __init__(self, root: str | Path, feature_hash: str | None = None) -> None:
        self.root = Path(root)
        if feature_hash is None:
            from configs.settings import get_settings
            from features.indicators import feature_set_hash

            feature_hash = feature_set_hash(get_settings().features)
        self.feature_hash = feature_hash

    # ---- queries -------------------------------------------------------------------------------
    def models(self) -> list[str]:
        """Models that have at least one complete version."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and self._version_dirs(p.name))

    def _version_dirs(self, model: str) -> list[str]:
        d = self.root / model
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and (p / METADATA_FILE).exists())

    def versions(self, model: str) -> list[str]:
        """Complete versions of ``model``, oldest first (version ids sort by creation time)."""
        versions = self._version_dirs(model)
        if not versions:
            raise ModelNotFoundError(f"no model {model!r} in registry {self.root} "
                                     f"(train one: python -m training.train --candles ... --out {self.root})")
        return versions

    def current(self, model: str) -> str:
        """The promoted version of ``model``; :class:`ModelNotFoundError` if there is none."""
        check_name("model", model)
        pointer = self.root / model / CURRENT_FILE
        try:
            version = pointer.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            self.versions(model)  # raises a clear error when the model does not exist at all
            raise ModelNotFoundError(f"model {model!r} in {self.root} has no current version; "
                                     f"promote one: python -m training.registry promote {model} <version>") from None
        check_name(f"model {model!r}: current points to a version whose", version)
        if not version or not (self.root / model / version / METADATA_FILE).exists():
            raise ModelNotFoundError(f"model {model!r}: current points to {version!r}, which does not exist")
        return version

    def metadata(self, model: str, version: str | None = None) -> dict[str, Any]:
        """A version's metadata.json (not verified: use :meth:`load` before trusting the model)."""
        version = version or self.current(model)
        return self._read_metadata(model, version)

    def _read_metadata(self, model: str, version: str) -> dict[str, Any]:
        path = self.root / check_name("model", model) / check_name("version", version) / METADATA_FILE
        if not path.exists():
            raise ModelNotFoundError(f"model {model!r} has no version {version!r} in {self.root}")
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"model {model!r} version {version!r}: unreadable {METADATA_FILE}: {exc}") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
            raise ModelLoadError(f"model {model!r} version {version!r}: {METADATA_FILE} lists no files")
        return meta

    # ---- loading -------------------------------------------------------------------------------
    def _verified_files(self, model: str, version: str, meta: Mapping[str, Any]) -> dict[str, bytes]:
        """Every listed file's bytes, checked against its sha256; unlisted model files are refused."""
        folder = self.root / model / version
        listed: dict[str, str] = meta["files"]
        present = {p.name for p in folder.iterdir() if p.is_file() and p.name != METADATA_FILE}
        extra = sorted(present - set(listed))
        if extra:
            raise ModelLoadError(f"model {model!r} version {version!r}: files not in {METADATA_FILE}: {extra}")
        out: dict[str, bytes] = {}
        for name, digest in listed.items():
            if Path(name).name != name:
                raise ModelLoadError(f"model {model!r} version {version!r}: bad file name {name!r} in metadata")
            try:
                data = (folder / name).read_bytes()
            except FileNotFoundError:
                raise ModelLoadError(f"model {model!r} version {version!r}: file {name} is missing") from None
            if sha256_bytes(data) != digest:
                raise ModelLoadError(f"model {model!r} version {version!r}: checksum mismatch for {name} "
                                     "(the file changed after training; retrain or restore it)")
            out[name] = data
        return out

    def verify(self, model: str, version: str) -> dict[str, Any]:
        """Check checksums and the feature-set hash without building boosters; returns the metadata."""
        meta = self._read_metadata(model, version)
        self._check_feature_hash(model, version, meta)
        self._verified_files(model, version, meta)
        return meta

    def _check_feature_hash(self, model: str, version: str, meta: Mapping[str, Any]) -> None:
        trained = meta.get("feature_set_hash")
        if trained != self.feature_hash:
            raise ModelLoadError(f"model {model!r} version {version!r} was trained on feature set {trained!r}, "
                                 f"this engine computes {self.feature_hash!r} (features or their parameters "
                                 "changed); retrain the models")

    def load(self, model: str, version: str | None = None) -> LoadedModel:
        """Load and verify a version (default: the current one).

        Raises :class:`ModelNotFoundError` when the model or version does not exist and
        :class:`ModelLoadError` when it exists but cannot be trusted (checksum, feature set, format).
        """
        version = version or self.current(model)
        meta = self._read_metadata(model, version)
        self._check_feature_hash(model, version, meta)
        files = self._verified_files(model, version, meta)
        boosters: dict[str, xgb.Booster] = {}
        documents: dict[str, Any] = {}
        for name, data in files.items():
            try:
                if name.endswith(BOOSTER_SUFFIX):
                    booster = xgb.Booster()
                    booster.load_model(bytearray(data))
                    boosters[name[: -len(BOOSTER_SUFFIX)]] = booster
                elif name.endswith(".json"):
                    documents[name[: -len(".json")]] = json.loads(data)
            except (xgb.core.XGBoostError, ValueError) as exc:
                raise ModelLoadError(f"model {model!r} version {version!r}: cannot read {name}: {exc}") from None
        return LoadedModel(model, version, self.root / model / version, meta, boosters, documents)

    # ---- writing -------------------------------------------------------------------------------
    def save(self, model: str, version: str, boosters: Mapping[str, xgb.Booster | bytes | bytearray],
             metadata: Mapping[str, Any], documents: Mapping[str, Any] | None = None,
             promote: bool = True) -> Path:
        """Write a new version atomically (temporary folder, then rename) and optionally promote it.

        ``boosters`` maps a name to a Booster (or its raw UBJSON bytes); each becomes ``<name>.ubj``.
        ``documents`` become ``<name>.json``. The metadata gets the feature-set hash of this registry
        unless it already names one, and a sha256 of every file.
        """
        check_name("model", model)
        check_name("version", version)
        model_dir = self.root / model
        model_dir.mkdir(parents=True, exist_ok=True)
        final = model_dir / version
        if final.exists():
            raise FileExistsError(f"{final} already exists: versions are immutable")
        tmp = Path(tempfile.mkdtemp(prefix=f".incoming-{version}-", dir=model_dir))
        try:
            files: dict[str, str] = {}
            for name, booster in boosters.items():
                raw = bytes(booster.save_raw("ubj")) if isinstance(booster, xgb.Booster) else bytes(booster)
                _write_durable(tmp / f"{name}{BOOSTER_SUFFIX}", raw)
                files[f"{name}{BOOSTER_SUFFIX}"] = sha256_bytes(raw)
            for name, doc in (documents or {}).items():
                raw = json.dumps(doc, indent=1, sort_keys=True).encode()
                _write_durable(tmp / f"{name}.json", raw)
                files[f"{name}.json"] = sha256_bytes(raw)
            meta = dict(metadata)
            meta.setdefault("feature_set_hash", self.feature_hash)
            meta.update(model=model, version=version, files=files)
            _write_durable(tmp / METADATA_FILE,
                           json.dumps(meta, indent=1, sort_keys=True, default=_json_default).encode())
            fsync_dir(tmp)  # the files' entries, before the folder becomes visible under its name
            os.replace(tmp, final)
            fsync_dir(model_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if promote:
            self.promote(model, version)
        return final

    def promote(self, model: str, version: str) -> None:
        """Make ``version`` the served one (verified first), swapping the pointer atomically."""
        self.verify(model, version)
        _atomic_write_text(self.root / model / CURRENT_FILE, version + "\n")


def _json_default(obj: Any) -> Any:
    """numpy scalars and arrays in metadata become plain JSON numbers and lists."""
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} in model metadata")


# ---- command line --------------------------------------------------------------------------------
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.registry", description="List and promote model versions.")
    parser.add_argument("--root", type=Path, default=None, help="registry folder (default: Settings.models_dir)")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="every model version; * marks the current one")
    p_list.add_argument("--json", action="store_true")
    p_promote = sub.add_parser("promote", help="make a version current (also rolls back to an older one)")
    p_promote.add_argument("model", choices=MODEL_NAMES)
    p_promote.add_argument("version")
    args = parser.parse_args(argv)
    if args.root is None:
        from configs.settings import get_settings

        args.root = get_settings().models_dir
    registry = ModelRegistry(args.root)
    try:
        if args.command == "list":
            return _list(registry, args.json)
        registry.promote(args.model, args.version)
        print(f"{args.model}: current -> {args.version}")
        return 0
    except (ModelNotFoundError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
