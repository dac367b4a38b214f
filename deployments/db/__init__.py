"""Prediction and signal logs in PostgreSQL (schema ``ml``), resolved against the market.

- :mod:`.migrate` — versioned plain-SQL migrations, applied at start-up.
- :mod:`.rows` — what a ``Forecast`` becomes in the tables (pure; deterministic ids).
- :mod:`.spool` / :mod:`.spool_files` — the durable local journal; a spool directory read from disk.
- :mod:`.writer` / :mod:`.drain` — the never-blocking ``LogWriter`` and its thread that drains the
  spool into PostgreSQL (:mod:`.insert`: the batched inserts, outage vs refused row).
- :mod:`.outcomes` — pure outcome scoring on a candle history (reuses ``features.labels``).
- :mod:`.due_rows` — the resolver's SQL: due rows selected, scored, written back.
- :mod:`.live_metrics` / :mod:`.live_gauges` — rolling accuracy per model version and the drift flag;
  their Prometheus gauges and walk-forward baselines.
- :mod:`.resolver` — the ``OutcomeResolver`` Ray actor that runs at each candle close;
  :mod:`.forwarder` — the router-side ``CandleForwarder`` that feeds it.
- :mod:`.serving_log` — the ``ServingLog`` hook that ties them to the Serve graph.
"""
