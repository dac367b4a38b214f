-- 0001: prediction and signal logs (issue 6).
-- Conventions: candle times are epoch milliseconds of the candle's UTC open, as in the candle files;
-- predicted/actual highs and lows and interval bounds are fractions of the forecast candle's close
-- (0.004 = +0.4%), the units of the range labels and of the walk-forward MAE; prices are prices.
-- `resolve_after` is the open time of candle t+h: a row can be resolved once that candle has closed.

CREATE TABLE ml.prediction_logs (
    id               uuid PRIMARY KEY,
    symbol           text NOT NULL,
    horizon          integer NOT NULL CHECK (horizon > 0),
    candle_open_time bigint NOT NULL,
    resolve_after    bigint NOT NULL,
    model_version    text NOT NULL,              -- range_predictor version
    close            double precision NOT NULL,  -- close of the forecast candle (price)
    predicted_high   double precision NOT NULL,  -- median forecasts, fractions of close
    predicted_low    double precision NOT NULL,
    high_lower       double precision,           -- interval bounds (lower/upper quantiles), fractions
    high_upper       double precision,
    low_lower        double precision,
    low_upper        double precision,
    actual_high      double precision,           -- = build_labels fut_high_h / fut_low_h
    actual_low       double precision,
    mae              double precision,           -- (|pred_high - actual_high| + |pred_low - actual_low|) / 2
    high_inside      boolean,
    low_inside       boolean,
    inside_interval  boolean,                    -- both sides inside their intervals
    resolve_status   text CHECK (resolve_status IN ('ok', 'gap', 'no_data')),
    created_at       timestamptz NOT NULL DEFAULT now(),
    resolved_at      timestamptz
);

CREATE TABLE ml.signal_logs (
    id               uuid PRIMARY KEY,
    symbol           text NOT NULL,
    horizon          integer NOT NULL CHECK (horizon > 0),
    candle_open_time bigint NOT NULL,
    resolve_after    bigint NOT NULL,
    signal_type      text NOT NULL CHECK (signal_type IN ('BUY', 'SELL', 'HOLD')),
    confidence       double precision NOT NULL,
    entry_price      double precision,
    take_profit      double precision,
    stop_loss        double precision,
    model_version    text NOT NULL,              -- meta_model version: the model that decides the signal
    model_versions   jsonb NOT NULL,             -- every model's version
    reason           text,                       -- why HOLD was forced (warm-up, gap, ...)
    outcome          text CHECK (outcome IN ('tp', 'sl', 'expired')),
    exit_price       double precision,
    exit_bar         smallint,                   -- 1-based candle of the exit (h on expiry)
    pnl_percent      double precision,           -- after fees on entry and exit (Settings.fee_rate)
    r_multiple       double precision,           -- net pnl / initial risk (|entry - stop| / entry)
    resolve_status   text CHECK (resolve_status IN ('ok', 'gap', 'no_data', 'not_traded', 'invalid')),
    created_at       timestamptz NOT NULL DEFAULT now(),
    resolved_at      timestamptz
);

-- The resolver: unresolved rows of one symbol that have come due.
CREATE INDEX prediction_logs_due ON ml.prediction_logs (symbol, resolve_after) WHERE resolved_at IS NULL;
CREATE INDEX signal_logs_due ON ml.signal_logs (symbol, resolve_after) WHERE resolved_at IS NULL;

-- /models/status and the drift check: resolved rows per model version over a candle-time window
-- (index-only scans: the aggregated columns are included).
CREATE INDEX prediction_logs_metrics ON ml.prediction_logs (model_version, candle_open_time)
    INCLUDE (horizon, mae, high_inside, low_inside) WHERE mae IS NOT NULL;
CREATE INDEX signal_logs_metrics ON ml.signal_logs (model_version, candle_open_time)
    INCLUDE (outcome, pnl_percent, r_multiple) WHERE outcome IS NOT NULL;
