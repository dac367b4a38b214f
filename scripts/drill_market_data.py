"""``python -m scripts.drill_market_data``: kill a MarketData actor across a candle close; prove the backfill.

    python -m scripts.drill_market_data --address http://127.0.0.1:8265 --config serve_config.yaml \\
        --api-key "$KEY" --http-port 8000

Why a separate drill with the live (Binance) feed: a replay restarted by a new actor starts its file
again, so only the live source has "candles that closed while the actor was dead" to fetch. The
exchange is the fake Binance server (scripts/lab/fake_binance.py) on loopback, serving the shipped sample
re-timed so its candles close on the real clock; this script pushes each closed candle on the kline
websocket at its close, like Binance does.

Steps: start the fake exchange; ``serve deploy`` the config with ``feed=binance`` pointed at it; wait
for predictions; start a steady load; a few seconds before the next 5-minute close, SIGKILL one
symbol's MarketData actor (so the close happens while it is dead and its websocket push is lost);
wait until the MarketFeed health check has started a new actor and the feature builder has the
candle that closed meanwhile; keep the load going ``--after-s``; print failed requests during the
drill and after recovery, and whether the feature builder's history is contiguous across the kill.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import yaml

from deployments.auth import write_api_keys_file
from features.candles import FIVE_MINUTES_MS, load_candles
from scripts.drills import connect, feature_history, kill_pid, market_status, my_actor_pids
from scripts.loadgen import run_load
from scripts.rollout import app_state, serve_deploy, wait_running

ROOT = Path(__file__).resolve().parents[1]
SYMBOLS = ("BTCUSDT", "ETHUSDT")


def retimed_sample(now_ms: int, ahead: int = 200) -> dict[str, pd.DataFrame]:
    """The shipped sample, shifted so that all but the last ``ahead`` candles have closed by now."""
    out = {}
    boundary = now_ms - now_ms % FIVE_MINUTES_MS  # open time of the candle forming now
    for s in SYMBOLS:
        df = load_candles(ROOT / "data" / "sample" / f"{s}_5m.parquet").copy()
        shift = boundary - int(df["open_time"].iloc[-ahead])
        df["open_time"] = df["open_time"] + shift
        out[s] = df
    return out


class Pusher(threading.Thread):
    """Pushes every candle on the fake exchange's websocket at its close (as Binance does)."""

    def __init__(self, fake, candles: dict[str, pd.DataFrame]) -> None:
        super().__init__(daemon=True)
        self.fake, self.candles, self.stop = fake, candles, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            now = time.time() * 1000
            next_close = now - now % FIVE_MINUTES_MS + FIVE_MINUTES_MS
            if self.stop.wait((next_close - now) / 1000 + 0.2):
                return
            for s, df in self.candles.items():
                row = df[df["open_time"] == int(next_close) - FIVE_MINUTES_MS]
                if len(row):
                    candle = row.iloc[0].to_dict()
                    try:
                        self.fake.push_kline(s, candle, closed=True)
                    except Exception:  # nobody connected (the actor is dead): that is the drill
                        pass


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from scripts.lab.fake_binance import FakeBinance

    connect(args.gcs_address)
    candles = retimed_sample(int(time.time() * 1000))
    fake = FakeBinance(candles, interval="5m")
    fake.start()
    pusher = Pusher(fake, candles)
    pusher.start()
    try:
        config = yaml.safe_load(Path(args.config).read_text())
        app_cfg = config["applications"][0]
        app = app_cfg["name"]
        app_cfg.setdefault("args", {}).update({"feed": "binance", "binance_api_url": fake.base_url,
                                               "binance_ws_url": f"ws://127.0.0.1:{fake.port}/ws"})
        work = Path(tempfile.mkdtemp(prefix="drill-md-"))
        # The key reaches the (local) head as a 0600 file: keys never go in Serve args.
        app_cfg["args"].setdefault("api_keys_file", str(write_api_keys_file(work / "api_keys", [args.api_key])))
        if args.http_port:
            config.setdefault("http_options", {})["port"] = args.http_port
        path = work / "binance.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        url = f"http://127.0.0.1:{config.get('http_options', {}).get('port', 8000)}"
        serve_deploy(path, args.address)
        wait_running(args.address, app, args.timeout_s)
        deadline = time.monotonic() + args.timeout_s
        while True:
            r = httpx.post(f"{url}/predictions", json={"symbol": "BTCUSDT", "horizon": 6},
                           headers={"X-API-Key": args.api_key}, timeout=30)
            status = await asyncio.to_thread(lambda: {s: market_status(app, s) for s in SYMBOLS})
            if r.status_code == 200 and all(st.get("source") == "binance" or st.get("state") == "streaming"
                                            for st in status.values()):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"not serving from the fake exchange: {r.status_code} {r.text[:200]} {status}")
            await asyncio.sleep(1)
        print(f"[{time.strftime('%H:%M:%S')}] serving from the fake exchange at {fake.base_url}", flush=True)
        _, deps = app_state(args.address, app)
        baseline = {n: c for n, (_, c) in deps.items()}

        requests = [{"method": "POST", "path": p, "json": {"symbol": s, "horizon": h}}
                    for p in ("/predictions", "/signals") for s in SYMBOLS for h in (6, 18, 36, 72)]
        stop = asyncio.Event()
        load = asyncio.create_task(run_load(url, rate=args.rate, duration_s=args.max_duration_s, requests=requests,
                                            headers={"X-API-Key": args.api_key}, timeout_s=10, stop=stop))
        t0 = time.perf_counter()
        # Kill a few seconds before the next close, so the close happens while the actor is dead.
        now = time.time() * 1000
        close = now - now % FIVE_MINUTES_MS + FIVE_MINUTES_MS
        if close - now < (args.lead_s + 3) * 1000:
            close += FIVE_MINUTES_MS
        wait = (close - now) / 1000 - args.lead_s
        print(f"[{time.strftime('%H:%M:%S')}] next candle closes at "
              f"{pd.Timestamp(int(close), unit='ms', tz='UTC'):%H:%M:%S}; killing {args.lead_s:.0f}s before it "
              f"(in {wait:.0f}s)", flush=True)
        await asyncio.sleep(wait)
        before = await asyncio.to_thread(lambda: {s: feature_history(app, s) for s in SYMBOLS})
        victim = {"pid": (await asyncio.to_thread(my_actor_pids, "ray::MarketData"))[0]}
        t_kill = time.perf_counter() - t0
        kill_pid(victim["pid"])
        print(f"[{time.strftime('%H:%M:%S')}] killed MarketData actor pid {victim['pid']}", flush=True)
        expected = int(close) - FIVE_MINUTES_MS  # open time of the candle closing while it is dead

        def recovered() -> bool:
            try:
                hist = {s: feature_history(app, s) for s in SYMBOLS}
                md = {s: market_status(app, s) for s in SYMBOLS}
            except Exception:
                return False
            return all(h["open_time"] is not None and h["open_time"] >= expected for h in hist.values()) and \
                all(m.get("running") for m in md.values())

        deadline = time.monotonic() + args.timeout_s
        while not await asyncio.to_thread(recovered):
            if time.monotonic() > deadline:
                raise TimeoutError("the killed feed never came back with the missed candle")
            await asyncio.sleep(0.5)
        t_rec = time.perf_counter() - t0
        print(f"[{time.strftime('%H:%M:%S')}] both symbols have the candle of "
              f"{pd.Timestamp(expected, unit='ms', tz='UTC'):%H:%M} ({t_rec - t_kill:.1f}s after the kill)", flush=True)
        await asyncio.sleep(args.after_s)
        after = await asyncio.to_thread(lambda: {s: feature_history(app, s) for s in SYMBOLS})
        stop.set()
        result = await load
        t_end = time.perf_counter() - t0
        during, post = result.summary(t_kill, t_rec), result.summary(t_rec, t_end)
        candles = {s: {"before": before[s], "after": after[s],
                       "candles_added": (after[s]["open_time"] - before[s]["open_time"]) // FIVE_MINUTES_MS,
                       "new_gaps": after[s]["gaps"] - before[s]["gaps"]} for s in SYMBOLS}
        # Contiguous: the candle that closed while the actor was dead arrived (the newest candle moved
        # on), no gap was flagged, and the unbroken history the features need did not shrink (a
        # skipped candle would restart it below the warm-up length).
        contiguous = all(c["new_gaps"] == 0 and c["candles_added"] >= 1 and c["after"]["history"] >= c["before"]["history"]
                         for c in candles.values())
        return {"victim_pid": victim["pid"], "recovery_s": round(t_rec - t_kill, 1), "during": during,
                "after_recovery": post, "candles": candles, "contiguous": contiguous,
                "goal_met": during["failed_pct"] < 0.1 and post["failed"] == 0 and contiguous}
    finally:
        pusher.stop.set()
        fake.stop()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.drill_market_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default=os.environ.get("RAY_DASHBOARD_ADDRESS", "http://127.0.0.1:8265"))
    p.add_argument("--gcs-address", default=None)
    p.add_argument("--config", default="serve_config.yaml")
    p.add_argument("--api-key", required=True)
    p.add_argument("--http-port", type=int, default=None)
    p.add_argument("--rate", type=float, default=10.0)
    p.add_argument("--lead-s", type=float, default=5.0, help="kill this long before a candle close")
    p.add_argument("--after-s", type=float, default=30.0)
    p.add_argument("--max-duration-s", type=float, default=900.0)
    p.add_argument("--timeout-s", type=float, default=300.0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    report = asyncio.run(run(args))
    d, a = report["during"], report["after_recovery"]
    print(f"\nMarketData drill under load, {args.rate:.0f} req/s (live feed from the fake exchange on loopback)")
    print(f"recovery {report['recovery_s']}s; during: {d['requests']} requests, {d['failed']} failed "
          f"({d['failed_pct']:.3f}%); after recovery: {a['requests']} requests, {a['failed']} failed")
    for s, c in report["candles"].items():
        print(f"  {s}: newest candle {c['before']['open_time']} -> {c['after']['open_time']} "
              f"(+{c['candles_added']}), contiguous history {c['before']['history']} -> {c['after']['history']}, "
              f"new gaps {c['new_gaps']}")
    if d["failed"] or a["failed"]:
        print("  errors:", "; ".join(d["errors"] + a["errors"]))
    print(f"no candle missed: {report['contiguous']}; goal {'met' if report['goal_met'] else 'MISSED'}")
    print(json.dumps(report, default=str))
    return 0 if report["goal_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
