"""``python -m scripts.check_outcomes``: a day of real candles through ``make serve``'s engine, with a
PostgreSQL outage in the middle, checked against a direct computation (issue 6's acceptance run).

What it does, all on private services so nothing shared is disturbed:

1. starts a private PostgreSQL (initdb in a temp dir) and a private Redis, and its own Ray cluster;
2. deploys ``deployments.app:build_app`` with the default serving log hook
   (``deployments.db.serving_log:make_serving_log``), replaying the shipped sample's last
   ``1100 + day + 80`` candles per symbol as fast as the graph takes them (1100 = warm-up history);
3. stops PostgreSQL (``pg_ctl -m immediate``, like a crash) once a third of the day has streamed, for
   ``--outage-s`` seconds while candles keep closing, then starts it again;
4. waits until the feed has finished and every row whose window has closed is resolved, then checks
   every logged row against ``build_features`` + ``Ensemble.forecast`` (the forecast),
   ``build_labels`` (actual high/low) and a scalar walk of each signal's barriers (outcome, exit,
   pnl after fees, R), that each forecast is logged exactly once, and that ``/models/status``'s live
   metrics equal the same figures computed directly.

Prints what it checked and exits 1 on any mismatch. Takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

from typing import Any

import asyncpg
import httpx
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs.settings import load_settings  # noqa: E402
from deployments.auth import write_api_keys_file  # noqa: E402
from features.candles import FIVE_MINUTES_MS, load_candles  # noqa: E402

HISTORY = 1100


def _scalar_trade(long: bool, entry: float, tp: float, sl: float, highs, lows, closes, fee: float,
                  slip: float = 0.0, borrow_hourly: float = 0.0):
    """Independent walk of one trade: (outcome, exit price, pnl % after costs, R). Costs as
    features.costs defines them: slippage against both fills, a fee on each fill, and a spot short's
    borrow for 1 + ceil(hours held) hours (held = candles to the exit)."""
    exit_price, outcome, bars = closes[-1], "expired", len(closes)
    for k, (hi, lo) in enumerate(zip(highs, lows), 1):
        if (lo <= sl) if long else (hi >= sl):
            exit_price, outcome, bars = sl, "sl", k
            break
        if (hi >= tp) if long else (lo <= tp):
            exit_price, outcome, bars = tp, "tp", k
            break
    s = 1 if long else -1
    e_fill, x_fill = entry * (1 + s * slip), exit_price * (1 - s * slip)
    pnl = s * (x_fill - e_fill) - fee * (e_fill + x_fill)
    if not long:
        pnl -= borrow_hourly * (1 + -(-bars * 5 // 60)) * exit_price
    net = pnl / entry
    return outcome, exit_price, 100 * net, net / (abs(entry - sl) / entry)


class Checks:
    def __init__(self) -> None:
        self.failures: list[str] = []
        self.passed = 0

    def check(self, ok: bool, what: str) -> None:
        if ok:
            self.passed += 1
        else:
            self.failures.append(what)
            if len(self.failures) <= 20:
                print(f"  MISMATCH: {what}")


def _close(a: float | None, b: float, rel: float = 1e-9, abs_: float = 1e-12) -> bool:
    return a is not None and math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


async def _rows(url: str, table: str) -> list[dict]:
    conn = await asyncpg.connect(url)
    try:
        return [dict(r) for r in await conn.fetch(f"SELECT * FROM ml.{table}")]
    finally:
        await conn.close()


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--day", type=int, default=288, help="candles streamed per symbol (288 = one day)")
    parser.add_argument("--outage-s", type=float, default=20.0, help="seconds PostgreSQL stays down")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (spool, server logs)")
    parser.add_argument("--quick", action="store_true",
                        help="without a model set, train a 2-round one (its signals are mostly HOLD)")
    return parser.parse_args()


def _model_set(args: argparse.Namespace, settings: Any, tmp: Path) -> Path:
    """The configured model set if it loads, else one trained on the sample (as ``make serve`` would)."""
    from inference.ensemble import Ensemble
    from scripts.lab.models import train_small_models

    try:
        Ensemble.load(settings.models_dir, settings)
        return settings.models_dir
    except Exception:
        pass
    if args.quick:
        print(f"no loadable model set in {settings.models_dir}: training a 2-round one on the sample")
        return train_small_models(tmp / "models")
    # what make serve does: the shipped sample, the configured training parameters
    from configs.settings import get_settings
    from training.engines import PlainEngine
    from training.train import train

    print(f"no loadable model set in {settings.models_dir}: training one on the sample (as make serve)")
    models_dir = tmp / "models"
    train(get_settings(), {s: settings.sample_dir / f"{s}_5m.parquet" for s in settings.market.symbols},
          PlainEngine(), out=models_dir)
    return models_dir


def _replay_files(settings: Any, tmp: Path, day: int) -> tuple[dict[str, Path], dict[str, pd.DataFrame]]:
    """Per symbol the sample's last ``HISTORY + day + 80`` candles, written where the replay reads them."""
    files, frames = {}, {}
    for s in settings.market.symbols:
        df = load_candles(settings.sample_dir / f"{s}_5m.parquet").iloc[-(HISTORY + day + 80):]
        frames[s] = df.reset_index(drop=True)
        files[s] = tmp / f"{s}_5m.parquet"
        frames[s].to_parquet(files[s])
    return files, frames


