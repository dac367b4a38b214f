"""The model registry: versioned boosters on disk, verified before they are trusted.

Layout (root = ``Settings.models_dir``)::

    models/<model>/<version>/*.ubj         XGBoost boosters (UBJSON, never pickles)
    models/<model>/<version>/*.json        side documents (e.g. the confidence calibrator)
    models/<model>/<version>/metadata.json features + feature_set_hash, data range, params,
                                           walk-forward metrics, versions, sha256 of every file
    models/<model>/current                 that model's promoted version (a one-line text file)
    models/current_set.json                the served set: {"versions": {model: version, ...}}, swapped
                                           by promote-set with one os.replace (all four at once)

Why it is strict: a model that silently loads against a different feature definition, or whose
file was changed after training, produces plausible-looking nonsense. So loading checks every
file's sha256 and the feature-set hash and refuses with :class:`ModelLoadError` rather than guess.
Writes are atomic and durable: a version is written into a hidden temporary folder, every file
and the folder are fsynced, the folder is renamed into place, then ``current`` is swapped with
:func:`os.replace` and the model's folder fsynced, so neither a reader nor a power cut sees half a
model or a pointer to one. Old versions are kept for rollback (``promote-set`` an older one).

Why a set pointer: the four models are one ensemble (the meta-model is trained on the others'
outputs), so they must move together. Four per-model ``current`` swaps leave a moment where a
reader sees a mixed set, and a crash between them leaves one for good. ``current_set.json`` names
all four and is replaced in one :func:`os.replace`; readers (:meth:`ModelRegistry.current_versions`,
:meth:`ModelRegistry.current`) consult it first and fall back to the per-model files in a registry
that has none. ``promote <model> <version>`` still moves one model: it rewrites the set with that
one entry changed (one replace again) and the model's ``current`` file.

Names are checked wherever they come from (``current``, a pinned ``user_config``, the command
line): a version or model name is one path component of letters, digits, ``.``, ``_`` and ``-``,
never ``..`` -- a pointer cannot lead a loader out of the registry.

This module is on the inference path: it imports no training code and no Ray.
"""

from __future__ import annotations

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
from typing import TYPE_CHECKING, Any, Mapping

from configs.errors import ModelLoadError, ModelNotFoundError
from inference.layout import MODEL_NAMES

if TYPE_CHECKING:
    import xgboost as xgb


