"""Outcome resolution against labels computed directly with ``build_labels``, on replayed real candles.

1. Pure: ``resolve_predictions``/``resolve_signals`` over a candle history (with gaps) equal
   ``build_labels`` row for row; pnl and R equal an independent scalar computation.
2. End to end: forecasts logged through the ``LogWriter`` into a fresh database, a day of real
   candles replayed through the ``OutcomeResolver`` Ray actor one close at a time; every row
   resolved in PostgreSQL matches the direct computation, and so do the live metrics (24 h, 7 d,
   all; MAE against a walk-forward baseline, coverage, hit rate, cumulative R, drift).
"""

from __future__ import annotations

import asyncio
import math
import time
import tempfile
from pathlib import Path

import asyncpg
import numpy as np
import pandas as pd
import pytest

from configs.settings import LabelParams, load_settings
from deployments.db.live_metrics import Baseline, walk_forward_baseline
from deployments.db.forwarder import CandleForwarder
from deployments.db.outcomes import CandleHistory, resolve_predictions, resolve_signals
from deployments.db.resolver import OutcomeResolver, start_resolver
from deployments.db.rows import PredictionRow, SignalRow, rows_from_forecast
from deployments.db.writer import LogWriter
from deployments.feed import CandleEvent, CandleWindow, FeedClock
from features.candles import FIVE_MINUTES_MS
from features.barriers import barrier_distances
from features.costs import Costs, round_trip_cost
from features.labels import SL, TP, build_labels, naive_sigma
from inference.forecast import Forecast
from tests.conftest import free_port
from scripts.lab.services import fresh_database
from tests.forecast_util import make_forecast

H = (6, 18, 36, 72)
FEE = 0.001
COSTS = Costs(fee_bps=FEE * 1e4, slippage_bps=0.0)  # a fee only, so the scalar walk below stays simple
OUTCOME = {TP: "tp", SL: "sl", 0: "expired"}


def _gapped(df: pd.DataFrame, start: int) -> pd.DataFrame:
    """Real candles with a 16-candle hole cut out of the replayed day (like the 2023-03-24 halt)."""
    return df.drop(index=range(start + 100, start + 116)).reset_index(drop=True)


def _by_hand_trade(long: bool, entry: float, tp: float, sl: float, highs, lows, closes) -> tuple:
    """Independent scalar walk: (outcome, exit price, pnl %, R) with fees on both sides."""
    exit_price, outcome = closes[-1], "expired"
    for hi, lo in zip(highs, lows):
        hit_sl = lo <= sl if long else hi >= sl
        hit_tp = hi >= tp if long else lo <= tp
        if hit_sl:
            exit_price, outcome = sl, "sl"
            break
        if hit_tp:
            exit_price, outcome = tp, "tp"
            break
    gross = (exit_price - entry) / entry * (1 if long else -1)
    net = gross - FEE * (entry + exit_price) / entry
    return outcome, exit_price, 100 * net, net / (abs(entry - sl) / entry)


def _signal_plan(df: pd.DataFrame, rows: np.ndarray, h: int):
    """BUY/SELL/HOLD in turn, with the training labels' own barriers (so outcomes must equal labels)."""
    close = df["close"].to_numpy()
    tp_d, sl_d = barrier_distances(naive_sigma(df, h)[rows], LabelParams(), float(round_trip_cost(COSTS)))
    kind = np.array(["BUY", "SELL", "HOLD"], dtype=object)[rows % 3]
    long = kind == "BUY"
    c0 = close[rows]
    tp = np.where(long, c0 * (1 + tp_d), c0 * (1 - tp_d))
    sl = np.where(long, c0 * (1 - sl_d), c0 * (1 + sl_d))
    return kind, c0, tp, sl


