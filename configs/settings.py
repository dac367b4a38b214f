"""Typed settings: one object for the whole engine.

Sources, highest priority first: keyword arguments, ``MLE_*`` environment variables, an optional
``.env`` file, then the YAML files in the config directory (``MLE_CONFIG_DIR``, default: this
package's folder) that operators edit. The ``args`` of serve_config.yaml are *defaults*, below the
environment: ``configs.precedence.below_environment`` drops every arg an ``MLE_*`` variable (or
``.env``) also sets, before they become keyword arguments, so a committed config never silently
outranks what an operator set for one environment (docs/operations.md "Configuration precedence"). Defaults need no environment at all. Unknown keys and bad
values fail at start-up with a :class:`ConfigError` naming the key — a typo in a YAML file must
never silently fall back to a default. The YAML sections' models (market, features, labels,
models) are in ``configs/sections.py``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

from configs.errors import ConfigError
from configs.fees import resolve_costs
from configs.sections import MAX_FEATURE_WINDOW, FeatureParams, LabelParams, MarketConfig, ModelConfig
from configs.symbols import is_synthetic


CONFIG_DIR = Path(__file__).resolve().parent
PROJECT_DIR = CONFIG_DIR.parent
YAML_FILES = ("market.yaml", "features.yaml", "models.yaml")
# Shortest API key accepted: 24 characters of token_urlsafe are 144 random bits, far beyond any
# online or offline guess (launcher.py generates keys of 32 characters).
MIN_API_KEY_LENGTH = 24
# A web origin as browsers send it in the Origin header.
_ORIGIN = re.compile(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


class Settings(BaseSettings):
    """Everything configurable, in one typed object. See docs/configuration.md."""

    model_config = SettingsConfigDict(env_prefix="MLE_", env_file=".env", env_file_encoding="utf-8",
                                      env_nested_delimiter="__", extra="forbid", frozen=True)

    # Operator-edited YAML sections.
    market: MarketConfig = MarketConfig()
    features: FeatureParams = FeatureParams()
    labels: LabelParams = LabelParams()
    models: ModelConfig = ModelConfig()

    # Paths.
    config_dir: Path = CONFIG_DIR
    data_dir: Path = PROJECT_DIR / "data"
    sample_dir: Path = PROJECT_DIR / "data" / "sample"
    models_dir: Path = PROJECT_DIR / "models"
    spool_dir: Path = PROJECT_DIR / "var" / "spool"

    # Services (all optional at run time: the engine degrades without them).
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")  # secret: shown and logged only as redact_url()
    database_url: SecretStr = SecretStr("postgresql://127.0.0.1:5432/test")  # secret, like redis_url

    # HTTP and Ray.
    api_keys: Annotated[list[SecretStr], NoDecode] = []  # MLE_API_KEYS=key1,key2 (each at least 24 characters)
    api_keys_file: Path | None = None  # more keys, one per line ('#' comments): a mounted secret, never Serve args
    # HMAC key of key ids (Redis, logs) and of cache entries; None = derived from the whole key set.
    deployment_secret: SecretStr | None = None
    max_body_bytes: int = Field(16384, ge=256, le=16 << 20)  # larger request bodies: 413 before they are read
    auth_failures_per_minute: int = Field(30, ge=1)  # 401s per client address per minute; beyond: 429
    # Who may read GET /metrics without a key: CIDRs, "loopback", "cluster" (every Ray node's address).
    metrics_networks: list[str] = ["loopback", "cluster"]
    metrics_cache_s: float = Field(5.0, ge=0, le=300)  # GET /metrics serves the node export this long
    handle_timeout_s: float = Field(10.0, gt=0, le=300)  # every DeploymentHandle call on a request path
    # A model-pool call the router waits for before computing that stage itself (a dead or stuck
    # replica must never hold a candle close or a request: the router loads that model of the same set).
    pool_call_timeout_s: float = Field(2.0, gt=0, le=60)
    http_host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=1, le=65535)
    ray_port: int = Field(6380, ge=1, le=65535)
    dashboard_port: int = Field(8265, ge=1, le=65535)  # the Ray dashboard of the head `make serve` starts
    rate_limit_per_minute: int = Field(100, ge=1)
    # Browser origins (scheme://host[:port]) that may call the API: CORS for the platform's frontend.
    # MLE_CORS_ORIGINS=https://a.example,https://b.example; empty = no browser may call it.
    cors_origins: Annotated[list[str], NoDecode] = ["http://localhost:3000"]
    cors_allow_credentials: bool = False  # let browsers send cookies/HTTP auth (never with "*" among the origins)

    # Market feed.
    feed: Literal["replay", "binance"] = "replay"
    replay_speed: float = Field(0.0, ge=0)  # 0 = as fast as possible, 1 = real time, N = xN
    binance_api_url: str = "https://api.binance.com/api"
    binance_ws_url: str = "wss://stream.binance.com:9443/ws"
    # REST request weight per window of the exchange's X-MBX-USED-WEIGHT header (Binance: 6000 a minute
    # per IP) the feed's backfills may use; the rest is left to downloads and other clients of the IP.
    binance_weight_budget: int = Field(4800, ge=1, le=1_000_000)
    binance_streams_per_connection: int = Field(200, ge=1, le=1024)  # kline streams per combined websocket (Binance: <= 1024)
    max_data_age_s: float = Field(900.0, gt=0)  # older market data makes the engine answer 503
    feed_symbols_per_actor: int = Field(100, ge=1, le=1000)  # symbols one MarketData actor (process) streams

    # Prediction and signal logs, outcome resolution, live accuracy (deployments/db, issue 6).
    log_batch_size: int = Field(2000, ge=1, le=100_000)  # rows per INSERT
    log_flush_interval_s: float = Field(0.2, gt=0, le=60)  # longest a logged row waits before it is written
    log_retry_interval_s: float = Field(1.0, gt=0, le=300)  # how often an unreachable PostgreSQL is retried
    db_timeout_s: float = Field(5.0, gt=0, le=300)  # connect/statement timeout: a hung server counts as down
    spool_max_bytes: int = Field(1 << 30, ge=1 << 20)  # disk all spools under spool_dir (the node) may fill; beyond: dropped, counted
    drift_mae_margin: float = Field(0.25, ge=0)  # drift: live MAE > walk-forward MAE x (1 + margin) ...
    drift_min_samples: int = Field(200, ge=1)  # ... over at least this many resolved predictions ...
    drift_window: Literal["24h", "7d", "all"] = "24h"  # ... in this window

    # Trading costs.
    fee_profile: str = "spot_taker"  # a profile of configs/fees.yaml (docs/backtests.md "Costs"); sets the 3 below unless they are set
    # Exchange fee per side, a fraction of the filled notional (0.00075 = 7.5 bps); None = the fee of fee_profile.
    fee_rate: float | None = Field(None, ge=0, lt=0.05)
    slippage_rate: float | None = Field(None, ge=0, lt=0.05)  # slippage per fill, against the trade; None = fee_profile's
    # Annual interest of the base asset a spot short borrows (0.05 = 5 %/yr); None = fee_profile's (0 on futures).
    borrow_rate: float | None = Field(None, ge=0, lt=10)

    # Serving graph, prediction cache and market replay (deployments/, issue 5).
    prediction_ttl_s: float = Field(0.0, ge=0)  # Redis expiry of a cached prediction; 0 = when the next candle closes
    signal_horizon: int | None = None  # horizon of POST /signals when the request names none; None = the shortest
    # A BUY/SELL whose calibrated confidence is below this becomes HOLD with reason `low_confidence`
    # (0 = every BUY/SELL the meta-model ranks first is emitted; backtest strategies apply their own floors).
    signal_min_confidence: float = Field(0.0, ge=0, le=1)
    replay_files: dict[str, Path] = {}  # symbol -> candle file to replay; default: sample_dir/{SYMBOL}_5m.parquet
    replay_history: int = Field(1000, ge=0)  # candles loaded at once before streaming (>= WARMUP: predictions at once)
    # FeatureBuilder shards (deployments FeatureBuilder, FeatureBuilder1, ...), symbols spread by a
    # rendezvous hash; 0 = one shard per 100 symbols (deployments/sharding.py)
    feature_shards: int = Field(0, ge=0, le=64)
    model_poll_s: float = Field(2.0, gt=0, le=3600)  # how often the registry's `current` pointers are checked
    batch_max_size: int = Field(64, ge=1, le=4096)  # @serve.batch size in the model replica pools
    batch_wait_s: float = Field(0.0, ge=0, le=1)  # longest a model request waits for batch-mates (0: batch what queued while the previous batch ran)
    redis_timeout_s: float = Field(0.5, gt=0, le=30)  # a Redis slower than this counts as down
    redis_retry_s: float = Field(1.0, gt=0, le=300)  # how long a down Redis is skipped before it is tried again
    # "module:factory" building the prediction/request log hook (issue 6: PostgreSQL logs); "" = none
    serving_log: str = "deployments.db.serving_log:make_serving_log"
    serve_access_log: bool = True  # the API ingress logs each request (Serve access log); internal hops never do

    # Scheduled retraining, champion/challenger (training/retrain.py, issue 8).
    retrain_margin: float = Field(0.01, ge=0, lt=1)  # promote only if the range MAE is lower by this fraction
    retrain_tolerance: float = Field(0.02, ge=0, lt=1)  # ... and TP/SL Brier and signal accuracy worse by at most this
    retrain_min_eval_rows: int = Field(576, ge=1)  # fewer unseen evaluation rows: keep the champion, decide later
    retrain_holdout_days: float | None = Field(None, gt=0)  # evaluation window; None = the last walk-forward fold
    retrain_history_days: int = Field(365, ge=30)  # history a first download fetches (later runs resume)
    retrain_log: Path = PROJECT_DIR / "var" / "retrain" / "decisions.jsonl"  # one JSON line per decision

    @model_validator(mode="before")
    @classmethod
    def _fee_profile(cls, data: Any) -> Any:
        """Fill ``fee_rate``/``slippage_rate``/``borrow_rate`` from ``fee_profile`` where not set:
        explicit values (keyword, MLE_*, .env) win over the profile's."""
        if not isinstance(data, dict):
            return data
        return resolve_costs(data, data.get("config_dir") or os.environ.get("MLE_CONFIG_DIR"))

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v

    @model_validator(mode="before")
    @classmethod
    def _keys_from_file(cls, data: Any) -> Any:
        """``api_keys_file`` adds its keys to ``api_keys``: keys then never travel in Serve args."""
        path = data.get("api_keys_file") if isinstance(data, dict) else None
        if not path:
            return data
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ValueError(f"api_keys_file: cannot read {path}: {exc.strerror or exc}") from None
        keys = cls._split_keys(data.get("api_keys") or [])
        extra = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        return {**data, "api_keys": [*keys, *extra]}

    @field_validator("api_keys")
    @classmethod
    def _strong_keys(cls, v: list[SecretStr]) -> list[SecretStr]:
        """Short keys can be guessed; the error names the variable and the length, never the key."""
        for i, key in enumerate(v):
            n = len(key.get_secret_value())
            if n < MIN_API_KEY_LENGTH:
                raise ValueError(f"MLE_API_KEYS: key #{i + 1} has {n} characters, at least {MIN_API_KEY_LENGTH} "
                                 "are required (generate one: python -c 'import secrets; "
                                 "print(secrets.token_urlsafe(24))')")
        return v

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, v: Any) -> Any:
        if isinstance(v, str):
            text = v.strip()
            if text.startswith("["):
                return json.loads(text)
            return [o.strip() for o in text.split(",") if o.strip()]
        return v

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        """An origin is exactly what a browser sends in ``Origin``: a trailing slash or a path never matches."""
        for origin in v:
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                raise ValueError(f"MLE_CORS_ORIGINS: {origin!r} is not an origin (scheme://host[:port], no path "
                                 "or trailing slash)")
        return v

    @field_validator("metrics_networks")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for net in v:
            if net not in ("loopback", "cluster"):
                try:
                    ipaddress.ip_network(net, strict=False)
                except ValueError:
                    raise ValueError(f"{net!r} is not a CIDR network, 'loopback' or 'cluster'") from None
        return v

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        if max(self.market.horizons) > MAX_FEATURE_WINDOW:
            raise ValueError("market.horizons: longest horizon exceeds the feature window")
        return self

    @model_validator(mode="after")
    def _check_cors(self) -> "Settings":
        if "*" in self.cors_origins and self.cors_allow_credentials:
            raise ValueError("MLE_CORS_ORIGINS: '*' with MLE_CORS_ALLOW_CREDENTIALS would let every web site make "
                             "credentialed calls; list the frontend's origins instead")
        return self

    @model_validator(mode="after")
    def _check_synthetic(self) -> "Settings":
        synthetic = [s for s in self.market.symbols if is_synthetic(s)]
        if synthetic and self.feed != "replay":
            raise ValueError(f"market.symbols: synthetic symbols ({synthetic[0]}, ... {len(synthetic)} in all) are "
                             f"served by the replay feed only, not by MLE_FEED={self.feed}")
        return self

    @model_validator(mode="after")
    def _check_serving(self) -> "Settings":
        if self.signal_horizon is not None and self.signal_horizon not in self.market.horizons:
            raise ValueError(f"signal_horizon: {self.signal_horizon} is not one of market.horizons "
                             f"{self.market.horizons}")
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        config_dir = Path(os.environ.get("MLE_CONFIG_DIR", CONFIG_DIR))
        yaml_files = [config_dir / name for name in YAML_FILES if (config_dir / name).exists()]
        yaml_source = YamlConfigSettingsSource(settings_cls, yaml_file=yaml_files)
        return init_settings, env_settings, dotenv_settings, yaml_source