METADATA_FILE = "metadata.json"
CURRENT_FILE = "current"
CURRENT_SET_FILE = "current_set.json"
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

    @property
    def booster_names(self) -> frozenset[str]:
        """The boosters this version holds (its verified file list), loaded or not: the consistency
        checks read this, so a set loaded without boosters (the router's) is checked the same way."""
        return frozenset(name[: -len(BOOSTER_SUFFIX)] for name in self.metadata.get("files", {})
                         if name.endswith(BOOSTER_SUFFIX))


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

    def current_set(self) -> dict[str, str] | None:
        """The set pointer's versions (model -> version), None in a registry without one."""
        path = self.root / CURRENT_SET_FILE
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(f"{path} is unreadable ({exc}); promote a set: python -m inference.registry "
                                     "promote-set <version>") from None
        versions = doc.get("versions") if isinstance(doc, dict) else None
        if not isinstance(versions, dict) or set(versions) != set(MODEL_NAMES):
            raise ModelNotFoundError(f"{path} must name a version of every model {list(MODEL_NAMES)}")
        return {m: check_name(f"{CURRENT_SET_FILE}: {m}'s version", versions[m]) for m in MODEL_NAMES}

    def current_versions(self) -> dict[str, str]:
        """The served set, read at one instant: the set pointer if there is one, else each ``current``."""
        versions = self.current_set()
        if versions is None:
            return {m: self._current_file(m) for m in MODEL_NAMES}
        for model, version in versions.items():
            if not (self.root / model / version / METADATA_FILE).exists():
                raise ModelNotFoundError(f"{CURRENT_SET_FILE}: {model} version {version!r} does not exist")
        return versions

    def current(self, model: str) -> str:
        """The promoted version of ``model`` (the set pointer's, if any); :class:`ModelNotFoundError` if none."""
        check_name("model", model)
        versions = self.current_set() if model in MODEL_NAMES else None
        if versions is not None:
            version = versions[model]
            if not (self.root / model / version / METADATA_FILE).exists():
                raise ModelNotFoundError(f"{CURRENT_SET_FILE}: {model} version {version!r} does not exist")
            return version
        return self._current_file(model)

    def _current_file(self, model: str) -> str:
        check_name("model", model)
        pointer = self.root / model / CURRENT_FILE
        try:
            version = pointer.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            self.versions(model)  # raises a clear error when the model does not exist at all
            raise ModelNotFoundError(f"model {model!r} in {self.root} has no current version; "
                                     f"promote a set: python -m inference.registry promote-set <version>") from None
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

    def load(self, model: str, version: str | None = None, boosters: bool = True) -> LoadedModel:
        """Load and verify a version (default: the current one).

        Raises :class:`ModelNotFoundError` when the model or version does not exist and
        :class:`ModelLoadError` when it exists but cannot be trusted (checksum, feature set, format).
        ``boosters=False`` builds no booster (``LoadedModel.boosters`` is empty) but verifies every
        file all the same: a process that only composes forecasts (the router) holds the metadata
        and documents, yet still refuses a set whose boosters a pool could not load.
        """
        version = version or self.current(model)
        meta = self._read_metadata(model, version)
        self._check_feature_hash(model, version, meta)
        files = self._verified_files(model, version, meta)
        documents: dict[str, Any] = {}
        for name, data in files.items():
            if name.endswith(".json"):
                try:
                    documents[name[: -len(".json")]] = json.loads(data)
                except ValueError as exc:
                    raise ModelLoadError(f"model {model!r} version {version!r}: cannot read {name}: {exc}") from None
        loaded = _boosters(model, version, files) if boosters else {}
        return LoadedModel(model, version, self.root / model / version, meta, loaded, documents)

    # ---- writing -------------------------------------------------------------------------------
    def save(self, model: str, version: str, boosters: Mapping[str, xgb.Booster | bytes | bytearray],
             metadata: Mapping[str, Any], documents: Mapping[str, Any] | None = None,
             promote: bool = True) -> Path:
        """Write a new version atomically (temporary folder, then rename) and optionally promote it.

        ``boosters`` maps a name to a Booster (or its raw UBJSON bytes); each becomes ``<name>.ubj``.
        ``documents`` become ``<name>.json``. The metadata gets the feature-set hash of this registry
        unless it already names one, and a sha256 of every file.
        """
        import xgboost as xgb

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
        """Make ``version`` the served one of ``model`` (verified first), swapping the pointers atomically."""
        self.verify(model, version)
        versions = self.current_set()
        if versions is not None:  # the set pointer is what readers follow: move this one model in it
            self._write_set({**versions, model: version})
        _atomic_write_text(self.root / model / CURRENT_FILE, version + "\n")

    def promote_set(self, versions: str | Mapping[str, str]) -> dict[str, str]:
        """Serve ``versions`` (one id for all four models, or model -> version) in one atomic step.

        Every model is verified first; then ``current_set.json`` is replaced once (readers switch
        to all four together), then the per-model ``current`` files follow for tools that read them."""
        wanted = {m: versions for m in MODEL_NAMES} if isinstance(versions, str) else dict(versions)
        if set(wanted) != set(MODEL_NAMES):
            raise ModelNotFoundError(f"a model set names every model {list(MODEL_NAMES)}, not {sorted(wanted)}")
        missing = [m for m in MODEL_NAMES if not (self.root / m / check_name("version", wanted[m]) / METADATA_FILE)
                   .exists()]
        if missing:
            raise ModelNotFoundError(f"no version {wanted[missing[0]]!r} of {', '.join(missing)} in {self.root}: "
                                     "nothing was promoted")
        for model in MODEL_NAMES:
            self.verify(model, wanted[model])
        self._write_set(wanted)
        for model in MODEL_NAMES:
            _atomic_write_text(self.root / model / CURRENT_FILE, wanted[model] + "\n")
        return wanted

    def _write_set(self, versions: Mapping[str, str]) -> None:
        doc = {"versions": {m: versions[m] for m in MODEL_NAMES},
               "promoted_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self.root.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(self.root / CURRENT_SET_FILE, json.dumps(doc, indent=1) + "\n")


def _boosters(model: str, version: str, files: Mapping[str, bytes]) -> dict[str, "xgb.Booster"]:
    """The version's boosters built from their verified bytes. XGBoost is imported here, not with
    this module: it brings scikit-learn and SciPy, about 115 MiB in a process that only composes
    forecasts from the documents (the router, the ingress)."""
    import xgboost as xgb

    out: dict[str, xgb.Booster] = {}
    for name, data in files.items():
        if not name.endswith(BOOSTER_SUFFIX):
            continue
        try:
            booster = xgb.Booster()
            booster.load_model(bytearray(data))
        except xgb.core.XGBoostError as exc:
            raise ModelLoadError(f"model {model!r} version {version!r}: cannot read {name}: {exc}") from None
        out[name[: -len(BOOSTER_SUFFIX)]] = booster
    return out


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


# ---- command line (inference/registry_cli.py) ------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """``python -m inference.registry``: list, promote, promote-set (inference/registry_cli.py)."""
    from inference.registry_cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
