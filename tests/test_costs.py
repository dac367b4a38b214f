"""Fee profiles (configs/fees.yaml) and the one cost definition (features/costs.py), by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from configs.fees import load_fee_profiles
from configs.settings import load_settings
from features.candles import FIVE_MINUTES_MS
from features.costs import Costs, borrow_hours, holding_hours, net_return, profile_costs, round_trip_cost
from configs.errors import ConfigError
from training.backtest.cli import backtest_costs, parse_args
from training.backtest.simulate import simulate

T0 = 1_735_689_600_000  # 2025-01-01 00:00 UTC (an hour boundary)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    import os

    for key in list(os.environ):
        if key.startswith("MLE_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no stray .env
    return monkeypatch


def test_shipped_profiles_and_round_trips(clean_env):
    assert set(load_fee_profiles()) == {"spot_taker", "spot_maker", "futures_taker", "futures_maker"}
    s = load_settings()
    assert (s.fee_profile, s.fee_rate, s.slippage_rate, s.borrow_rate) == ("spot_taker", 0.00075, 0.0002, 0.05)
    # 2 x (7.5 + 2) bps for spot taker; 2 x 4.5 + 2 x 2 futures taker; 2 x 1.8 futures maker.
    assert round_trip_cost(Costs.from_settings(s)) == pytest.approx(0.0019)
    assert round_trip_cost(profile_costs("futures_taker")) == pytest.approx(0.0013)
    assert round_trip_cost(profile_costs("futures_maker")) == pytest.approx(0.00036)
    # A spot short held 7 hours of interest at 5 %/yr pays 7 x 0.05 / 8760 more; a futures short nothing.
    assert round_trip_cost(Costs.from_settings(s), -1, 7) == pytest.approx(0.0019 + 7 * 0.05 / 8760)
    assert round_trip_cost(profile_costs("futures_taker"), -1, 7) == pytest.approx(0.0013)


def test_explicit_values_win_over_the_profile(clean_env):
    clean_env.setenv("MLE_FEE_PROFILE", "futures_taker")
    clean_env.setenv("MLE_FEE_RATE", "0.0004")
    c = Costs.from_settings(load_settings())
    assert (c.profile, c.fee_bps, c.slippage_bps, c.borrow_rate_annual) == ("futures_taker", 4.0, 2.0, 0.0)
    with pytest.raises(ConfigError, match="not a profile"):
        load_settings(fee_profile="spot_takr")
    with pytest.raises(ConfigError, match="borrow nothing"):
        load_settings(borrow_rate=0.1)  # futures_taker from the environment: no borrowing there
    # The backtest's flags: --fee-profile as the file defines it, then --fee-bps/--slippage-bps on top.
    args = parse_args(["--candles", "x.parquet", "--fee-profile", "spot_maker", "--slippage-bps", "1"])
    assert backtest_costs(args, load_settings()) == Costs(7.5, 1.0, 0.05, "spot_maker")
    assert backtest_costs(parse_args(["--candles", "x.parquet"]), load_settings()) == c


def test_bad_fee_file_names_the_key(clean_env, tmp_path):
    (tmp_path / "fees.yaml").write_text("fee_profiles:\n  spot_taker:\n    description: x\n    venue: spot\n"
                                        "    fee_bps: 7.5\n    slippage_bps: 2\n    borrow_rate_anual: 0.05\n")
    with pytest.raises(ConfigError, match=r"spot_taker\.borrow_rate_anual"):
        load_settings(config_dir=tmp_path)


def test_borrow_hours_as_binance_margin_charges():
    # Binance's example: borrowed 13:55, repaid 14:30 -> two hours (one at borrowing, one at 14:00).
    h = 3_600_000
    assert borrow_hours(T0 + 13 * h + 55 * 60_000, T0 + 14 * h + 30 * 60_000) == 2
    assert borrow_hours(T0, T0 + h - 1) == 1
    assert list(holding_hours(np.array([1, 12, 13]))) == [2, 2, 3]  # worst case over the entry minute


def test_simulated_spot_short_pays_borrow_and_matches_net_return():
    # Short entered at 100 (open of candle 1), expires at the close 99 of candle 24 (2 hours of candles:
    # entry 00:05, exit candle closes 02:05 -> hours charged 00, 01, 02 = 3).
    n = 25
    c = pd.DataFrame({"open_time": T0 + np.arange(n) * FIVE_MINUTES_MS, "open": 100.0, "high": 100.5,
                      "low": 99.0, "close": [100.0] * (n - 1) + [99.0], "volume": 1.0})
    sig = pd.DataFrame([{"open_time": T0, "symbol": "BTCUSDT", "side": -1, "confidence": 0.5, "tp_frac": 0.05,
                         "sl_frac": 0.02, "horizon": 24}])
    costs = Costs(7.5, 2.0, 0.05, "spot_taker")
    tr = simulate({"BTCUSDT": c}, sig, costs).iloc[0]
    assert tr.outcome == "expiry" and tr.exit_price == 99.0
    entry_fill, exit_fill = 100 * (1 - 0.0002), 99 * (1 + 0.0002)
    pnl = (entry_fill - exit_fill) - 0.00075 * (entry_fill + exit_fill) - 3 * 0.05 / 8760 * 99
    assert tr.r == pytest.approx(pnl / 2.0)
    assert float(net_return(-1, 100.0, 99.0, costs, 3)) * 100 == pytest.approx(pnl)
    no_borrow = simulate({"BTCUSDT": c}, sig, Costs(7.5, 2.0)).iloc[0]
    assert no_borrow.r - tr.r == pytest.approx(3 * 0.05 / 8760 * 99 / 2.0)
