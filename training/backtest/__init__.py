"""Backtests of the signal strategies: ``python -m training.backtest`` (docs/backtests.md).

``simulate`` turns a signal table into trades (numpy; reuses ``features.labels.first_touch``),
``strategy`` filters signals by a declarative strategy, ``signals`` gets them from the serving
ensemble, ``metrics``/``baselines`` summarise, ``walkforward`` refits per period, ``report`` draws.
"""

from training.backtest.simulate import SIGNAL_COLUMNS, Costs, simulate

__all__ = ["SIGNAL_COLUMNS", "Costs", "simulate"]
