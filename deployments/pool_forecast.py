"""Forecasts through the model pools: the staged pipeline, shared by the router and the ingress.

Forecast of n rows for one or more horizons with a set's metadata-only
:class:`inference.ensemble.Ensemble` (the staged inference API)::

    X      = ens.model_input(features, symbols)                                       # here
    base   = gather(RangePredictor, TPSLClassifier, SignalClassifier)
               .predict_many([(X, h) for h in horizons])                              # @ versions[model]
    meta_X = [ens.meta_input(X, base[h], h) for h in horizons]                        # here
    meta   = MetaModel.predict_many([(meta_X[h], h) for h in horizons])               # @ versions["meta_model"]
    out    = [ens.compose(..., h, ...) for h in horizons]                             # here

One call per pool per pass, whatever the number of horizons: a pool call's fixed cost (Serve's
request path on both sides, a Ray task, its serialisation) is paid four times per pass, not
sixteen. Who runs it: the router at each candle close (every symbol and every horizon of the close
in one pass) and the ingress on a cache miss (its fast path: the pools directly, one hop fewer than
through the router; deployments/ingress.py). Concurrent misses are batched
(:class:`BatchedForecasts`): what queues while a pass runs is the next pass, one call per pool for
all its rows.
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

# One stage input: (model input rows, horizon).
Part = tuple[np.ndarray, int]
# stage(ens, model, parts) -> that model's stage output for each part, in order (one pool call)
Stage = Callable[[Ensemble, str, Sequence[Part]], Awaitable[list[np.ndarray]]]


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

    async def stage(self, ens: Ensemble, model: str, parts: Sequence[Part], timeout_s: float) -> list[np.ndarray]:
        """One pool call for the set's version of ``model`` with every part (raises on failure or
        after ``timeout_s``)."""
        handle = self.of(model, ens.versions[model])
        return await asyncio.wait_for(handle.predict_many.remote(list(parts)), timeout_s)


async def forecast_horizons(ens: Ensemble, stage: Stage, rows: Sequence[FeatureRow],
                            horizons: Sequence[int]) -> list[list[Forecast]]:
    """The forecasts of ``rows`` for each of ``horizons`` (in order), each model's stage by one
    ``stage`` call (see the module docstring)."""
    horizons = [int(h) for h in horizons]
    features = np.vstack([r.features for r in rows])
    symbols = [r.symbol for r in rows]
    X = ens.model_input(features, symbols)
    base = await asyncio.gather(*(stage(ens, m, [(X, h) for h in horizons]) for m in BASE_MODELS))
    outputs = [{m: base[j][k] for j, m in enumerate(BASE_MODELS)} for k in range(len(horizons))]
    meta = await stage(ens, META_MODEL, [(ens.meta_input(X, outputs[k], h), h) for k, h in enumerate(horizons)])
    closes, times = [r.close for r in rows], [r.open_time for r in rows]
    return [ens.compose(features, symbols, closes, times, h, {**outputs[k], META_MODEL: meta[k]})
            for k, h in enumerate(horizons)]


async def forecast_through(ens: Ensemble, stage: Stage, rows: Sequence[FeatureRow], horizon: int) -> list[Forecast]:
    """The forecasts of ``rows`` for one horizon."""
    return (await forecast_horizons(ens, stage, rows, [horizon]))[0]


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
