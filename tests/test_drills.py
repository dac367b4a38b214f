"""The fault drills (``python -m scripts.drills``), short version, against the suite's deployed app.

Killing a model replica must not fail requests: the candle-close computation never waits on the
dead replica (the router computes the stage itself, ``pool_fallbacks``). Killing a symbol's
MarketData actor: MarketFeed replaces it at once and the new actor resumes after the newest candle
the FeatureBuilder holds, so that symbol's candles advance with no gap. The full drill (20 req/s
against ``make serve``) is docs/operations.md section 7.
"""

from __future__ import annotations

import asyncio

import pytest


@pytest.mark.timeout(400)
def test_short_drills_meet_every_goal(serving_app, ray_cluster):
    from ray import serve

    from scripts import drills
    from tests.serving_app import APP_NAME

    router = serve.get_deployment_handle("EnsembleRouter", app_name=APP_NAME)
    # Under the key's rate limit (100/min): every failure counted is the engine's.
    args = drills.parser().parse_args([
        "--address", ray_cluster["dashboard_url"], "--url", serving_app.base_url, "--app", APP_NAME,
        "--api-key", serving_app.new_key(), "--drills", "replica", "market_data", "--market-symbol", "BTCUSDT",
        "--rate", "1.2", "--warmup-s", "3", "--after-s", "8", "--timeout-s", "150", "--horizons", "6", "18"])
    report = asyncio.run(drills.run(args))
    fallbacks = router.status.remote().result(timeout_s=30)["pool_fallbacks"]
    by_name = {d["drill"]: d for d in report["drills"]}
    replica, market = by_name["model replica"], by_name["MarketData actor"]
    assert replica["goal_met"], replica
    assert fallbacks.get("range_predictor", 0) >= 1, fallbacks  # a candle closed while the replica was dead
    candles = market["candles"]
    b, a = candles["before"]["BTCUSDT"], candles["after"]["BTCUSDT"]
    assert a["open_time"] > b["open_time"] and candles["contiguous"], candles  # the killed symbol resumed
    assert market["goal_met"], market
    assert report["total"]["failed"] == 0, report["total"]