_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<cred>[^@/\s]*@)", re.IGNORECASE)


def redact_url(url: str | SecretStr) -> str:
    """``redis://:pw@host/0`` -> ``redis://***@host/0``: the one way a service URL is shown or logged."""
    text = url.get_secret_value() if isinstance(url, SecretStr) else str(url)
    return _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}***@", text)


def scrub(text: str, *urls: str | SecretStr | None) -> str:
    """``text`` (an exception message, a log line) without the credentials of ``urls`` or of any URL in it."""
    for url in urls:
        if url is None:
            continue
        plain = url.get_secret_value() if isinstance(url, SecretStr) else str(url)
        m = _URL_CREDENTIALS.search(plain)
        if m:
            text = text.replace(plain, redact_url(plain))
            user, _, password = m["cred"][:-1].partition(":")
            for secret in (password, m["cred"][:-1]):
                if len(secret) >= 3:  # never blank out single characters all over a message
                    text = text.replace(secret, "***")
    return redact_url(text)


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        lines.append(f"{key}: {err['msg']}")
    return "invalid configuration: " + "; ".join(lines)


def load_settings(**overrides: Any) -> Settings:
    """Build :class:`Settings`, turning validation errors into a :class:`ConfigError` naming keys."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, loaded once (call ``get_settings.cache_clear()`` in tests)."""
    return load_settings()
