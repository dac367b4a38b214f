"""``python -m training.backtest`` (see training/backtest/cli.py)."""

import sys

from training.backtest.cli import main

sys.exit(main())