def _deploy(models_dir: Path, files: dict[str, Path], tmp: Path, redis_url: str, pg_url: str
            ) -> tuple[Any, httpx.Client, float]:
    """``make serve``'s application on this script's Ray cluster: (MarketFeed handle, client, start)."""
    from ray import serve

    from deployments.app import deploy, start_serve
    from deployments.ray_head import free_port

    key = secrets.token_urlsafe(24)
    port = free_port()
    keys_file = write_api_keys_file(tmp / "api_keys", [key])  # keys never go in Serve args
    overrides = {"models_dir": str(models_dir), "api_keys_file": str(keys_file), "redis_url": redis_url,
                 "database_url": pg_url, "spool_dir": str(tmp / "spool"), "replay_speed": 0.0,
                 "replay_history": HISTORY, "replay_files": {s: str(p) for s, p in files.items()}}
    start_serve("127.0.0.1", port)
    t_start = time.monotonic()
    deploy(overrides, name="ml-engine")
    feed = serve.get_deployment_handle("MarketFeed", app_name="ml-engine")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": key}, timeout=30)
    return feed, client, t_start


def _streamed(feed: Any) -> dict[str, dict]:
    return feed.status.remote().result(timeout_s=60)["symbols"]


def _outage(args: argparse.Namespace, pg: Any, feed: Any, client: httpx.Client, checks: Checks) -> None:
    """Stop PostgreSQL a third into the day for ``--outage-s`` while candles keep closing; health must say so."""
    while min(st["candles"] for st in _streamed(feed).values()) < HISTORY + args.day // 3:
        time.sleep(0.5)
    pg.stop("immediate")
    t_down = time.monotonic()
    print(f"PostgreSQL stopped (immediate) at {min(st['candles'] for st in _streamed(feed).values()) - HISTORY} "
          "candles streamed")
    time.sleep(args.outage_s)
    log_health = client.get("/health/detailed").json()["database"]["log"]
    streamed_in_outage = min(st["candles"] for st in _streamed(feed).values()) - HISTORY
    pg.start()
    spooled = log_health["writer"].get("node_spool_pending_bytes", 0)
    print(f"PostgreSQL restarted after {time.monotonic() - t_down:.0f}s; during the outage /health/detailed "
          f"said: writer postgres={log_health['writer']['postgres']}, {spooled} bytes spooled on this node, "
          f"resolver postgres={log_health['resolver'].get('postgres')}; {streamed_in_outage} candles "
          "streamed by then")
    checks.check(log_health["writer"]["postgres"] == "down" and spooled > 0,
                 "health showed the outage and the spooled rows")


