"""Model replica pools, one Serve deployment per model, and the router's metadata-only model sets.

A pool runs one stage (``inference.stage.StageModel``), so it loads one model -- its own -- and
nothing of the other three. Which version: each request names it as Serve's
``multiplexed_model_id`` (the router sends ``versions[model]`` of the set it composes with), and
:meth:`ModelPool.stage_model` is ``@serve.multiplexed``: Serve keeps the last
:data:`MODELS_PER_REPLICA` versions per replica (LRU), loads a newly named one on first use (off the
event loop, checksums verified) and routes a version's requests to replicas that hold it. So a
roll-out needs no restart and fails no request: requests in flight finish on the version they
named while the next set's requests load the new one beside it.

The router holds no booster (:class:`ModelSets`): composing a forecast needs only the set's JSON
documents -- trade policy, calibration, barrier models, interval calibration, versions -- which
it loads with every file's checksum verified, so a set a pool could not load is refused where the
set is chosen. Only when a pool fails (a killed replica) does the router load that one model's
boosters, to compute the stage itself (``EnsembleRouter._stage``).

Batching: concurrent requests (candle-close fan-out over symbols x horizons, concurrent cache
misses) are grouped by (horizon, version) and each group is one ``StageModel.predict`` on the
stacked rows. ``batch_wait_s`` is tiny on purpose: under load batches form while the previous one
runs; an idle pool must not add latency to a lone request.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections import OrderedDict
from typing import Any, Callable, Generic, Hashable, TypeVar

import numpy as np
from ray import serve

from configs.settings import Settings, load_settings
from deployments.tunables import POOL_TUNABLES, apply_tunables, replica_identity
from configs.errors import ModelLoadError, ModelNotFoundError, PredictionError
from features.indicators import feature_set_hash
from inference.ensemble import Ensemble
from inference.layout import MODEL_NAMES
from inference.registry import ModelRegistry, check_name
from inference.stage import StageModel

log = logging.getLogger("ray.serve")

# Deployment names of the pools, per model.
POOL_NAMES: dict[str, str] = {"range_predictor": "RangePredictor", "tpsl_classifier": "TPSLClassifier",
                              "signal_classifier": "SignalClassifier", "meta_model": "MetaModel"}
POOL_AUTOSCALING: dict[str, Any] = {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 2,
                                    "target_ongoing_requests": 16, "upscale_delay_s": 10, "downscale_delay_s": 120}
MODELS_PER_REPLICA = 2       # versions a pool replica keeps: the served one and the one rolling in
FALLBACK_CANDIDATES = 3      # older complete sets tried when the current one cannot be loaded

VersionKey = tuple[tuple[str, str], ...]
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


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


def without_scikit_learn() -> None:
    """Mark scikit-learn absent in this process before XGBoost is first imported.

    Why: XGBoost imports scikit-learn (and with it much of SciPy) for its sklearn-style wrappers
    whenever it is installed; a pool only calls ``Booster.inplace_predict``. Without it a pool
    replica is ~60 MiB smaller (four pools: ~240 MiB of the graph's RSS in bench/scale.py). Only for
    a pool's own process -- training code, which uses scikit-learn, never runs there; a process that
    already imported either library is left as it is."""
    if "xgboost" not in sys.modules:
        sys.modules.setdefault("sklearn", None)  # `import sklearn` then raises ImportError: XGBoost's own fallback


class LoadedLRU(Generic[K, V]):
    """The last ``size`` values ``load(key)`` made, loaded in a thread, once per key however many
    callers wait for it (the router's equivalent of ``@serve.multiplexed``, which works in replicas
    of multiplexed deployments only)."""

    def __init__(self, load: Callable[[K], V], size: int) -> None:
        self._load, self.size = load, size
        self.items: OrderedDict[K, V] = OrderedDict()
        self._loading: dict[K, asyncio.Future] = {}

    async def get(self, key: K) -> V:
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        fut = self._loading.get(key)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = self._loading[key] = asyncio.ensure_future(asyncio.to_thread(self._load, key))
        try:
            value = await fut
        finally:
            self._loading.pop(key, None)
        self.items[key] = value
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return value


class ModelSets:
    """The router's model sets: the last ``size`` sets it served, metadata and documents only
    (every file verified), and -- for pool fallbacks only -- single models with boosters."""

    def __init__(self, settings: Settings, size: int = 2) -> None:
        self.settings = settings
        self.registry = ModelRegistry(settings.models_dir, feature_set_hash(settings.features))
        self._sets: LoadedLRU[VersionKey, Ensemble] = LoadedLRU(self._load_set, size)
        self._stages: LoadedLRU[tuple[str, str], StageModel] = LoadedLRU(self._load_stage, len(MODEL_NAMES))

    def _load_set(self, key: VersionKey) -> Ensemble:
        versions = dict(key)
        ens = Ensemble({m: self.registry.load(m, versions[m], boosters=False) for m in MODEL_NAMES}, self.settings)
        log.info("loaded model set %s (metadata and documents; the pools hold the boosters)", versions)
        return ens

    def _load_stage(self, key: tuple[str, str]) -> StageModel:
        model, version = key
        return StageModel(self.registry.load(model, version), nthread=1)

    async def get(self, versions: dict[str, str]) -> Ensemble:
        """The set ``versions``, checked for consistency (ModelNotFoundError / ModelLoadError)."""
        return await self._sets.get(version_key(versions))

    async def stage(self, model: str, version: str) -> StageModel:
        """One model with its boosters, loaded on the first pool fallback that needs it."""
        return await self._stages.get((model, version))

    def loaded(self) -> dict[str, list]:
        """The sets held (versions) and the (model, version) pairs held with boosters."""
        with_boosters = {(m, e.versions[m]) for e in self._sets.items.values() for m in e.stages}
        return {"sets": [dict(k) for k in self._sets.items],
                "booster_models": sorted(map(list, with_boosters | set(self._stages.items)))}

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

    async def __init__(self, model_name: str, settings_overrides: dict[str, Any] | None = None) -> None:
        if model_name not in MODEL_NAMES:
            raise ValueError(f"unknown model {model_name!r}")
        without_scikit_learn()
        self.model_name = model_name
        self.overrides = dict(settings_overrides or {})
        self.settings = load_settings(**self.overrides)
        self.registry = ModelRegistry(self.settings.models_dir, feature_set_hash(self.settings.features))
        self._apply_batching()
        self.requests = 0
        self.batches = 0
        self.rows = 0
        self._preload = asyncio.create_task(self._load_current())

    async def _load_current(self) -> None:
        """Load the registry's current version of this model before the first request asks for it:
        a cold pool (XGBoost imported, boosters built on first use) could miss the router's
        ``pool_call_timeout_s`` at the first candle close. Best effort: a request names the version."""
        try:
            version = (await asyncio.to_thread(self.registry.current_versions))[self.model_name]
            await self.stage_model(version)
        except Exception as exc:  # no model yet, a broken current set: the first request says why
            log.warning("%s: current version not preloaded: %s", self.model_name, exc)

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

    @serve.multiplexed(max_num_models_per_replica=MODELS_PER_REPLICA)
    async def stage_model(self, version: str) -> StageModel:
        """This pool's model at ``version``, boosters verified and loaded (Serve's per-replica LRU)."""
        check_name("model version", version)
        stage = await asyncio.to_thread(lambda: StageModel(self.registry.load(self.model_name, version), nthread=1))
        log.info("loaded %s %s", self.model_name, version)
        return stage

    async def predict(self, X: np.ndarray, horizon: int) -> np.ndarray:
        """This model's raw stage output for the rows of ``X`` (see inference.ensemble), computed by
        the version the request names: ``handle.options(multiplexed_model_id=version)``."""
        return (await self.predict_many([(X, horizon)]))[0]

    async def predict_many(self, parts: list[tuple[np.ndarray, int]]) -> list[np.ndarray]:
        """:meth:`predict` of each (rows, horizon) part in one request (a candle close asks for
        every horizon at once: one request's fixed cost instead of one per horizon)."""
        version = serve.get_multiplexed_model_id()
        if not version:
            raise PredictionError(f"{self.model_name}: a request names the model version as multiplexed_model_id")
        self.requests += 1
        outs = await asyncio.gather(*(self._batched((X, int(horizon), version)) for X, horizon in parts))
        for out in outs:
            if isinstance(out, Exception):  # a failed group is returned, not raised, by the batch
                raise out
        return list(outs)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0)
    async def _batched(self, items: list[tuple[np.ndarray, int, str]]) -> list[Any]:
        groups: dict[tuple[int, str], list[int]] = {}
        for i, (_, horizon, version) in enumerate(items):
            groups.setdefault((horizon, version), []).append(i)
        out: list[Any] = [None] * len(items)
        for (horizon, version), idx in groups.items():
            parts = [items[i][0] for i in idx]
            X = parts[0] if len(parts) == 1 else np.vstack(parts)
            try:
                pred = (await self.stage_model(version)).predict(X, horizon)
            except Exception as exc:  # one bad group (or a version that does not load) must not fail the others
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
        """Requests answered, batches and rows computed, and the versions this replica holds (newest use last)."""
        wrapper = getattr(self, "__serve_multiplex_wrapper", None)  # set by @serve.multiplexed on first use
        held: dict[str, StageModel] = dict(wrapper.models) if wrapper is not None else {}
        return {"model": self.model_name, "requests": self.requests, "batches": self.batches, "rows": self.rows,
                "libraries": {m: sys.modules.get(m) is not None for m in ("xgboost", "sklearn")},
                "loaded_versions": list(held), "boosters": {v: sorted(s.boosters) for v, s in held.items()}}
