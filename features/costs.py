"""Trading costs: one definition of what entering and leaving a position costs (issue 15).

The backtest (training/backtest/simulate.py), the labels (features/labels.py) and live outcome
resolution (deployments/db/outcomes.py) all call these functions with the same :class:`Costs`
(built from Settings by :meth:`Costs.from_settings`, i.e. from the fee profile of configs/fees.yaml),
so a label, a backtested trade and a resolved live signal charge exactly the same costs.

Model of a trade of ``side`` (+1 long, -1 short) from ``entry`` to ``exit`` (prices before costs):

* both fills slip against the trade: ``entry x (1 + side x slippage)``, ``exit x (1 - side x slippage)``;
* a fee of ``fee`` of the filled notional is paid on each fill;
* a short on a spot venue borrows the base asset (margin): interest of ``borrow_rate_annual / 8760``
  per hour charged on the borrowed quantity, valued at the exit price. Binance Margin charges one
  hour at borrowing and one more at the start of every hour while the loan is open
  (:func:`borrow_hours`). Futures profiles borrow nothing (rate 0): shorts there are futures shorts;
  funding payments are not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from configs.fees import FEES_FILE, load_fee_profiles

if TYPE_CHECKING:  # the hot path needs no Settings at run time (configs imports nothing from here)
    from configs.settings import Settings

HOUR_MS = 3_600_000
HOURS_PER_YEAR = 8760.0


@dataclass(frozen=True)
class Costs:
    """Costs per fill in basis points of the filled notional, plus the annual borrow rate of spot shorts."""

    fee_bps: float = 7.5
    slippage_bps: float = 2.0
    borrow_rate_annual: float = 0.0  # a fraction per year (0.05 = 5 %/yr); 0 = shorts borrow nothing (futures)
    profile: str = "custom"  # the fee profile of configs/fees.yaml these came from (reported with results)

    def __post_init__(self) -> None:
        if not (0 <= self.fee_bps < 1000 and 0 <= self.slippage_bps < 1000):
            raise ValueError("fee_bps and slippage_bps must be in [0, 1000)")
        if not 0 <= self.borrow_rate_annual < 10:
            raise ValueError("borrow_rate_annual must be in [0, 10) (a fraction per year)")

    @property
    def fee(self) -> float:
        return self.fee_bps / 1e4

    @property
    def slippage(self) -> float:
        return self.slippage_bps / 1e4

    @property
    def borrow_rate_hourly(self) -> float:
        return self.borrow_rate_annual / HOURS_PER_YEAR

    @classmethod
    def from_settings(cls, settings: "Settings") -> "Costs":
        """The costs the engine runs with: ``fee_rate``, ``slippage_rate``, ``borrow_rate`` of Settings
        (each the selected ``fee_profile``'s value unless set explicitly)."""
        return cls(fee_bps=round(settings.fee_rate * 1e4, 9), slippage_bps=round(settings.slippage_rate * 1e4, 9),
                   borrow_rate_annual=settings.borrow_rate, profile=settings.fee_profile)


def profile_costs(name: str, config_dir: str | Path | None = None) -> Costs:
    """The :class:`Costs` of fee profile ``name`` as ``configs/fees.yaml`` defines it (no Settings
    overrides): the backtest's ``--fee-profile`` compares venues with it."""
    profiles = load_fee_profiles(config_dir)
    if name not in profiles:
        raise ValueError(f"unknown fee profile {name!r}; {FEES_FILE} has {', '.join(profiles)}")
    p = profiles[name]
    return Costs(fee_bps=p.fee_bps, slippage_bps=p.slippage_bps, borrow_rate_annual=p.borrow_rate_annual or 0.0,
                 profile=name)


def borrow_hours(entry_ms: np.ndarray | int, exit_ms: np.ndarray | int) -> np.ndarray:
    """Hours of interest a margin loan from ``entry_ms`` to ``exit_ms`` is charged (Binance Margin:
    one at borrowing, one at the start of each later hour the loan is still open)."""
    entry_ms = np.asarray(entry_ms, np.int64)
    exit_ms = np.asarray(exit_ms, np.int64)
    return 1 + exit_ms // HOUR_MS - entry_ms // HOUR_MS


def holding_hours(candles: np.ndarray | int, candle_ms: int = 300_000) -> np.ndarray:
    """Hours charged for a trade held ``candles`` candles, before its times are known (labels, plans):
    the worst case over where the entry falls within the hour, ``1 + ceil(held / 1 h)``."""
    held = np.asarray(candles, np.int64) * candle_ms
    return 1 + -(-held // HOUR_MS)


def borrow_cost(costs: Costs, side: np.ndarray | int, hours: np.ndarray | float) -> np.ndarray:
    """Interest of a short's borrowed quantity, as a fraction of that quantity (0 for longs)."""
    side = np.asarray(side)
    return np.where(side < 0, costs.borrow_rate_hourly * np.asarray(hours, np.float64), 0.0)


def round_trip_cost(costs: Costs, side: np.ndarray | int = 1, hours: np.ndarray | float = 0.0) -> np.ndarray:
    """What a round trip costs as a fraction of the entry price, for an exit at the entry price:
    fee and slippage on both fills plus, for a short held ``hours`` (hours charged), borrow interest.

    This is the cost a label or a barrier floor compares with a move: ``2 x (fee + slippage)``
    (19 bps for spot taker) plus a few hundredths of a bp per hour for spot shorts.
    """
    return 2.0 * (costs.fee + costs.slippage) + borrow_cost(costs, side, hours)


def net_return(side: np.ndarray | int, entry: np.ndarray, exit_price: np.ndarray, costs: Costs,
               hours: np.ndarray | float = 0.0) -> np.ndarray:
    """Net profit per unit of the position, as a fraction of the (unslipped) ``entry`` price.

    ``side x (exit_fill - entry_fill) - fee x (entry_fill + exit_fill) - borrow x exit``, divided by
    ``entry``. In units of the stop distance: ``net_return / stop_fraction`` is the trade's R.
    """
    side = np.asarray(side, np.float64)
    entry = np.asarray(entry, np.float64)
    exit_price = np.asarray(exit_price, np.float64)
    entry_fill = entry * (1 + side * costs.slippage)
    exit_fill = exit_price * (1 - side * costs.slippage)
    pnl = side * (exit_fill - entry_fill) - costs.fee * (entry_fill + exit_fill)
    pnl = pnl - borrow_cost(costs, side, hours) * exit_price
    return pnl / entry