def _wait_backlog(pg_url: str, frames: dict[str, pd.DataFrame], n_forecasts: int) -> tuple[list[dict], list[dict]]:
    """Wait (5 min at most) until every forecast is logged and every closed window resolved."""
    deadline = time.monotonic() + 300
    while True:
        sigs = asyncio.run(_rows(pg_url, "signal_logs"))
        preds = asyncio.run(_rows(pg_url, "prediction_logs"))
        due = [r for r in sigs + preds if r["resolve_after"] <= int(frames[r["symbol"]]["open_time"].iloc[-1])]
        if len(sigs) >= n_forecasts and all(r["resolved_at"] is not None for r in due):
            return sigs, preds
        if time.monotonic() > deadline:
            print(f"  backlog not done: {len(sigs)}/{n_forecasts} signals logged, "
                  f"{sum(r['resolved_at'] is None for r in due)} due rows unresolved")
            return sigs, preds
        time.sleep(1.0)


class Truth:
    """One symbol's replayed candles and what a direct computation says about them."""

    def __init__(self, df: pd.DataFrame, settings: Any, ens: Any, symbol: str) -> None:
        from features import build_features
        from features.labels import build_labels

        self.df, self.ens, self.symbol = df, ens, symbol
        self.feats = build_features(df, settings.features).to_numpy()
        self.labels = build_labels(df, list(settings.market.horizons))
        self.t = df["open_time"].to_numpy(np.int64)
        self.high, self.low, self.close = (df[k].to_numpy() for k in ("high", "low", "close"))
        self.index = {int(x): i for i, x in enumerate(self.t)}

    def forecast(self, i: int, h: int) -> Any:
        return self.ens.forecast(self.feats[i][None, :], [self.symbol], [float(self.close[i])], [int(self.t[i])], h)[0]


def _check_predictions(truth: Truth, rows: list[dict], checks: Checks, live: dict[str, Any]) -> None:
    """Each logged prediction equals ``Ensemble.forecast``; each resolved one equals ``build_labels``."""
    s, t, labels = truth.symbol, truth.t, truth.labels
    for r in rows:
        i, h = truth.index[r["candle_open_time"]], r["horizon"]
        f = truth.forecast(i, h)
        checks.check(_close(r["predicted_high"], f.pred_high_pct) and _close(r["predicted_low"], f.pred_low_pct)
                     and _close(r["high_lower"], f.high_lower) and _close(r["low_upper"], f.low_upper),
                     f"{s} {t[i]} h={h}: logged forecast differs from Ensemble.forecast")
        fh = labels[f"fut_high_{h}"].iloc[i]
        if not np.isfinite(fh):
            checks.check(r["resolved_at"] is None, f"{s} {t[i]} h={h}: resolved past the replay's end")
            continue
        fl = labels[f"fut_low_{h}"].iloc[i]
        checks.check(r["resolve_status"] == "ok" and r["actual_high"] == fh and r["actual_low"] == fl,
                     f"{s} {t[i]} h={h}: actual {r['actual_high']},{r['actual_low']} vs labels {fh},{fl}")
        mae = (abs(r["predicted_high"] - fh) + abs(r["predicted_low"] - fl)) / 2
        checks.check(_close(r["mae"], mae), f"{s} {t[i]} h={h}: mae")
        live["mae"].append(mae)
        hi_in = r["high_lower"] <= fh <= r["high_upper"]
        lo_in = r["low_lower"] <= fl <= r["low_upper"]
        checks.check(r["inside_interval"] == (hi_in and lo_in), f"{s} {t[i]} h={h}: inside_interval")
        live["cov"].append((int(hi_in) + int(lo_in)) / 2)  # numpy bools add as "or"


