"""The benchmark's baseline: the same API, the same models, plain FastAPI + uvicorn in ONE process.

It runs the very code the Serve ingress runs (``deployments.api.create_app`` around
``deployments.service.PredictionService``: auth, the Redis rate limit, the caches, rendering),
but forecasts with an in-process ``inference.ensemble.Ensemble`` instead of the model graph, and
its market state is the shipped sample's newest candle (built with the same FeatureBuilder code).
At start it writes every symbol x horizon forecast to Redis, as the candle-close step does, so
"cached" means the same thing in both apps. What remains different is exactly what Serve adds.

    python bench/baseline_fastapi.py --port 8100 --models models --api-key KEY [--redis-url URL]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, Python puts bench/ first on sys.path: put the project root there too, so the
# project packages import without an install.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import time  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import numpy as np  # noqa: E402

from configs.settings import Settings, load_settings  # noqa: E402
from deployments.api import DatabaseProbe, create_app  # noqa: E402
from deployments.cache import CacheUnavailable, RedisGateway, make_entry, prediction_key  # noqa: E402
from deployments.market_state import MarketState  # noqa: E402
from deployments.feed import CandleEvent, FeedClock, find_gaps  # noqa: E402
from deployments.prometheus import EngineMetrics  # noqa: E402
from deployments.render import describe_models  # noqa: E402
from deployments.service import PredictionService  # noqa: E402
from deployments.state import FeatureRow  # noqa: E402
from features.candles import FIVE_MINUTES_MS, load_candles  # noqa: E402
from inference.ensemble import Ensemble  # noqa: E402


class LocalBackend:
    """Forecasts in this process, with the whole ensemble (``Ensemble.forecast``)."""

    def __init__(self, ensemble: Ensemble) -> None:
        self.ensemble = ensemble
        self.loaded_at = time.time()

    async def forecast(self, rows: Sequence[FeatureRow], horizon: int) -> list[Any]:
        features = np.vstack([r.features for r in rows])
        return self.ensemble.forecast(features, [r.symbol for r in rows], [r.close for r in rows],
                                      [r.open_time for r in rows], horizon)

    async def models_status(self) -> dict[str, Any]:
        return describe_models(self.ensemble, self.loaded_at, None)

    async def runtime_status(self) -> dict[str, Any]:
        return {"feed": {"feed": "static (baseline)"}, "serve": None}


def market_from_sample(settings: Settings) -> MarketState:
    """The newest candle of each symbol's replay file, with its features (published)."""
    state = MarketState(settings.model_dump(include={"market", "features"}))
    for symbol in settings.market.symbols:
        path = settings.replay_files.get(symbol) or settings.sample_dir / f"{symbol}_5m.parquet"
        df = load_candles(path).tail(2000)
        t = df["open_time"].to_numpy(np.int64)
        clock = FeedClock(time.time(), float(t[-1] + FIVE_MINUTES_MS), 1.0)
        ev = CandleEvent(symbol, t, df[["open", "high", "low", "close", "volume"]].to_numpy(np.float64), "history",
                         clock, f"replay:{Path(path).name}", find_gaps(t, None))
        res = state.ingest(ev)
        state.publish(symbol, res.open_time, {}, None)
    return state


async def precompute(service: PredictionService, backend: LocalBackend, redis: RedisGateway) -> None:
    """What the candle-close step does: every symbol x horizon forecast into Redis."""
    items = []
    for symbol, st in service.market.symbols.items():
        row = st.row()
        for h in service.horizons:
            f = (await backend.forecast([row], h))[0]
            items.append((prediction_key(symbol, h, row.open_time), make_entry(f, service.feature_hash, service.secret),
                          3600.0))
    try:
        await redis.set_many(items)
    except CacheUnavailable:
        print("baseline: redis is down; cached requests will compute", file=sys.stderr)


def build(settings: Settings):
    ensemble = Ensemble.load(settings.models_dir, settings)
    for model in ensemble.models.values():
        for booster in model.boosters.values():
            booster.set_param({"nthread": 1})
    backend = LocalBackend(ensemble)
    redis = RedisGateway(settings.redis_url, settings.redis_timeout_s, settings.redis_retry_s)
    service = PredictionService(settings, backend, redis=redis, metrics=EngineMetrics(use_ray=False))
    service.set_market(market_from_sample(settings).snapshot())
    metrics = service.metrics

    async def metrics_text() -> str:
        return metrics.local_text()

    app = create_app(service, database_health=DatabaseProbe(settings.database_url), metrics_text=metrics_text,
                     title="ML Engine (plain FastAPI baseline)")

    @app.on_event("startup")
    async def _warm() -> None:
        await precompute(service, backend, redis)

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--models", type=Path, default=None)
    p.add_argument("--api-key", required=True)
    p.add_argument("--redis-url", default=None)
    p.add_argument("--rate-limit", type=int, default=10**9, help="per key per minute (huge: not what is measured)")
    args = p.parse_args(argv)
    overrides: dict[str, Any] = {"api_keys": [args.api_key], "rate_limit_per_minute": args.rate_limit,
                                 "max_data_age_s": 1e9, "serving_log": ""}
    if args.models:
        overrides["models_dir"] = args.models
    if args.redis_url:
        overrides["redis_url"] = args.redis_url
    settings = load_settings(**overrides)
    import uvicorn

    uvicorn.run(build(settings), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