def test_pure_resolution_equals_build_labels(real_candles):
    params = LabelParams()
    for symbol, full in real_candles.items():
        df = _gapped(full.iloc[-2000:].reset_index(drop=True), 1500)
        y = build_labels(df, H, params, costs=COSTS)
        hist = CandleHistory(capacity=5000)
        hist.extend(df["open_time"], df["high"], df["low"], df["close"])
        t = df["open_time"].to_numpy()
        rows = np.arange(1100, len(df) - 80)
        for h in H:
            n = len(rows)
            ph, pl = np.full(n, 0.004), np.full(n, -0.004)
            res = resolve_predictions(hist, t[rows], np.full(n, h), ph, pl, np.full(n, 0.001), np.full(n, 0.008),
                                      np.full(n, -0.008), np.full(n, np.nan))
            fh, fl = y[f"fut_high_{h}"].to_numpy()[rows], y[f"fut_low_{h}"].to_numpy()[rows]
            defined = np.isfinite(fh)
            assert (~defined).sum() == h  # the rows whose window crosses the hole
            assert np.array_equal(res["status"] == "ok", defined)
            assert set(res["status"][~defined]) == {"gap"}
            assert np.array_equal(res["actual_high"][defined], fh[defined])
            assert np.array_equal(res["actual_low"][defined], fl[defined])
            assert np.isnan(res["actual_high"][~defined]).all()
            np.testing.assert_allclose(res["mae"][defined], (np.abs(0.004 - fh) + np.abs(-0.004 - fl))[defined] / 2,
                                       rtol=1e-15)
            hi_in = (fh >= 0.001) & (fh <= 0.008)
            assert [bool(x) for x in res["high_inside"][defined]] == hi_in[defined].tolist()
            assert all(x is None for x in res["low_inside"]) and all(x is None for x in res["inside_interval"])

            kind, c0, tp, sl = _signal_plan(df, rows, h)
            sig = resolve_signals(hist, t[rows], np.full(n, h), kind, c0, tp, sl, COSTS)
            assert set(sig["status"][kind == "HOLD"]) == {"not_traded"}
            traded = (kind != "HOLD") & defined & np.isfinite(tp)
            assert np.array_equal(sig["status"] == "ok", traded)
            for side, want in (("BUY", y[f"outcome_long_{h}"].to_numpy()[rows]),
                               ("SELL", y[f"outcome_short_{h}"].to_numpy()[rows])):
                pick = traded & (kind == side)
                assert pick.sum() > 50
                assert list(sig["outcome"][pick]) == [OUTCOME[int(o)] for o in want[pick]], (symbol, h, side)
                # The live R is the training label's net R (same barriers, same cost function).
                label_r = y[f"r_{'long' if side == 'BUY' else 'short'}_{h}"].to_numpy()[rows][pick]
                np.testing.assert_allclose(sig["r_multiple"][pick], label_r, rtol=1e-9)
            for i in np.flatnonzero(traded)[::7]:
                r = rows[i]
                want = _by_hand_trade(kind[i] == "BUY", c0[i], tp[i], sl[i], df["high"].to_numpy()[r + 1:r + h + 1],
                                      df["low"].to_numpy()[r + 1:r + h + 1], df["close"].to_numpy()[r + 1:r + h + 1])
                got = (sig["outcome"][i], sig["exit_price"][i], sig["pnl_percent"][i], sig["r_multiple"][i])
                assert got[0] == want[0] and got[1] == pytest.approx(want[1], rel=1e-12)
                assert got[2] == pytest.approx(want[2], rel=1e-9) and got[3] == pytest.approx(want[3], rel=1e-9)
                assert 1 <= sig["exit_bar"][i] <= h


def test_pure_resolution_edge_cases(real_candles):
    df = real_candles["ETHUSDT"].iloc[-300:].reset_index(drop=True)
    hist = CandleHistory(capacity=200)  # bounded: keeps the last 200 candles only
    hist.extend(df["open_time"], df["high"], df["low"], df["close"])
    assert len(hist) == 200 and hist.last_open_time == df["open_time"].iloc[-1]
    assert hist.extend(df["open_time"].iloc[-5:], df["high"].iloc[-5:], df["low"].iloc[-5:], df["close"].iloc[-5:]) == 0
    t = df["open_time"].to_numpy()
    c = float(df["close"].iloc[150])
    # Forecast candle before the history: no_data; barriers on the wrong side: invalid; no barriers: not traded.
    sig = resolve_signals(hist, np.array([t[10], t[150], t[150], t[150]]), np.full(4, 6),
                          np.array(["BUY", "BUY", "SELL", "BUY"], dtype=object), np.full(4, c),
                          np.array([c * 1.01, c * 0.99, c * 0.99, np.nan]), np.array([c * 0.99, c * 0.98, c * 1.01, 1.0]),
                          COSTS)
    assert list(sig["status"]) == ["no_data", "invalid", "ok", "not_traded"]
    assert np.isnan(sig["pnl_percent"][[0, 1, 3]]).all() and np.isfinite(sig["pnl_percent"][2])