def _check_signals(truth: Truth, rows: list[dict], checks: Checks, live: dict[str, Any], settings: Any) -> None:
    """Each logged signal equals ``Ensemble.forecast``; each resolved trade equals a scalar barrier walk."""
    s, t = truth.symbol, truth.t
    fee, slip, borrow = settings.fee_rate, settings.slippage_rate, settings.borrow_rate / 8760.0
    for r in rows:
        i, h = truth.index[r["candle_open_time"]], r["horizon"]
        f = truth.forecast(i, h)
        checks.check(r["signal_type"] == f.signal_type and _close(r["confidence"], f.confidence),
                     f"{s} {t[i]} h={h}: logged signal differs from Ensemble.forecast")
        if i + h >= len(truth.df):
            checks.check(r["resolved_at"] is None, f"{s} {t[i]} h={h}: signal resolved past the end")
            continue
        if r["signal_type"] == "HOLD":
            checks.check(r["resolve_status"] == "not_traded", f"{s} {t[i]} h={h}: HOLD status")
            continue
        w = slice(i + 1, i + h + 1)
        out = _scalar_trade(r["signal_type"] == "BUY", r["entry_price"], r["take_profit"], r["stop_loss"],
                            truth.high[w], truth.low[w], truth.close[w], fee, slip, borrow)
        checks.check(r["outcome"] == out[0] and _close(r["exit_price"], out[1], 1e-12)
                     and _close(r["pnl_percent"], out[2]) and _close(r["r_multiple"], out[3]),
                     f"{s} {t[i]} h={h}: signal {r['outcome']} {r['exit_price']} vs {out[:2]}")
        live["traded"] += 1
        live["tp"] += out[0] == "tp"
        live["r"] += out[3]


def _check_rows(settings: Any, ens: Any, frames: dict[str, pd.DataFrame], expected: dict[str, np.ndarray],
                preds: list[dict], sigs: list[dict], checks: Checks) -> dict[str, Any]:
    """Every symbol's rows: logged exactly once, equal to the direct computation; the live figures' inputs."""
    horizons = list(settings.market.horizons)
    live: dict[str, Any] = {"mae": [], "cov": [], "tp": 0, "traded": 0, "r": 0.0}
    for s in settings.market.symbols:
        truth = Truth(frames[s], settings, ens, s)
        p_rows = [r for r in preds if r["symbol"] == s]
        s_rows = [r for r in sigs if r["symbol"] == s]
        keys_p = [(r["candle_open_time"], r["horizon"]) for r in p_rows]
        keys_s = [(r["candle_open_time"], r["horizon"]) for r in s_rows]
        want = {(int(truth.t[i]), h) for i in expected[s] for h in horizons}
        checks.check(len(keys_s) == len(set(keys_s)) and set(keys_s) == want,
                     f"{s}: {len(keys_s)} signal rows, {len(set(keys_s))} distinct, {len(want)} expected")
        checks.check(len(keys_p) == len(set(keys_p)) and set(keys_p) <= want,
                     f"{s}: prediction rows duplicated or unexpected")
        _check_predictions(truth, p_rows, checks, live)
        _check_signals(truth, s_rows, checks, live, settings)
    return live


