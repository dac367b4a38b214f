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

import asyncpg
import httpx
import numpy as np

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--day", type=int, default=288, help="candles streamed per symbol (288 = one day)")
    parser.add_argument("--outage-s", type=float, default=20.0, help="seconds PostgreSQL stays down")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (spool, server logs)")
    parser.add_argument("--quick", action="store_true",
                        help="without a model set, train a 2-round one (its signals are mostly HOLD)")
    args = parser.parse_args()

    import ray
    from ray import serve

    from deployments.app import deploy, start_serve
    from features import build_features
    from features.labels import build_labels
    from deployments.ray_head import free_port
    from inference.ensemble import Ensemble
    from scripts.lab.models import train_small_models
    from scripts.lab.services import PrivatePostgres, PrivateRedis

    settings = load_settings()
    symbols = list(settings.market.symbols)
    horizons = list(settings.market.horizons)
    tmp = Path(tempfile.mkdtemp(prefix="mle-check-"))
    pg = PrivatePostgres()
    redis = PrivateRedis(tmp)
    checks = Checks()
    own_ray = False
    try:
        pg.start()
        redis.start()
        try:
            Ensemble.load(settings.models_dir, settings)
            models_dir = settings.models_dir
        except Exception:
            if args.quick:
                print(f"no loadable model set in {settings.models_dir}: training a 2-round one on the sample")
                models_dir = train_small_models(tmp / "models")
            else:  # what make serve does: the shipped sample, the configured training parameters
                from configs.settings import get_settings
                from training.engines import PlainEngine
                from training.train import train

                print(f"no loadable model set in {settings.models_dir}: training one on the sample (as make serve)")
                models_dir = tmp / "models"
                train(get_settings(), {s: settings.sample_dir / f"{s}_5m.parquet" for s in symbols}, PlainEngine(),
                      out=models_dir)
        ens = Ensemble.load(models_dir, settings)
        files, frames = {}, {}
        for s in symbols:
            df = load_candles(settings.sample_dir / f"{s}_5m.parquet").iloc[-(HISTORY + args.day + 80):]
            frames[s] = df.reset_index(drop=True)
            files[s] = tmp / f"{s}_5m.parquet"
            frames[s].to_parquet(files[s])
        key = secrets.token_urlsafe(24)
        port = free_port()
        keys_file = write_api_keys_file(tmp / "api_keys", [key])  # keys never go in Serve args
        overrides = {"models_dir": str(models_dir), "api_keys_file": str(keys_file), "redis_url": redis.url,
                     "database_url": pg.url, "spool_dir": str(tmp / "spool"), "replay_speed": 0.0,
                     "replay_history": HISTORY, "replay_files": {s: str(p) for s, p in files.items()}}
        # address="local": always a new cluster of our own, never another engineer's running one.
        ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False,
                 log_to_driver=False, runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})
        own_ray = True
        start_serve("127.0.0.1", port)
        t_start = time.monotonic()
        deploy(overrides, name="ml-engine")
        feed = serve.get_deployment_handle("MarketFeed", app_name="ml-engine")
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": key}, timeout=30)

        def delivered() -> dict[str, dict]:
            return feed.status.remote().result(timeout_s=60)["symbols"]

        print(f"engine deployed in {time.monotonic() - t_start:.0f}s; replaying {args.day} candles x "
              f"{len(symbols)} symbols as fast as the graph takes them")
        while min(st["candles"] for st in delivered().values()) < HISTORY + args.day // 3:
            time.sleep(0.5)
        pg.stop("immediate")
        t_down = time.monotonic()
        print(f"PostgreSQL stopped (immediate) at {min(st['candles'] for st in delivered().values()) - HISTORY} "
              "candles streamed")
        time.sleep(args.outage_s)
        log_health = client.get("/health/detailed").json()["database"]["log"]
        streamed_in_outage = min(st["candles"] for st in delivered().values()) - HISTORY
        pg.start()
        spooled = log_health["writer"].get("node_spool_pending_bytes", 0)
        print(f"PostgreSQL restarted after {time.monotonic() - t_down:.0f}s; during the outage /health/detailed "
              f"said: writer postgres={log_health['writer']['postgres']}, {spooled} bytes spooled on this node, "
              f"resolver postgres={log_health['resolver'].get('postgres')}; {streamed_in_outage} candles "
              "streamed by then")
        checks.check(log_health["writer"]["postgres"] == "down" and spooled > 0,
                     "health showed the outage and the spooled rows")
        while any(st["state"] != "finished" for st in delivered().values()):
            time.sleep(0.5)
        print(f"replay finished after {time.monotonic() - t_start:.0f}s")

        # Wait for the backlog: every forecast logged and every closed window resolved.
        expected = {s: HISTORY - 1 + np.arange(args.day + 80 + 1) for s in symbols}  # fresh candles: last of
        n_forecasts = sum(len(v) for v in expected.values()) * len(horizons)          # the history + the stream
        deadline = time.monotonic() + 300
        while True:
            sigs = asyncio.run(_rows(pg.url, "signal_logs"))
            preds = asyncio.run(_rows(pg.url, "prediction_logs"))
            due = [r for r in sigs + preds if r["resolve_after"] <= int(frames[r["symbol"]]["open_time"].iloc[-1])]
            if len(sigs) >= n_forecasts and all(r["resolved_at"] is not None for r in due):
                break
            if time.monotonic() > deadline:
                print(f"  backlog not done: {len(sigs)}/{n_forecasts} signals logged, "
                      f"{sum(r['resolved_at'] is None for r in due)} due rows unresolved")
                break
            time.sleep(1.0)

        fee, slip, borrow = settings.fee_rate, settings.slippage_rate, settings.borrow_rate / 8760.0
        live_direct = {"mae": [], "cov": [], "tp": 0, "traded": 0, "r": 0.0}
        for s in symbols:
            df = frames[s]
            feats = build_features(df, settings.features).to_numpy()
            labels = build_labels(df, horizons)
            t = df["open_time"].to_numpy(np.int64)
            high, low, close = (df[k].to_numpy() for k in ("high", "low", "close"))
            index = {int(x): i for i, x in enumerate(t)}
            p_rows = [r for r in preds if r["symbol"] == s]
            s_rows = [r for r in sigs if r["symbol"] == s]
            keys_p = [(r["candle_open_time"], r["horizon"]) for r in p_rows]
            keys_s = [(r["candle_open_time"], r["horizon"]) for r in s_rows]
            want = {(int(t[i]), h) for i in expected[s] for h in horizons}
            checks.check(len(keys_s) == len(set(keys_s)) and set(keys_s) == want,
                         f"{s}: {len(keys_s)} signal rows, {len(set(keys_s))} distinct, {len(want)} expected")
            checks.check(len(keys_p) == len(set(keys_p)) and set(keys_p) <= want,
                         f"{s}: prediction rows duplicated or unexpected")
            for r in p_rows:
                i, h = index[r["candle_open_time"]], r["horizon"]
                f = ens.forecast(feats[i][None, :], [s], [float(close[i])], [int(t[i])], h)[0]
                checks.check(_close(r["predicted_high"], f.pred_high_pct) and _close(r["predicted_low"], f.pred_low_pct)
                             and _close(r["high_lower"], f.high_lower) and _close(r["low_upper"], f.low_upper),
                             f"{s} {t[i]} h={h}: logged forecast differs from Ensemble.forecast")
                fh = labels[f"fut_high_{h}"].iloc[i]
                if np.isfinite(fh):
                    fl = labels[f"fut_low_{h}"].iloc[i]
                    checks.check(r["resolve_status"] == "ok" and r["actual_high"] == fh and r["actual_low"] == fl,
                                 f"{s} {t[i]} h={h}: actual {r['actual_high']},{r['actual_low']} vs labels {fh},{fl}")
                    mae = (abs(r["predicted_high"] - fh) + abs(r["predicted_low"] - fl)) / 2
                    checks.check(_close(r["mae"], mae), f"{s} {t[i]} h={h}: mae")
                    live_direct["mae"].append(mae)
                    hi_in = r["high_lower"] <= fh <= r["high_upper"]
                    lo_in = r["low_lower"] <= fl <= r["low_upper"]
                    checks.check(r["inside_interval"] == (hi_in and lo_in), f"{s} {t[i]} h={h}: inside_interval")
                    live_direct["cov"].append((int(hi_in) + int(lo_in)) / 2)  # numpy bools add as "or"
                else:
                    checks.check(r["resolved_at"] is None, f"{s} {t[i]} h={h}: resolved past the replay's end")
            for r in s_rows:
                i, h = index[r["candle_open_time"]], r["horizon"]
                f = ens.forecast(feats[i][None, :], [s], [float(close[i])], [int(t[i])], h)[0]
                checks.check(r["signal_type"] == f.signal_type and _close(r["confidence"], f.confidence),
                             f"{s} {t[i]} h={h}: logged signal differs from Ensemble.forecast")
                if i + h >= len(df):
                    checks.check(r["resolved_at"] is None, f"{s} {t[i]} h={h}: signal resolved past the end")
                    continue
                if r["signal_type"] == "HOLD":
                    checks.check(r["resolve_status"] == "not_traded", f"{s} {t[i]} h={h}: HOLD status")
                    continue
                w = slice(i + 1, i + h + 1)
                out = _scalar_trade(r["signal_type"] == "BUY", r["entry_price"], r["take_profit"], r["stop_loss"],
                                    high[w], low[w], close[w], fee, slip, borrow)
                checks.check(r["outcome"] == out[0] and _close(r["exit_price"], out[1], 1e-12)
                             and _close(r["pnl_percent"], out[2]) and _close(r["r_multiple"], out[3]),
                             f"{s} {t[i]} h={h}: signal {r['outcome']} {r['exit_price']} vs {out[:2]}")
                live_direct["traded"] += 1
                live_direct["tp"] += out[0] == "tp"
                live_direct["r"] += out[3]

        time.sleep(2.0)  # the resolver refreshes its figures at most once a second
        status = client.get("/models/status").json()
        version = ens.versions["range_predictor"]
        live = status.get("live", {}).get("models", {})
        rp = live.get("range_predictor", {}).get(version, {}).get("all", {})
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
        kinds = {k: sum(r["signal_type"] == k for r in sigs) for k in ("BUY", "SELL", "HOLD")}
        print(f"signals by type: {kinds}; traded signals resolved and checked: {live_direct['traded']}")
        print(f"logged: {len(preds)} prediction rows, {len(sigs)} signal rows ({n_forecasts} forecasts); "
              f"resolved: {sum(r['resolved_at'] is not None for r in preds)} predictions, "
              f"{sum(r['resolved_at'] is not None for r in sigs)} signals")
        print(f"/models/status live (all): range_predictor {version}: n={rp.get('n')} MAE={rp.get('mae')} "
              f"walk-forward MAE={rp.get('walk_forward_mae')} ratio={rp.get('mae_ratio')} "
              f"coverage={rp.get('interval_coverage')}; meta_model: n={mm.get('n')} hit rate={mm.get('hit_rate')} "
              f"cumulative R={mm.get('cumulative_r')}")
        print(f"drift: {health['drift']}")
        client.close()
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
