"""Model replica pools: one Serve deployment per model, batching requests with ``@serve.batch``.

Each request names the model versions the router composes with, so a forecast is computed from
one consistent model set even while a new version is being rolled out: a replica keeps the last
two version sets loaded and loads a newly named one on first use (off the event loop), so the
switch needs no restart and fails no request.

Batching: concurrent requests (candle-close fan-out over symbols x horizons, concurrent cache
misses) are grouped by (horizon, versions) and each group is one ``predict_stage`` call on the
stacked rows. ``batch_wait_s`` is tiny on purpose: under load batches form while the previous one
runs; an idle pool must not add latency to a lone request.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

import numpy as np
from ray import serve

from configs.settings import Settings, load_settings
from deployments.tunables import POOL_TUNABLES, apply_tunables, replica_identity
from configs.errors import ModelLoadError, ModelNotFoundError
from features.indicators import feature_set_hash
from inference.ensemble import Ensemble
from inference.registry import MODEL_NAMES, ModelRegistry

log = logging.getLogger("ray.serve")

# Deployment names of the pools, per model.
POOL_NAMES: dict[str, str] = {"range_predictor": "RangePredictor", "tpsl_classifier": "TPSLClassifier",
                              "signal_classifier": "SignalClassifier", "meta_model": "MetaModel"}
POOL_AUTOSCALING: dict[str, Any] = {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 2,
                                    "target_ongoing_requests": 16, "upscale_delay_s": 10, "downscale_delay_s": 120}

VersionKey = tuple[tuple[str, str], ...]
FALLBACK_CANDIDATES = 3  # older complete sets tried when the current one cannot be loaded


def version_key(versions: dict[str, str]) -> VersionKey:
    return tuple(sorted(versions.items()))


def fallback_sets(registry: ModelRegistry, wanted: dict[str, str] | None,
                  limit: int = FALLBACK_CANDIDATES) -> list[dict[str, str]]:
    """Older complete model sets to serve when ``wanted`` (the current pointers) cannot be loaded,
    newest first: versions every model has (a set is trained, saved and promoted together)."""
    common: set[str] | None = None
    for name in MODEL_NAMES:
        try:
            have = set(registry.versions(name))
        except ModelNotFoundError:
            return []
        common = have if common is None else common & have
    candidates = [{name: v for name in MODEL_NAMES} for v in sorted(common or (), reverse=True)]
    return [c for c in candidates if c != wanted][:limit]


class EnsembleCache:
    """The last ``size`` model sets this process used, loaded by explicit versions."""

    def __init__(self, settings: Settings, size: int = 2) -> None:
        self.settings = settings
        self.size = size
        self.registry = ModelRegistry(settings.models_dir, feature_set_hash(settings.features))
        self._sets: OrderedDict[VersionKey, Ensemble] = OrderedDict()
        self._loading: dict[VersionKey, asyncio.Future] = {}

    def load_sync(self, versions: dict[str, str]) -> Ensemble:
        ens = Ensemble({m: self.registry.load(m, versions[m]) for m in MODEL_NAMES}, self.settings)
        for model in ens.models.values():  # one thread per call: replicas share two cores
            for booster in model.boosters.values():
                booster.set_param({"nthread": 1})
        return ens

    async def get(self, versions: dict[str, str]) -> Ensemble:
        key = version_key(versions)
        ens = self._sets.get(key)
        if ens is not None:
            self._sets.move_to_end(key)
            return ens
        fut = self._loading.get(key)
        if fut is None:
            fut = asyncio.ensure_future(asyncio.to_thread(self.load_sync, dict(versions)))
            self._loading[key] = fut
            try:
                ens = await fut
            finally:
                self._loading.pop(key, None)
            self._sets[key] = ens
            while len(self._sets) > self.size:
                self._sets.popitem(last=False)
            log.info("loaded model set %s", dict(key))
            return ens
        return await asyncio.shield(fut)

    async def first_loadable(self, candidates: list[dict[str, str]]) -> tuple[Ensemble | None, list[str]]:
        """The first of ``candidates`` that loads and verifies, and why each one before it did not."""
        errors = []
        for versions in candidates:
            try:
                return await self.get(versions), errors
            except (ModelNotFoundError, ModelLoadError) as exc:
                errors.append(str(exc))
        return None, errors


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256,
                  autoscaling_config=POOL_AUTOSCALING)
class ModelPool:
    """One model's replica pool (deployed four times, named by :data:`POOL_NAMES`)."""

    def __init__(self, model_name: str, settings_overrides: dict[str, Any] | None = None) -> None:
        if model_name not in MODEL_NAMES:
            raise ValueError(f"unknown model {model_name!r}")
        self.model_name = model_name
        self.overrides = dict(settings_overrides or {})
        self.settings = load_settings(**self.overrides)
        self.cache = EnsembleCache(self.settings)
        self._apply_batching()
        self.batches = 0
        self.rows = 0

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """``user_config: {batch_max_size, batch_wait_s}`` (deployments/tunables.py): applied to the
        next batch, no restart."""
        self.settings = apply_tunables(self.overrides, user_config, POOL_TUNABLES)
        self._apply_batching()

    def _apply_batching(self) -> None:
        self._batched.set_max_batch_size(self.settings.batch_max_size)
        self._batched.set_batch_wait_timeout_s(self.settings.batch_wait_s)

    async def tunables(self) -> dict[str, Any]:
        """The live batching of this replica, read back from ``@serve.batch`` itself, and its identity."""
        return {"batch_max_size": self._batched._get_max_batch_size(),
                "batch_wait_s": self._batched._get_batch_wait_timeout_s(), **replica_identity()}

    async def predict(self, X: np.ndarray, horizon: int, versions: dict[str, str]) -> np.ndarray:
        """This model's raw stage output for the rows of ``X`` (see inference.ensemble)."""
        out = await self._batched((X, int(horizon), version_key(versions)))
        if isinstance(out, Exception):  # a failed group is returned, not raised, by the batch
            raise out
        return out

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0)
    async def _batched(self, items: list[tuple[np.ndarray, int, VersionKey]]) -> list[np.ndarray]:
        groups: dict[tuple[int, VersionKey], list[int]] = {}
        for i, (_, horizon, vkey) in enumerate(items):
            groups.setdefault((horizon, vkey), []).append(i)
        out: list[Any] = [None] * len(items)
        for (horizon, vkey), idx in groups.items():
            ens = await self.cache.get(dict(vkey))
            parts = [items[i][0] for i in idx]
            X = parts[0] if len(parts) == 1 else np.vstack(parts)
            try:
                pred = ens.predict_stage(self.model_name, X, horizon)
            except Exception as exc:  # one bad group must not fail the others
                for i in idx:
                    out[i] = exc
                continue
            self.batches += 1
            self.rows += len(X)
            start = 0
            for i, part in zip(idx, parts):
                out[i] = pred[start:start + len(part)]
                start += len(part)
        return out

    async def stats(self) -> dict[str, Any]:
        return {"model": self.model_name, "batches": self.batches, "rows": self.rows,
                "loaded_sets": [dict(k) for k in self.cache._sets]}