def _check_live(client: httpx.Client, ens: Any, live_direct: dict[str, Any], checks: Checks
                ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``/models/status``'s live figures equal the direct ones; no row dropped or rejected."""
    time.sleep(2.0)  # the resolver refreshes its figures at most once a second
    status = client.get("/models/status").json()
    live = status.get("live", {}).get("models", {})
    rp = live.get("range_predictor", {}).get(ens.versions["range_predictor"], {}).get("all", {})
    mm = live.get("meta_model", {}).get(ens.versions["meta_model"], {}).get("all", {})
    n = len(live_direct["mae"])
    checks.check(rp.get("n") == n, f"/models/status live n {rp.get('n')} vs {n} resolved predictions "
                                   f"(live: {str(status.get('live'))[:1500]})")
    checks.check(_close(rp.get("mae"), float(np.mean(live_direct["mae"])) if n else float("nan")),
                 f"/models/status live MAE {rp.get('mae')}")
    cov = float(np.mean(live_direct["cov"])) if n else float("nan")
    checks.check(_close(rp.get("interval_coverage"), cov),
                 f"/models/status interval coverage {rp.get('interval_coverage')} vs {cov}")
    checks.check((mm.get("n") or 0) == live_direct["traded"],
                 f"/models/status signals n {mm.get('n')} vs {live_direct['traded']} traded")
    if live_direct["traded"]:
        checks.check(_close(mm.get("hit_rate"), live_direct["tp"] / live_direct["traded"]), "hit rate")
        checks.check(_close(mm.get("cumulative_r"), live_direct["r"], 1e-9, 1e-9), "cumulative R")
    health = client.get("/health/detailed").json()["database"]["log"]
    checks.check(health["writer"]["rows_dropped"] == 0 and health["writer"]["rows_rejected"] == 0,
                 "rows dropped or rejected")
    return rp, mm, health


def _report(ens: Any, preds: list[dict], sigs: list[dict], n_forecasts: int, live_direct: dict[str, Any],
            rp: dict[str, Any], mm: dict[str, Any], health: dict[str, Any]) -> None:
    kinds = {k: sum(r["signal_type"] == k for r in sigs) for k in ("BUY", "SELL", "HOLD")}
    print(f"signals by type: {kinds}; traded signals resolved and checked: {live_direct['traded']}")
    print(f"logged: {len(preds)} prediction rows, {len(sigs)} signal rows ({n_forecasts} forecasts); "
          f"resolved: {sum(r['resolved_at'] is not None for r in preds)} predictions, "
          f"{sum(r['resolved_at'] is not None for r in sigs)} signals")
    print(f"/models/status live (all): range_predictor {ens.versions['range_predictor']}: n={rp.get('n')} "
          f"MAE={rp.get('mae')} walk-forward MAE={rp.get('walk_forward_mae')} ratio={rp.get('mae_ratio')} "
          f"coverage={rp.get('interval_coverage')}; meta_model: n={mm.get('n')} hit rate={mm.get('hit_rate')} "
          f"cumulative R={mm.get('cumulative_r')}")
    print(f"drift: {health['drift']}")


def _run(args: argparse.Namespace, settings: Any, tmp: Path, pg: Any, redis: Any, checks: Checks,
         models_dir: Path, ens: Any) -> None:
    """Deploy, stream the day with the outage, wait for the backlog, check everything (on this
    script's own Ray cluster, started by :func:`main`)."""
    files, frames = _replay_files(settings, tmp, args.day)
    feed, client, t_start = _deploy(models_dir, files, tmp, redis.url, pg.url)
    symbols = list(settings.market.symbols)
    print(f"engine deployed in {time.monotonic() - t_start:.0f}s; replaying {args.day} candles x "
          f"{len(symbols)} symbols as fast as the graph takes them")
    _outage(args, pg, feed, client, checks)
    while any(st["state"] != "finished" for st in _streamed(feed).values()):
        time.sleep(0.5)
    print(f"replay finished after {time.monotonic() - t_start:.0f}s")
    expected = {s: HISTORY - 1 + np.arange(args.day + 80 + 1) for s in symbols}  # fresh candles: last of
    n_forecasts = sum(len(v) for v in expected.values()) * len(settings.market.horizons)  # history + stream
    sigs, preds = _wait_backlog(pg.url, frames, n_forecasts)
    live_direct = _check_rows(settings, ens, frames, expected, preds, sigs, checks)
    rp, mm, health = _check_live(client, ens, live_direct, checks)
    _report(ens, preds, sigs, n_forecasts, live_direct, rp, mm, health)
    client.close()


def main() -> int:
    args = _parse_args()
    import ray
    from ray import serve

    from inference.ensemble import Ensemble
    from scripts.lab.services import PrivatePostgres, PrivateRedis

    settings = load_settings()
    tmp = Path(tempfile.mkdtemp(prefix="mle-check-"))
    pg = PrivatePostgres()
    redis = PrivateRedis(tmp)
    checks = Checks()
    own_ray = False
    try:
        pg.start()
        redis.start()
        models_dir = _model_set(args, settings, tmp)
        ens = Ensemble.load(models_dir, settings)
        # address="local": always a new cluster of our own, never another engineer's running one.
        ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False,
                 log_to_driver=False, runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})
        own_ray = True
        _run(args, settings, tmp, pg, redis, checks, models_dir, ens)
    finally:
        if own_ray:  # only the cluster this script started (serve.shutdown would otherwise connect to one)
            try:
                serve.shutdown()
            except Exception:
                pass
            ray.shutdown()
        redis.stop()
        pg.destroy()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"{checks.passed} checks passed, {len(checks.failures)} failed")
    return 1 if checks.failures else 0


if __name__ == "__main__":
    sys.exit(main())
