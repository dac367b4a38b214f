"""Forecasts through the model pools: the staged pipeline, shared by the router and the ingress.

Forecast of n rows for one horizon with a set's metadata-only :class:`inference.ensemble.Ensemble`
(the staged inference API)::

    X      = ens.model_input(features, symbols)                                  # here
    base   = gather(RangePredictor, TPSLClassifier, SignalClassifier).predict(X, h)  # @ versions[model]
    meta_X = ens.meta_input(X, base, h)                                          # here
    meta   = MetaModel.predict(meta_X, h)                                        # @ versions["meta_model"]
    out    = ens.compose(...)                                                    # here

Who runs it: the router at each candle close (every symbol of the close in one pass) and the
ingress on a cache miss (its fast path: the pools directly, one hop fewer than through the router;
deployments/ingress.py). Concurrent misses are batched (:class:`BatchedForecasts`): what queues
while a pass runs is the next pass, one call per pool for all its rows.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Mapping, Sequence

import numpy as np
from ray import serve

from deployments.state import FeatureRow
from inference.ensemble import Ensemble
from inference.forecast import Forecast
from inference.layout import BASE_MODELS, META_MODEL, MODEL_NAMES

# stage(ens, model, X, horizon) -> that model's stage output for the rows of X
Stage = Callable[[Ensemble, str, np.ndarray, int], Awaitable[np.ndarray]]


class PoolHandles:
    """The pools' handles, one per (model, version) naming the version as Serve's
    ``multiplexed_model_id`` (deployments/model_pools.py), made once per version."""

    def __init__(self, pools: Mapping[str, Any]) -> None:
        self.pools = dict(pools)
        self._handles: dict[tuple[str, str], Any] = {}

    def of(self, model: str, version: str) -> Any:
        handle = self._handles.get((model, version))
        if handle is None:
            if len(self._handles) >= 4 * len(MODEL_NAMES):  # old versions' handles: drop them, remade on use
                self._handles.clear()
            handle = self._handles[(model, version)] = self.pools[model].options(multiplexed_model_id=version)
        return handle

    async def stage(self, ens: Ensemble, model: str, X: np.ndarray, horizon: int, timeout_s: float) -> np.ndarray:
        """One pool call for the set's version of ``model`` (raises on failure or after ``timeout_s``)."""
        return await asyncio.wait_for(self.of(model, ens.versions[model]).predict.remote(X, horizon), timeout_s)


async def forecast_through(ens: Ensemble, stage: Stage, rows: Sequence[FeatureRow], horizon: int) -> list[Forecast]:
    """The forecasts of ``rows`` for one horizon, each model's stage by ``stage`` (see the module docstring)."""
    features = np.vstack([r.features for r in rows])
    symbols = [r.symbol for r in rows]
    X = ens.model_input(features, symbols)
    base = await asyncio.gather(*(stage(ens, m, X, horizon) for m in BASE_MODELS))
    outputs = dict(zip(BASE_MODELS, base))
    outputs[META_MODEL] = await stage(ens, META_MODEL, ens.meta_input(X, outputs, horizon), horizon)
    return ens.compose(features, symbols, [r.close for r in rows], [r.open_time for r in rows], horizon, outputs)


class BatchedForecasts:
    """Concurrent forecast requests as one pass per (horizon, model set): what queues while a pass
    runs is the next pass (``batch_wait_timeout_s`` 0: a lone request waits for nothing)."""

    def __init__(self, stage: Stage, timeout_s: float) -> None:
        self.stage, self.timeout_s = stage, timeout_s

    async def forecast(self, ens: Ensemble, rows: Sequence[FeatureRow], horizon: int) -> list[Forecast]:
        out = await self._batched((ens, list(rows), int(horizon)))
        if isinstance(out, Exception):  # one group's failure is returned, not raised, by the batch
            raise out
        return out

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0)
    async def _batched(self, items: list[tuple[Ensemble, list[FeatureRow], int]]) -> list[Any]:
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (ens, _, horizon) in enumerate(items):
            groups.setdefault((horizon, id(ens)), []).append(i)
        out: list[Any] = [None] * len(items)

        async def one(idx: list[int]) -> None:
            ens, _, horizon = items[idx[0]]
            rows = [r for i in idx for r in items[i][1]]
            try:  # a request path: the pool hops get the caller's deadline
                forecasts = await asyncio.wait_for(forecast_through(ens, self.stage, rows, horizon), self.timeout_s)
            except Exception as exc:  # one group's failure must not fail the others
                for i in idx:
                    out[i] = exc
                return
            start = 0
            for i in idx:
                n = len(items[i][1])
                out[i] = forecasts[start:start + n]
                start += n

        await asyncio.gather(*(one(idx) for idx in groups.values()))
        return out
