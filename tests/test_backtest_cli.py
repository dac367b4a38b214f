"""``python -m training.backtest`` end to end on the shipped sample with a small real model set.

The model is trained by the training engineer's plain engine (few rounds: this checks wiring, JSON
keys, the out-of-sample flag, errors and the walk-forward path with real fits — trade arithmetic is
checked by hand in test_backtest_simulate.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SAMPLE_DATA
from training.backtest.cli import main

FILES = [str(SAMPLE_DATA / f"{s}_5m.parquet") for s in ("BTCUSDT", "ETHUSDT")]
TRAIN_END = "2025-11-10"


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Path:
    from configs.settings import get_settings
    from training.data import parse_candle_args
    from training.engines import PlainEngine
    from training.train import train, with_overrides

    out = tmp_path_factory.mktemp("bt_models")
    train(with_overrides(get_settings(), rounds=2, folds=2), parse_candle_args(FILES), PlainEngine(nthread=1), out=out,
          end=TRAIN_END)
    return out


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_json_keys_and_report(registry, capsys, tmp_path):
    code, out, err = _run(capsys, "--models", str(registry), "--candles", *FILES, "--start", TRAIN_END,
                          "--random-seeds", "3", "--json", "--report", str(tmp_path / "rep"))
    assert code == 0, err
    res = json.loads(out)
    assert {"config", "out_of_sample", "candles", "forecasts", "hold_reasons", "buy_and_hold", "strategies"} <= set(res)
    assert res["out_of_sample"] is True and res["config"]["models_trained_until"] < "2025-11-10"
    assert res["config"]["fee_bps"] == 7.5 and res["config"]["slippage_bps"] == 2.0
    assert res["config"]["fee_profile"] == "spot_taker" and res["config"]["borrow_rate_annual"] == 0.05
    assert set(res["strategies"]) == {"all_signals", "aggressive_filter", "conservative"}
    for s in res["strategies"].values():
        assert {"definition", "signals", "metrics", "per_symbol", "per_month", "calibration", "random_entry"} <= set(s)
        assert {"trades", "win_rate", "avg_r", "total_r", "profit_factor", "expectancy_r", "max_drawdown_r",
                "sharpe_per_trade", "exposure", "return_pct_1x", "outcomes"} <= set(s["metrics"])
    # Every feature-defined candle of the period was forecast at all_signals' (unfiltered) horizon;
    # at conservative's horizon only the rows its feature filters let through.
    assert sum(res["forecasts"]["36"].values()) == sum(res["candles"].values())
    assert 0 < sum(res["forecasts"]["72"].values()) < sum(res["candles"].values())
    assert set(res["buy_and_hold"]["per_symbol"]) == {"BTCUSDT", "ETHUSDT"}
    assert (tmp_path / "rep" / "report.md").exists() and (tmp_path / "rep" / "result.json").exists()


def test_cli_flags_in_sample_and_refuses_bad_input(registry, capsys):
    code, out, err = _run(capsys, "--models", str(registry), "--candles", *FILES, "--start", "2025-11-01",
                          "--strategy", "all_signals", "--random-seeds", "1", "--json")
    assert code == 0
    res = json.loads(out)
    assert res["out_of_sample"] is False and "NOT out of sample" in err
    assert list(res["strategies"]) == ["all_signals"]
    code, out, err = _run(capsys, "--models", str(registry), "--candles", *FILES, "--strategy", "moonshot")
    assert code == 2 and "unknown strategy 'moonshot'" in err
    code, out, err = _run(capsys, "--models", str(registry / "nothing"), "--candles", *FILES)
    assert code == 2 and "error:" in err


def test_batch_signals_equal_per_row_forecasts(registry):
    """The backtest's batch path gives exactly what serving's one-row calls give."""
    from configs.settings import get_settings
    from features.batch import build_features
    from features.candles import load_candles
    from training.backtest.signals import forecasts_to_frame
    from inference.ensemble import Ensemble

    ens = Ensemble.load(registry, get_settings())
    c = load_candles(FILES[0]).iloc[-1200:].reset_index(drop=True)
    F = build_features(c).to_numpy()
    rows = np.flatnonzero(np.isfinite(F).all(axis=1))[:40]
    t, close = c.open_time.to_numpy(), c.close.to_numpy()
    batch = forecasts_to_frame(ens.forecast(F[rows], ["BTCUSDT"] * len(rows), close[rows], t[rows], 72))
    single = forecasts_to_frame([ens.forecast(F[i:i + 1], ["BTCUSDT"], close[i:i + 1], t[i:i + 1], 72)[0]
                                 for i in rows])
    assert batch.equals(single)


def test_cli_walk_forward_with_real_fits(capsys, tmp_path):
    code, out, err = _run(capsys, "--candles", *FILES, "--start", "2025-11-05", "--wf-months", "1",
                          "--walk-forward", "--wf-rounds", "1", "--wf-folds", "2", "--wf-dir", str(tmp_path / "wf"),
                          "--strategy", "all_signals", "--random-seeds", "1", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["out_of_sample"] is True and res["config"]["walk_forward"] is True
    (period,) = res["walk_forward"]
    assert period["test_start"].startswith("2025-11-05") and period["last_train_candle"] < "2025-11-04T18:00"
    assert (tmp_path / "wf" / "period_0" / "meta_model" / "current").exists()
