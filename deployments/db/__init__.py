"""Prediction and signal logs in PostgreSQL (schema ``ml``), resolved against the market.

- :mod:`.migrate` — versioned plain-SQL migrations, applied at start-up.
- :mod:`.rows` — what a ``Forecast`` becomes in the tables (pure; deterministic ids).
- :mod:`.spool` / :mod:`.writer` — the durable, batched, never-blocking ``LogWriter``.
- :mod:`.resolution` — pure outcome resolution on a candle history (reuses ``features.labels``).
- :mod:`.live_metrics` — rolling accuracy per model version and the drift flag.
- :mod:`.resolver` — the ``OutcomeResolver`` Ray actor that runs at each candle close.
"""