def test_walk_forward_baseline_reads_training_metadata():
    md = {"metrics": {"walk_forward": [
        {"symbol": "BTCUSDT", "horizon": 6, "n": 10, "mae_high": 0.002, "mae_low": 0.004, "coverage_high": 0.8,
         "coverage_low": 0.7, "r2_high": 0.1},
        {"symbol": "ETHUSDT", "horizon": 6, "n": 10, "mae_high": None, "mae_low": 0.004}]}}
    assert walk_forward_baseline(md) == {("BTCUSDT", 6): Baseline(pytest.approx(0.003), pytest.approx(0.75))}
    assert walk_forward_baseline({}) == {}


def test_resolver_with_postgres_down_resolves_nothing_and_says_so():
    settings = load_settings(db_timeout_s=1.0)
    res = OutcomeResolver(settings, database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/x", baselines={})

    async def go():
        await res.add_candles("BTCUSDT", [0, FIVE_MINUTES_MS], [2.0, 2.0], [1.0, 1.0], [1.5, 1.5])
        counts = await res.on_candle_close("BTCUSDT", 2 * FIVE_MINUTES_MS, 2.0, 1.0, 1.5)
        return counts, await res.status()

    counts, status = asyncio.run(go())
    assert counts["predictions"] == counts["signals"] == 0 and counts["history"] == 3
    assert status["postgres"] == "down" and status["last_error"] and status["history_candles"] == {"BTCUSDT": 3}


# ---- end to end: writer -> PostgreSQL -> resolver actor on replayed candles ---------------------------------
def _forecasts(symbol: str, df: pd.DataFrame, rows: np.ndarray) -> tuple[list[Forecast], pd.DataFrame]:
    """Forecasts for every replayed candle and horizon, and the plan as a table."""
    out, plan = [], []
    t = df["open_time"].to_numpy()
    for h in H:
        kind, c0, tp, sl = _signal_plan(df, rows, h)
        scale = 0.002 * math.sqrt(h / 6)
        for j, r in enumerate(rows):
            version = "rv1" if j < len(rows) // 2 else "rv2"  # a model promoted mid-day
            ph, pl = scale * (1 + 0.3 * math.sin(r)), -scale * (1 + 0.3 * math.cos(r))
            f = make_forecast(symbol=symbol, horizon=h, candle_open_time=int(t[r]), close=float(c0[j]),
                              pred_high_pct=ph, pred_low_pct=pl, high_lower=0.2 * scale, high_upper=2.5 * scale,
                              low_lower=-2.5 * scale, low_upper=-0.2 * scale, signal_type=kind[j], confidence=0.6,
                              entry_price=float(c0[j]), take_profit=float(tp[j]) if kind[j] != "HOLD" else None,
                              stop_loss=float(sl[j]) if kind[j] != "HOLD" else None, reason=None,
                              model_versions={"range_predictor": version, "meta_model": "m" + version})
            out.append(f)
            plan.append({"symbol": symbol, "horizon": h, "row": int(r), "candle_open_time": int(t[r]),
                         "version": version, "ph": ph, "pl": pl, "hl": f.high_lower, "hu": f.high_upper,
                         "ll": f.low_lower, "lu": f.low_upper, "kind": kind[j], "entry": c0[j], "tp": tp[j],
                         "sl": sl[j]})
    return out, pd.DataFrame(plan)


def _expected(df: pd.DataFrame, plan: pd.DataFrame) -> pd.DataFrame:
    """Direct computation from build_labels (and a scalar trade walk) for every planned forecast."""
    y = build_labels(df, H, costs=COSTS)  # the plan's barriers: the same cost floor
    high, low, close = (df[k].to_numpy() for k in ("high", "low", "close"))
    exp = plan.copy()
    exp["actual_high"] = [y[f"fut_high_{h}"].iloc[r] for h, r in zip(plan["horizon"], plan["row"])]
    exp["actual_low"] = [y[f"fut_low_{h}"].iloc[r] for h, r in zip(plan["horizon"], plan["row"])]
    exp["mae"] = (np.abs(exp["ph"] - exp["actual_high"]) + np.abs(exp["pl"] - exp["actual_low"])) / 2
    exp["high_inside"] = (exp["actual_high"] >= exp["hl"]) & (exp["actual_high"] <= exp["hu"])
    exp["low_inside"] = (exp["actual_low"] >= exp["ll"]) & (exp["actual_low"] <= exp["lu"])
    trades = []
    for p in exp.itertuples():
        if p.kind == "HOLD" or not np.isfinite(p.actual_high) or not np.isfinite(p.tp):
            trades.append((None, np.nan, np.nan, np.nan))
            continue
        label = y[f"outcome_{'long' if p.kind == 'BUY' else 'short'}_{p.horizon}"].iloc[p.row]
        w = slice(p.row + 1, p.row + p.horizon + 1)
        trade = _by_hand_trade(p.kind == "BUY", p.entry, p.tp, p.sl, high[w], low[w], close[w])
        assert trade[0] == OUTCOME[int(label)]  # the scalar walk agrees with the training label
        trades.append(trade)
    exp[["outcome", "exit_price", "pnl_percent", "r_multiple"]] = pd.DataFrame(trades, index=exp.index)
    return exp


async def _fetch(url: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    conn = await asyncpg.connect(url)
    try:
        p = pd.DataFrame([dict(r) for r in await conn.fetch("SELECT * FROM ml.prediction_logs")])
        s = pd.DataFrame([dict(r) for r in await conn.fetch("SELECT * FROM ml.signal_logs")])
    finally:
        await conn.close()
    return p, s


def test_resolver_actor_on_a_replayed_day_matches_build_labels(real_candles, ray_cluster):
    import ray

    settings = load_settings(drift_mae_margin=0.25, drift_min_samples=100, drift_window="24h", fee_rate=FEE,
                             slippage_rate=0.0, borrow_rate=0.0)
    day = 288
    frames, plans, feeds = {}, [], {}
    forecasts = []
    for symbol, full in real_candles.items():
        df = full.iloc[-(1200 + day + 100):].reset_index(drop=True)  # 16 are cut from ETH: still > 72 after
        if symbol == "ETHUSDT":
            df = _gapped(df, 1200)
        start = 1200
        rows = np.arange(start, start + day)
        fs, plan = _forecasts(symbol, df, rows)
        forecasts += fs
        frames[symbol] = df
        plans.append(_expected(df, plan))
        feeds[symbol] = start
    exp = pd.concat(plans, ignore_index=True)
    # Baselines: rv1's walk-forward MAE is half the live MAE (drift), rv2's equals it (no drift).
    direct = exp[np.isfinite(exp["mae"])].groupby(["version", "symbol", "horizon"])["mae"].mean()
    baselines = {v: {(s, h): Baseline(direct[(v, s, h)] * (0.5 if v == "rv1" else 1.0), 0.8)
                     for (vv, s, h) in direct.index if vv == v} for v in ("rv1", "rv2")}

    with fresh_database() as url, tempfile.TemporaryDirectory() as spool:
        writer = LogWriter(settings, database_url=url, spool_root=Path(spool)).start()
        assert writer.log_forecasts(forecasts) == len(forecasts) + (exp["ph"].notna()).sum()
        assert writer.log_forecasts(forecasts[:100]) == 0  # the same forecasts again: deduplicated
        assert writer.flush(60)
        writer.close()

        name = f"resolver_test_{free_port()}"
        actor = start_resolver(settings, name=name, detached=False, database_url=url, baselines=baselines,
                               metrics_interval_s=0.0)
        try:
            for symbol, df in frames.items():
                s = feeds[symbol]
                ray.get(actor.add_candles.remote(symbol, df["open_time"].iloc[:s + 1].tolist(),
                                                 df["high"].iloc[:s + 1].tolist(), df["low"].iloc[:s + 1].tolist(),
                                                 df["close"].iloc[:s + 1].tolist()))
            # One close at a time, the symbols interleaved as a live feed delivers them, through the
            # feed-side forwarder (one call in flight, so the async actor never sees them reordered).
            candles = sorted((int(df["open_time"].iloc[i]), symbol, i) for symbol, df in frames.items()
                             for i in range(feeds[symbol] + 1, len(df)))

            async def feed() -> CandleForwarder:
                fwd = CandleForwarder(lambda: actor)
                for _, symbol, i in candles:
                    c = frames[symbol].iloc[i]
                    fwd.push(symbol, int(c["open_time"]), float(c["high"]), float(c["low"]), float(c["close"]))
                    await asyncio.sleep(0)  # the feed goes on; the forwarder batches what piles up
                await fwd.drain()
                return fwd

            fwd = asyncio.run(feed())
            assert fwd.sent == len(candles) and fwd.failures == 0
            total = ray.get(actor.status.remote())["resolved"]
            metrics = ray.get(actor.refresh_metrics.remote(force=True))
            drift = ray.get(actor.drift.remote())
            status = ray.get(actor.status.remote())
        finally:
            ray.kill(actor)
        preds, sigs = asyncio.run(_fetch(url))

    assert total == {"predictions": len(preds), "signals": len(sigs)} and status["postgres"] == "up"
    assert preds["resolved_at"].notna().all() and sigs["resolved_at"].notna().all()

    key = ["symbol", "horizon", "candle_open_time"]
    m = exp.merge(preds, on=key, suffixes=("", "_db"), validate="one_to_one")
    assert len(m) == len(exp)
    ok = np.isfinite(m["actual_high"])
    assert (~ok).sum() == sum(H) and set(m.loc[~ok, "resolve_status"]) == {"gap"}
    assert (m.loc[ok, "resolve_status"] == "ok").all() and m.loc[~ok, "actual_high_db"].isna().all()
    assert np.array_equal(m.loc[ok, "actual_high_db"].to_numpy(float), m.loc[ok, "actual_high"].to_numpy(float))
    assert np.array_equal(m.loc[ok, "actual_low_db"].to_numpy(float), m.loc[ok, "actual_low"].to_numpy(float))
    np.testing.assert_allclose(m.loc[ok, "mae_db"].to_numpy(float), m.loc[ok, "mae"].to_numpy(float), rtol=1e-12)
    assert (m.loc[ok, "inside_interval"] == (m.loc[ok, "high_inside"] & m.loc[ok, "low_inside"])).all()
    assert (m.loc[ok, "high_inside_db"] == m.loc[ok, "high_inside"]).all()
    assert (m["model_version"] == m["version"]).all()

    s = exp.merge(sigs, on=key, suffixes=("", "_db"), validate="one_to_one")
    traded = s["outcome"].notna()
    assert set(s.loc[s["kind"] == "HOLD", "resolve_status"]) == {"not_traded"}
    assert (s.loc[traded, "outcome_db"] == s.loc[traded, "outcome"]).all()
    assert s.loc[~traded, "outcome_db"].isna().all()
    assert {"tp", "sl", "expired"} <= set(s.loc[traded, "outcome"])
    for col in ("exit_price", "pnl_percent", "r_multiple"):
        np.testing.assert_allclose(s.loc[traded, f"{col}_db"].to_numpy(float), s.loc[traded, col].to_numpy(float),
                                   rtol=1e-9)

    # Live metrics against a direct computation, per version and window (market time = last candle).
    now = max(int(df["open_time"].iloc[-1]) for df in frames.values())
    assert metrics["market_time"] == now
    for v in ("rv1", "rv2"):
        for window, span in (("24h", 24 * 3600 * 1000), ("7d", 7 * 24 * 3600 * 1000), ("all", None)):
            e = exp[(exp["version"] == v) & np.isfinite(exp["mae"])]
            if span is not None:
                e = e[e["candle_open_time"] > now - span]
            got = metrics["models"]["range_predictor"][v][window]
            assert got["n"] == len(e) > 0
            assert got["mae"] == pytest.approx(e["mae"].mean(), rel=1e-9)
            assert got["interval_coverage"] == pytest.approx(
                ((e["high_inside"].astype(int) + e["low_inside"].astype(int)) / 2).mean(), rel=1e-9)
            base = np.array([baselines[v][(sym, h)].mae for sym, h in zip(e["symbol"], e["horizon"])])
            assert got["walk_forward_mae"] == pytest.approx(base.mean(), rel=1e-9)  # weighted by the live mix
            assert got["mae_ratio"] == pytest.approx(e["mae"].sum() / base.sum(), rel=1e-9)
            if window == "all":
                assert got["mae_ratio"] == pytest.approx(2.0 if v == "rv1" else 1.0, rel=1e-9)
            assert got["walk_forward_coverage"] == pytest.approx(0.8)
            t = exp[(exp["version"] == v) & exp["outcome"].notna()]
            if span is not None:
                t = t[t["candle_open_time"] > now - span]
            sg = metrics["models"]["meta_model"]["m" + v][window]
            assert sg["n"] == len(t) > 0
            assert sg["hit_rate"] == pytest.approx((t["outcome"] == "tp").mean(), rel=1e-9)
            assert sg["cumulative_r"] == pytest.approx(t["r_multiple"].sum(), rel=1e-9)
            assert sg["tp"] + sg["sl"] + sg["expired"] == len(t)
        verdict = metrics["models"]["range_predictor"][v]["drift"]
        assert verdict["flag"] is (v == "rv1") and verdict["n"] >= 100, verdict
    assert metrics["current"] == {"range_predictor": "rv2", "meta_model": "mrv2"}
    assert drift["version"] == "rv2" and drift["drift"] is False


def test_late_and_out_of_order_candles(real_candles):
    """Deliveries to an async actor may arrive out of order: the history merges them, and a window
    with a missing candle stays ``pending`` for the grace period instead of being written off."""
    df = real_candles["BTCUSDT"].iloc[-400:].reset_index(drop=True)
    t, hi, lo, cl = (df[k].to_numpy() for k in ("open_time", "high", "low", "close"))
    rng = np.random.default_rng(5)
    order = np.arange(len(df))
    for a in range(0, len(df), 10):  # shuffled within blocks of 10, one candle at a time
        rng.shuffle(order[a:a + 10])
    hist = CandleHistory(capacity=1000)
    for i in order:
        hist.extend([t[i]], [hi[i]], [lo[i]], [cl[i]])
    assert np.array_equal(hist.open_time, t) and np.array_equal(hist.close, cl)

    late = 250  # candle 250 arrives only at the very end
    hist = CandleHistory(capacity=1000)
    keep = np.arange(len(df)) != late
    hist.extend(t[keep][:270], hi[keep][:270], lo[keep][:270], cl[keep][:270])  # up to candle 270
    args = (np.array([t[245]]), np.array([6]), np.array([0.01]), np.array([-0.01]), *(np.array([np.nan]),) * 4)
    assert resolve_predictions(hist, *args, gap_grace_candles=36)["status"][0] == "pending"  # 245+6+36 > 270
    assert resolve_predictions(hist, *args, gap_grace_candles=10)["status"][0] == "gap"  # 245+6+10 <= 270
    hist.extend([t[late]], [hi[late]], [lo[late]], [cl[late]])
    res = resolve_predictions(hist, *args, gap_grace_candles=36)
    assert res["status"][0] == "ok"
    assert res["actual_high"][0] == build_labels(df, (6,))["fut_high_6"].iloc[245]


def test_forwarder_refills_a_restarted_resolver(real_candles, ray_cluster):
    """Ray restarts a crashed resolver with an empty history; the feed-side forwarder notices (new
    instance id in the reply) and refills it from the feed's CandleWindow -- the one candle history,
    the forwarder keeps no copy -- so no due row lacks its candles."""
    import ray

    df = real_candles["BTCUSDT"].iloc[-50:].reset_index(drop=True)
    settings = load_settings(db_timeout_s=0.5)
    actor = start_resolver(settings, name=f"resolver_restart_{free_port()}", detached=False,
                           database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/x", baselines={})

    window = CandleWindow("BTCUSDT", 40, keep=40)  # the feed's window, bounded at 40 candles
    clock = FeedClock(time.time(), 0.0, 1.0)

    async def push(fwd: CandleForwarder, rows: range) -> None:
        for i in rows:
            c = df.iloc[i]
            window.remember(CandleEvent("BTCUSDT", np.array([int(c["open_time"])]),
                                        df[["open", "high", "low", "close", "volume"]].to_numpy()[i:i + 1],
                                        "live", clock, "test"))
            fwd.push("BTCUSDT", int(c["open_time"]), float(c["high"]), float(c["low"]), float(c["close"]))
        await fwd.drain()

    async def scenario() -> tuple[int, int]:
        fwd = CandleForwarder(lambda: actor, history=lambda symbol: window.outcome_candles())
        await push(fwd, range(0, 30))
        before = (await actor.status.remote())["history_candles"]["BTCUSDT"]
        ray.kill(actor, no_restart=False)  # a crash: Ray restarts it, empty
        deadline = time.monotonic() + 60
        while True:
            try:
                await actor.status.remote()
                break
            except ray.exceptions.RayActorError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)
        await push(fwd, range(30, 50))
        return before, (await actor.status.remote())["history_candles"]["BTCUSDT"]

    try:
        before, after = asyncio.run(scenario())
    finally:
        ray.kill(actor, no_restart=True)
    assert before == 30
    assert after == 40  # the window's 40 candles (its bound), not just the 20 sent after the restart
