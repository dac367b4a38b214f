"""Backtest trade simulation, checked by hand on small crafted candle series."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from features.candles import FIVE_MINUTES_MS
from training.backtest.simulate import Costs, simulate

T0 = 1_735_689_600_000  # 2025-01-01 00:00 UTC
NO_COSTS = Costs(fee_bps=0.0, slippage_bps=0.0)


def candles(rows: list[tuple[float, float, float, float]], missing: tuple[int, ...] = ()) -> pd.DataFrame:
    """Candles from (open, high, low, close); slot numbers in ``missing`` are skipped (a gap)."""
    slots = [i for i in range(len(rows) + len(missing)) if i not in missing]
    return pd.DataFrame({"open_time": [T0 + s * FIVE_MINUTES_MS for s in slots],
                         "open": [r[0] for r in rows], "high": [r[1] for r in rows], "low": [r[2] for r in rows],
                         "close": [r[3] for r in rows], "volume": 1.0})


def signal(slot: int, side: int, tp: float, sl: float, horizon: int, symbol: str = "BTCUSDT",
           confidence: float = 0.7) -> dict:
    return {"open_time": T0 + slot * FIVE_MINUTES_MS, "symbol": symbol, "side": side, "confidence": confidence,
            "tp_frac": tp, "sl_frac": sl, "horizon": horizon}


def run(rows, sigs, costs=NO_COSTS, missing=()) -> pd.DataFrame:
    return simulate({"BTCUSDT": candles(rows, missing)}, pd.DataFrame(sigs), costs)


FLAT = (100.0, 100.0, 100.0, 100.0)


def test_take_profit_first_long():
    # Entry at the open of candle 1 = 100; TP 102, SL 99. Candle 1 stays inside; candle 2 reaches 102.5.
    rows = [FLAT, (100, 101, 99.5, 100.5), (100.5, 102.5, 100.2, 102.2), (102, 103, 98, 99)]
    t = run(rows, [signal(0, +1, 0.02, 0.01, 3)])
    assert len(t) == 1
    tr = t.iloc[0]
    assert tr.outcome == "tp" and tr.bars == 2
    assert tr.entry_time == T0 + FIVE_MINUTES_MS and tr.exit_time == T0 + 2 * FIVE_MINUTES_MS
    assert tr.entry_price == 100 and tr.tp_price == pytest.approx(102) and tr.sl_price == pytest.approx(99)
    assert tr.exit_price == pytest.approx(102)
    assert tr.r == pytest.approx(2.0)  # +2 per unit over a planned risk of 1


def test_stop_first_short():
    # Short at 100; TP 98, SL 101. Candle 1 rises to 101.2 before candle 2 would have paid 97.
    rows = [FLAT, (100, 101.2, 99.5, 100.8), (100.8, 100.9, 97, 97.5)]
    tr = run(rows, [signal(0, -1, 0.02, 0.01, 2)]).iloc[0]
    assert tr.outcome == "sl" and tr.bars == 1
    assert tr.exit_price == pytest.approx(101)
    assert tr.r == pytest.approx(-1.0)
    assert tr.side == -1


def test_candle_touching_both_counts_as_stop():
    # One wide candle spans both TP (102) and SL (99): we cannot know the order, so it is the stop.
    rows = [FLAT, (100, 102.5, 98.5, 101)]
    tr = run(rows, [signal(0, +1, 0.02, 0.01, 1)]).iloc[0]
    assert tr.outcome == "sl" and tr.r == pytest.approx(-1.0)


def test_expiry_exits_at_the_horizon_close():
    rows = [FLAT, (100, 100.6, 99.6, 100.2), (100.2, 100.8, 99.4, 100.5), (100.5, 101, 99.5, 100.7), (100.7, 105, 90, 95)]
    tr = run(rows, [signal(0, +1, 0.02, 0.01, 3)]).iloc[0]
    assert tr.outcome == "expiry" and tr.bars == 3
    assert tr.exit_time == T0 + 3 * FIVE_MINUTES_MS  # candle t+h, not the wild one after it
    assert tr.exit_price == pytest.approx(100.7)
    assert tr.r == pytest.approx(0.7)


def test_fees_and_slippage_on_both_sides():
    rows = [FLAT, (100, 102.5, 99.5, 102)]
    tr = run(rows, [signal(0, +1, 0.02, 0.01, 1)], Costs(fee_bps=10, slippage_bps=5)).iloc[0]
    # Entry fill 100 x 1.0005 = 100.05; TP exit fill 102 x 0.9995 = 101.949.
    # Net = 101.949 - 100.05 - 0.001 x (100.05 + 101.949) = 1.899 - 0.201999 = 1.697001.
    assert tr.entry_fill == pytest.approx(100.05)
    assert tr.exit_fill == pytest.approx(101.949)
    assert tr.r == pytest.approx(1.697001)
    assert tr.gross_r == pytest.approx(2.0)
    assert tr.ret == pytest.approx(1.697001 / 100.05)
    # A short stopped out pays on both sides too: entry 100 x 0.9995 = 99.95, exit 101 x 1.0005 = 101.0505.
    rows = [FLAT, (100, 101.5, 99.8, 101)]
    tr = run(rows, [signal(0, -1, 0.02, 0.01, 1)], Costs(fee_bps=10, slippage_bps=5)).iloc[0]
    net = -(101.0505 - 99.95) - 0.001 * (99.95 + 101.0505)
    assert tr.r == pytest.approx(net)  # -1.301501


def test_entry_at_next_open_and_barriers_reanchored():
    # The signal candle closes at 100 but the next opens at 101: entry 101, TP/SL by the same fractions.
    rows = [FLAT, (101, 102.9, 100.5, 102), (102, 103.1, 101.5, 103)]
    tr = run(rows, [signal(0, +1, 0.02, 0.01, 2)]).iloc[0]
    assert tr.entry_price == 101
    assert tr.tp_price == pytest.approx(103.02) and tr.sl_price == pytest.approx(99.99)
    assert tr.outcome == "tp" and tr.bars == 2  # 102.9 < 103.02 in candle 1, 103.1 in candle 2
    assert tr.r == pytest.approx(2.0)


def test_one_position_per_symbol():
    rows = [FLAT] + [(100, 100.5, 99.5, 100)] * 8
    sigs = [signal(0, +1, 0.02, 0.01, 3), signal(1, -1, 0.02, 0.01, 3), signal(2, +1, 0.02, 0.01, 3),
            signal(3, +1, 0.02, 0.01, 3), signal(3, +1, 0.02, 0.01, 3, symbol="ETHUSDT")]
    both = {"BTCUSDT": candles(rows), "ETHUSDT": candles(rows)}
    t = simulate(both, pd.DataFrame(sigs), NO_COSTS)
    btc = t[t.symbol == "BTCUSDT"]
    # First trade: entered at candle 1, expires at candle 3. Signals at 1 and 2 are skipped; the one
    # at candle 3 (the exit candle) may enter at candle 4. Another symbol trades independently.
    assert list(btc.signal_time) == [T0, T0 + 3 * FIVE_MINUTES_MS]
    assert list(btc.entry_time) == [T0 + FIVE_MINUTES_MS, T0 + 4 * FIVE_MINUTES_MS]
    assert (t.symbol == "ETHUSDT").sum() == 1


def test_most_confident_signal_wins_a_tie():
    rows = [FLAT, (100, 100.5, 99.5, 100), (100, 100.5, 99.5, 100)]
    sigs = [signal(0, +1, 0.02, 0.01, 1, confidence=0.6), signal(0, -1, 0.02, 0.01, 1, confidence=0.9)]
    t = run(rows, sigs)
    assert len(t) == 1 and t.iloc[0].side == -1


def test_trade_running_into_a_gap_is_closed_before_it():
    # Slot 3 is missing. A 4-candle trade from slot 0 is closed at the close of slot 2.
    rows = [FLAT, (100, 100.5, 99.5, 100.3), (100.3, 100.6, 99.7, 100.4), (90, 91, 89, 90), (90, 91, 89, 90)]
    t = run(rows, [signal(0, +1, 0.02, 0.01, 4)], missing=(3,))
    tr = t.iloc[0]
    assert tr.outcome == "gap" and tr.bars == 2
    assert tr.exit_time == T0 + 2 * FIVE_MINUTES_MS and tr.exit_price == pytest.approx(100.4)
    # A signal on the last candle before the gap has no next open: not traded.
    assert run(rows, [signal(2, +1, 0.02, 0.01, 1)], missing=(3,)).empty
    # The end of the data truncates the same way, reported as "end".
    tr = run(rows[:3], [signal(0, +1, 0.02, 0.01, 4)]).iloc[0]
    assert tr.outcome == "end" and tr.bars == 2 and tr.exit_price == pytest.approx(100.4)
    # A barrier reached before the gap is an ordinary exit.
    rows[2] = (100.3, 102.5, 99.7, 102)
    assert run(rows, [signal(0, +1, 0.02, 0.01, 4)], missing=(3,)).iloc[0].outcome == "tp"


def test_stop_skipped_by_an_opening_jump_fills_at_the_open():
    rows = [FLAT, (100, 100.5, 99.5, 99.5), (97, 97.5, 96, 97)]  # opens below the 99 stop
    tr = run(rows, [signal(0, +1, 0.02, 0.01, 2)]).iloc[0]
    assert tr.outcome == "sl" and tr.exit_price == pytest.approx(97) and tr.r == pytest.approx(-3.0)


def test_bad_signal_tables_are_refused():
    rows = [FLAT, FLAT]
    with pytest.raises(ValueError, match="tp_frac"):
        run(rows, [signal(0, +1, float("nan"), 0.01, 1)])
    with pytest.raises(ValueError, match="side"):
        run(rows, [signal(0, 0, 0.02, 0.01, 1)])
    with pytest.raises(ValueError, match="not a candle"):
        run(rows, [{**signal(0, +1, 0.02, 0.01, 1), "open_time": T0 + 7}])
    with pytest.raises(ValueError, match="lacks columns"):
        run(rows, [{"open_time": T0, "symbol": "BTCUSDT"}])


def test_matches_the_labels_on_real_candles(real_candles):
    """Entered at the next open with barriers re-anchored, the simulator's outcomes agree with the
    training labels (entered at the signal close) wherever the next open equals that close."""
    from configs.sections import LabelParams
    from features.barriers import barrier_distances
    from features.costs import Costs, round_trip_cost
    from features.labels import build_labels, naive_sigma

    c = real_candles["ETHUSDT"].iloc[-3000:].reset_index(drop=True)
    h = 18
    costs = Costs()  # labels and simulator charge the same costs: net R agrees too
    lab = build_labels(c, [h], costs=costs)
    tp, sl = barrier_distances(naive_sigma(c, h), LabelParams(), float(round_trip_cost(costs)))
    o, cl = c["open"].to_numpy(), c["close"].to_numpy()
    same = np.zeros(len(c), bool)
    same[:-1] = o[1:] == cl[:-1]
    rows = np.flatnonzero(same & np.isfinite(tp) & lab[f"outcome_long_{h}"].notna().to_numpy())[::50]
    assert len(rows) > 10
    code = {"tp": 1, "sl": -1, "expiry": 0}
    for i in rows:  # one signal per run, so the one-position rule does not interfere
        sig = pd.DataFrame([{"open_time": int(c.open_time[i]), "symbol": "ETHUSDT", "side": 1, "confidence": 0.5,
                             "tp_frac": tp[i], "sl_frac": sl[i], "horizon": h}])
        tr = simulate({"ETHUSDT": c}, sig, NO_COSTS).iloc[0]
        assert code[tr.outcome] == lab[f"outcome_long_{h}"].iloc[i]
        assert simulate({"ETHUSDT": c}, sig, costs).iloc[0].r == pytest.approx(lab[f"r_long_{h}"].iloc[i], rel=1e-9)
