"""The engine's wire schemas: every HTTP response and the ``signals:{symbol}`` message.

One definition, two users: the FastAPI app (deployments/api.py) declares these classes as its
``response_model``s, so docs/openapi.json and docs/api.md are generated from them, and the client
(:mod:`ml_engine_client.client`) parses answers into the very same classes. A field added to the
API is therefore a field of the client, with nothing to copy or keep in step. This module imports
only pydantic: the client installs without Ray or the engine.

Sections that report internals (the log writer, the resolver, a feed's counters) are open models
(``extra="allow"``): their named fields are the stable ones, the rest passes through unvalidated.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

SignalType = Literal["BUY", "SELL", "HOLD"]


class _Open(BaseModel):
    """Named fields are typed; anything else the engine adds is kept as is."""

    model_config = ConfigDict(extra="allow")


# ---- errors ---------------------------------------------------------------------------------
class ErrorBody(BaseModel):
    """Every error response has this shape."""

    error: str = Field(description="machine-readable error code, e.g. `validation_error`, `stale_market_data`")
    message: str = Field(description="what went wrong, for people")
    path: str = Field(description="the request path")
    data_age_s: float | None = Field(None, description="age of the newest market data (stale_market_data and "
                                                       "market_data_gap)")
    missing_candles: int | None = Field(None, description="market_data_gap and stale_market_data: candles that "
                                                          "should have closed since the newest one")
    supported_symbols: list[str] | None = Field(None, description="on validation errors: what the engine serves")
    supported_horizons: list[int] | None = Field(None, description="on validation errors: what the engine serves")
    retry_after_s: float | None = Field(None, description="rate_limited only: seconds until a request is allowed")


# ---- predictions ----------------------------------------------------------------------------
class PriceBand(BaseModel):
    lower: float
    upper: float
    lower_pct: float
    upper_pct: float


class Interval(BaseModel):
    coverage: float = Field(description="probability mass between lower and upper (0.8 = the 10%-90% quantiles)")
    high: PriceBand = Field(description="interval of the highest price over the horizon")
    low: PriceBand = Field(description="interval of the lowest price over the horizon")


class PredictionResponse(BaseModel):
    symbol: str
    horizon: int = Field(description="in 5-minute candles")
    horizon_minutes: int
    candle_open_time: int = Field(description="open time (ms UTC) of the last closed candle the prediction uses")
    candle_time: str = Field(description="the same, ISO 8601")
    close: float = Field(description="close price of that candle")
    predicted_high: float = Field(description="median predicted highest price over the horizon (half the time "
                                               "the high ends above it: the typical move, MAE-optimal)")
    predicted_high_pct: float = Field(description="the same in percent of close (0.4 = +0.4%)")
    predicted_low: float = Field(description="median predicted lowest price over the horizon")
    predicted_low_pct: float
    predicted_high_mean: Optional[float] = Field(
        default=None, description="expected (mean) highest price over the horizon: the squared-error-optimal "
                                  "point forecast, above the median on this right-skewed target; null when the "
                                  "served models have no mean forecast")
    predicted_high_mean_pct: Optional[float] = Field(default=None, description="the same in percent of close")
    predicted_low_mean: Optional[float] = Field(default=None, description="expected (mean) lowest price")
    predicted_low_mean_pct: Optional[float] = Field(default=None, description="the same in percent of close")
    interval: Interval
    model_version: Optional[str] = Field(description="version of the range predictor")
    model_versions: dict[str, str]
    cached: bool = Field(description="answered from the cache (computed at candle close) rather than computed now")
    data_age_s: float = Field(description="feed seconds since that candle closed")


# ---- signals (HTTP answer and pub/sub message share SignalBody) -------------------------------
class Probabilities(BaseModel):
    SELL: Optional[float]
    HOLD: Optional[float]
    BUY: Optional[float]


class SignalBody(BaseModel):
    """The fields of a signal, as ``deployments.render.signal_body`` writes them for both
    POST /signals and the ``signals:{symbol}`` channel."""

    symbol: str
    horizon: int
    horizon_minutes: int
    signal_type: SignalType
    confidence: float = Field(description="calibrated probability that the proposed trade makes money after costs "
                                          "(equal to `p_win`; 0 for a forced HOLD)")
    entry_price: Optional[float]
    take_profit: Optional[float] = Field(description="for HOLD: the would-be long's take-profit, or null")
    stop_loss: Optional[float]
    reason: Optional[str] = Field(description="why the signal is HOLD, as a code (null exactly for BUY and SELL). "
                                  "The models' own HOLDs: `edge_below_costs` (the proposed trade's expected "
                                  "net R after costs, or its predicted range in round-trip costs, is below "
                                  "the floors chosen on out-of-fold data, or the horizon found no edge at "
                                  "all), `low_confidence` (it clears them, but `p_win` is below the floor "
                                  "`MLE_SIGNAL_MIN_CONFIDENCE`). "
                                  "Forced HOLDs (confidence 0, no trade): `market_data_gap` (no candle "
                                  "since the last close: an exchange halt or a lost candle), "
                                  "`stale_market_data` (the feed is down), `features_unavailable` (warming up "
                                  "after a long gap), `market_data_invalid`, `model_output_undefined` "
                                  "(`unknown_symbol` is no longer produced: a symbol the models were not "
                                  "trained on takes a default `symbol_id`, docs/models.md)")
    reason_detail: Optional[str] = Field(None, description="the same for people: what is missing and since when")
    probabilities: Probabilities
    p_tp_long: Optional[float]
    p_tp_short: Optional[float]
    expected_r: Optional[float] = Field(None, description="expected net R of the proposed trade (the larger of "
                                        "BUY/SELL in `probabilities`; for a BUY/SELL the signal itself) after "
                                        "the costs of `fee_profile`: profit in units of the stop distance "
                                        "(entry to `stop_loss`); null for a forced HOLD")
    cost_r: Optional[float] = Field(None, description="the round trip's fees and slippage of `fee_profile` in "
                                    "units of the stop distance (0.25 = a quarter of the risk); null for a "
                                    "forced HOLD")
    p_win: Optional[float] = Field(None, description="calibrated probability that the proposed trade ends with "
                                   "net R > 0 after costs; null for a forced HOLD")
    fee_profile: Optional[str] = Field(None, description="the fee profile (configs/fees.yaml) whose costs "
                                       "`expected_r`, `cost_r` and the labels use, e.g. `spot_taker`")
    close: float
    candle_open_time: int
    candle_time: str
    model_versions: dict[str, str]


class SignalResponse(SignalBody):
    """POST /signals: the signal, where it came from and how old its data is."""

    cached: bool = Field(description="answered from the cache (computed at candle close) rather than computed now")
    data_age_s: float = Field(description="feed seconds since that candle closed")


class SignalMessage(SignalBody):
    """One message on the Redis channel ``signals:{symbol}``, published at every candle close for
    each horizon (JSON text)."""

    published_at: float = Field(description="when the engine published it (Unix seconds, wall clock)")


# ---- market ---------------------------------------------------------------------------------
class IndicatorGroup(BaseModel):
    title: str
    values: dict[str, Optional[float]]


class IndicatorsResponse(BaseModel):
    symbol: str
    candle_open_time: int
    candle_time: str
    close: float
    groups: dict[str, IndicatorGroup]
    data_age_s: float


# ---- models ---------------------------------------------------------------------------------
class ModelInfo(_Open):
    """One served model (GET /models/status ``models.<name>``)."""

    version: str
    created: Optional[str] = None
    training_range: Optional[dict[str, Any]] = Field(None, description="first and last candle of its training data")
    walk_forward_metrics: dict[str, Any] = Field(default_factory=dict, description="metric name -> value")
    walk_forward_setup: dict[str, Any] = Field(default_factory=dict)
    xgboost_version: Optional[str] = None
    code_commit: Optional[str] = None
    feature_set_hash: Optional[str] = None
    loaded_at: Optional[str] = Field(None, description="when this engine loaded it, ISO 8601")


class ModelsStatusResponse(_Open):
    loaded: bool
    versions: dict[str, str] = Field(description="model name -> served version")
    models: dict[str, ModelInfo]
    horizons: list[int] = Field(default_factory=list)
    symbols: list[str] = Field(default_factory=list)
    error: Optional[str] = Field(None, description="why no (or an older) model set is served")
    candles_processed: Optional[int] = None
    fallback: Optional[Any] = Field(None, description="the older set served because the current one does not load")
    live: Optional[dict[str, Any]] = Field(None, description="accuracy on resolved outcomes per model version "
                                                             "(24 h, 7 d, all) and the drift verdict")


# ---- health ---------------------------------------------------------------------------------
class HealthResponse(BaseModel):
    status: Literal["ok"]


class ReadinessCheck(_Open):
    ok: bool


class ReadinessResponse(BaseModel):
    status: Literal["ready"]
    checks: dict[str, ReadinessCheck] = Field(description="`graph`, `models`, `market`: each with `ok`")


class ComponentStates(BaseModel):
    """One word per component; `status` is derived from these."""

    models: str
    cache: str
    database: str
    log: str
    market: str
    feed: str


class ModelsHealth(_Open):
    status: str = Field(description="`up` when a model set is loaded, else `down`")
    loaded: Optional[bool] = None
    versions: dict[str, str] = Field(default_factory=dict)
    error: Optional[str] = None


class CacheHealth(_Open):
    status: str = Field(description="`up`, `down` or `disabled` (Redis)")
    url: Optional[str] = Field(None, description="redacted")
    last_error: Optional[str] = None
    failures: Optional[int] = None


class LogHealth(_Open):
    status: str = Field(description="the log writer: `up`, `spooling`, `spool_full`, `disk_full`, `rejected`, ...")
    writer: Optional[dict[str, Any]] = None
    resolver: Optional[dict[str, Any]] = None
    drift: Optional[dict[str, Any]] = None


class DatabaseHealth(_Open):
    status: str = Field(description="`up` or `down` (PostgreSQL)")
    error: Optional[str] = None
    log: Optional[LogHealth] = Field(None, description="the prediction log (docs/outcomes.md)")


class SymbolMarket(_Open):
    candle_open_time: Optional[int]
    data_age_s: Optional[float]
    stale: bool
    features_ready: bool
    feature_reason: Optional[str]
    history: int
    source: Optional[str]
    gaps: int
    predictions_published: bool
    publish_error: Optional[str]


class MarketHealth(_Open):
    max_data_age_s: float
    symbols: dict[str, SymbolMarket]
    feed: Optional[dict[str, Any]] = Field(None, description="the market feed's own status, per symbol")


class HealthDetailedResponse(_Open):
    status: Literal["ok", "degraded", "down"]
    components: ComponentStates
    models: ModelsHealth
    cache: CacheHealth
    database: DatabaseHealth
    market: MarketHealth
    serve: Optional[dict[str, Any]] = Field(description="Serve applications, deployments and replica states")
    uptime_s: float
