"""Walk-forward structure (no period traded by a model that saw it) and the report rendering.

The model set is a recorder here: what matters is which candles each fit was given and which rows
each fitted model was asked to forecast. The real ensemble path is covered by the CLI test.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest

from training.backtest.strategy import load_strategies
from features import FEATURE_NAMES
from features.batch import build_features
from features.candles import FIVE_MINUTES_MS
from training.backtest.engine import run_strategies
from training.backtest.report import write_report
from training.backtest.signals import signal_table
from training.backtest.simulate import Costs
from training.backtest.walkforward import Period, check_unseen, make_periods, walk_forward_table

EMBARGO = 72
DAY = 86_400_000


@dataclass
class FakeForecast:
    """The Forecast fields the backtest reads."""

    candle_open_time: int
    signal_type: str
    confidence: float
    entry_price: float
    take_profit: float | None
    stop_loss: float | None
    signal_probs: tuple[float, float, float]
    p_tp_long: float
    p_tp_short: float
    reason: str | None = None


@dataclass
class Recorder:
    """A 'model set' that remembers the last candle it was trained on and every row it forecast."""

    trained_until: int
    asked: list[np.ndarray] = field(default_factory=list)
    horizons: tuple[int, ...] = (6, 18, 36, 72)
    symbols: tuple[str, ...] = ("BTCUSDT", "ETHUSDT")

    @property
    def versions(self) -> dict[str, str]:
        return {"range_predictor": f"fake-until-{self.trained_until}"}

    def forecast(self, features, symbols, closes, candle_open_times, horizon):
        self.asked.append(np.asarray(candle_open_times, dtype=np.int64))
        roc = features[:, FEATURE_NAMES.index("roc_3")]
        atr = features[:, FEATURE_NAMES.index("atr_14")]
        out = []
        for i in range(len(features)):
            c = float(closes[i])
            tp, sl = 0.75 * atr[i] * np.sqrt(horizon), 0.5 * atr[i] * np.sqrt(horizon)
            conf = float(0.4 + min(0.5, abs(roc[i]) * 200))
            if roc[i] > 0:
                out.append(FakeForecast(int(candle_open_times[i]), "BUY", conf, c, c * (1 + tp), c * (1 - sl),
                                        (0.1, 0.2, 0.7), 0.5, 0.3))
            elif roc[i] < 0:
                out.append(FakeForecast(int(candle_open_times[i]), "SELL", conf, c, c * (1 - tp), c * (1 + sl),
                                        (0.7, 0.2, 0.1), 0.3, 0.5))
            else:
                out.append(FakeForecast(int(candle_open_times[i]), "HOLD", 0.0, c, None, None, (0.2, 0.6, 0.2),
                                        0.3, 0.3, "flat"))
        return out


@pytest.fixture(scope="module")
def recent(real_candles):
    """The last 24 days of both symbols (enough for warm-up plus three weekly periods)."""
    cands = {s: c.iloc[-24 * 288:].reset_index(drop=True) for s, c in real_candles.items()}
    feats = {s: build_features(c) for s, c in cands.items()}
    return cands, feats


def test_walk_forward_never_trades_a_period_with_a_model_that_saw_it(recent):
    cands, feats = recent
    end = min(int(c.open_time.iloc[-1]) for c in cands.values()) + FIVE_MINUTES_MS
    start = end - 14 * DAY
    periods = make_periods(start, end, pd.DateOffset(days=5), EMBARGO)
    assert len(periods) == 3 and periods[-1].test_end_ms == end
    fits: list[tuple[Period, dict[str, int], Recorder]] = []

    def fit(train, period):
        last = {s: int(c.open_time.iloc[-1]) for s, c in train.items()}
        model = Recorder(max(last.values()))
        fits.append((period, last, model))
        return model

    strat = load_strategies()
    cols = sorted({c for s in strat.values() for c in s.feature_columns})
    table, info = walk_forward_table(cands, feats, fit, periods, [36], EMBARGO, cols)
    assert [f[0].index for f in fits] == [0, 1, 2]  # one fresh fit per period, in order
    for period, last, model in fits:
        # Trained on candles ending at least the embargo before the period...
        for s, t in last.items():
            assert t < period.test_start_ms - EMBARGO * FIVE_MINUTES_MS + 1
        # ... and asked only about candles of its own period.
        asked = np.concatenate(model.asked)
        assert len(asked) > 0
        assert asked.min() >= period.test_start_ms and asked.max() < period.test_end_ms
        assert asked.min() - model.trained_until > EMBARGO * FIVE_MINUTES_MS
    # Every signal row names the model that made it, and lies in that model's period.
    sig = table.signals
    assert set(sig.wf_period) == {0, 1, 2}
    for p in periods:
        rows = sig[sig.wf_period == p.index]
        assert rows.open_time.between(p.test_start_ms, p.test_end_ms - 1).all()
    assert [d["index"] for d in info] == [0, 1, 2] and info[0]["model_versions"]
    # The guard refuses a table in which a row is attributed to a model trained after it...
    bad = sig.copy()
    bad.loc[bad.index[0], "wf_period"] = 2
    with pytest.raises(AssertionError, match="outside"):
        check_unseen(bad, periods, EMBARGO)
    # ... or a period whose training cut does not leave the embargo.
    leaky = [Period(p.index, p.test_start_ms, p.test_end_ms, p.test_start_ms) for p in periods]
    with pytest.raises(AssertionError, match="training window"):
        check_unseen(sig, leaky, EMBARGO)
    # The merged table backtests like any other.
    body, runs = run_strategies(strat, cands, table, Costs(), start, end, random_seeds=2)
    assert body["strategies"]["all_signals"]["metrics"]["trades"] > 0


def test_report_renders(recent, tmp_path):
    cands, feats = recent
    start = min(int(c.open_time.iloc[-1]) for c in cands.values()) - 10 * DAY
    strat = load_strategies()
    cols = sorted({c for s in strat.values() for c in s.feature_columns})
    model = Recorder(0)
    table = signal_table(model, cands, feats, sorted({s.horizon for s in strat.values()}), start, None, cols)
    body, runs = run_strategies(strat, cands, table, Costs(), start, None, random_seeds=3)
    result = {"config": {"start": "x", "symbols": sorted(cands), "fee_bps": 7.5, "slippage_bps": 2.0},
              "out_of_sample": True, **body}
    path = write_report(result, {n: r.trades for n, r in runs.items()}, tmp_path / "rep")
    text = path.read_text()
    assert "| strategy | trades |" in text and "## all_signals" in text and "| month |" in text
    assert "| strategy | total R | filter-only total R |" in text and "| rows | probability → event |" in text
    assert set(body["calibration_by_horizon"]) == {"36", "72"}
    for s in body["strategies"].values():  # issue 15's baselines and portfolio figures beside the old keys
        assert {"filter_only", "always_long", "always_short", "buy_and_hold"} <= set(s["baselines"])
        assert {"sharpe_daily", "sharpe_daily_ci", "daily_r_corr_between_symbols"} <= set(s["portfolio"])
        assert {"BUY", "SELL", "direction_auc"} <= set(s["calibration_by_class"])
    pngs = sorted((tmp_path / "rep").glob("*.png"))
    traded = [n for n, r in runs.items() if len(r.trades)]
    assert "all_signals" in traded
    assert len(pngs) == 3 * len(traded)
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f"]({png.name})" in text  # every plot is linked from the report
    assert (tmp_path / "rep" / "result.json").exists()
    assert len(pd.read_csv(tmp_path / "rep" / "trades_all_signals.csv")) == runs["all_signals"].trades.shape[0]
