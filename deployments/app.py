"""The application graph, for ``serve.run`` (make serve, tests, benchmarks) and ``serve deploy``.

``serve_config.yaml`` names ``deployments.app:build_app`` as its import path; its ``args`` are
Settings *defaults* (any Settings field) that the cluster's ``MLE_*`` variables (or ``.env``) override:
``build_app`` drops every arg the environment also sets, so ``MLE_FEED=binance`` beats the committed
``feed: replay`` (configs/precedence.py ``below_environment``). Code that deploys with
:func:`build_graph` / :func:`deploy` (tests, benchmarks) passes overrides that win over everything. API keys never go in args (they are visible in the Serve config and dashboard):
set ``MLE_API_KEYS`` in the cluster's environment or point ``api_keys_file`` at a mounted secret.

Graph::

    MarketFeed --(owns)--> MarketData actor per symbol --on_candles--> EnsembleRouter
    ApiIngress --cache miss--> RangePredictor | TPSLClassifier | SignalClassifier (parallel) --> MetaModel
               (the EnsembleRouter's forecast when that fails or no model set is published)
    EnsembleRouter --candle close--> the same pools
    EnsembleRouter --ingest/publish--> FeatureBuilder shards --snapshot (long-poll)--> ApiIngress
    (FeatureBuilder, FeatureBuilder1, ...: Settings.feature_shards, symbols by rendezvous hash)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ray.serve import Application

from configs.precedence import below_environment
from configs.settings import load_settings
from deployments.feature_builder import FeatureBuilderDeployment
from deployments.ingress import ApiIngress
from deployments.market_feed import MarketFeed
from configs.errors import ConfigError
from deployments.model_pools import POOL_NAMES, ModelPool
from deployments.router import EnsembleRouter
from deployments.sharding import shard_count, shard_name

log = logging.getLogger("ray.serve")


def _plain(value: Any) -> Any:
    """Overrides travel as JSON-like values (Paths become strings)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The whole graph for ``serve deploy``; ``args`` are defaults below the environment (validated
    here, so a typo fails the deploy)."""
    kept, shadowed = below_environment(_plain(dict(args or {})))
    for key in shadowed:
        log.warning("serve_config args: %s is set in the environment (MLE_%s); the environment wins",
                    key, key.upper().replace(".", "__"))
    return build_graph(kept)


def build_graph(args: dict[str, Any] | None = None, ingress_replicas: int = 1) -> Application:
    """:func:`build_app` with the ingress's replica count (serve_config.yaml sets it per deployment)."""
    overrides = _plain(dict(args or {}))
    secrets_in_args = sorted({"api_keys", "deployment_secret"} & set(overrides))
    if secrets_in_args:
        raise ConfigError(f"{', '.join(secrets_in_args)}: secrets in Serve args are visible in the Serve config and "
                          "dashboard; set MLE_API_KEYS (MLE_DEPLOYMENT_SECRET) on the cluster, or api_keys_file")
    settings = load_settings(**overrides)  # ConfigError naming the key, before anything is deployed
    quiet = {"enable_access_log": False}  # internal hops: one log line per call would cost more than the call
    shards = shard_count(settings.feature_shards, len(settings.market.symbols))
    fb = [FeatureBuilderDeployment.options(name=shard_name(i), logging_config=quiet).bind(overrides, i)
          for i in range(shards)]
    pools = {m: ModelPool.options(name=POOL_NAMES[m], logging_config=quiet).bind(m, overrides) for m in POOL_NAMES}
    router = EnsembleRouter.options(logging_config=quiet).bind(
        fb, pools["range_predictor"], pools["tpsl_classifier"], pools["signal_classifier"], pools["meta_model"],
        overrides)
    feed = MarketFeed.options(logging_config=quiet).bind(router, overrides)
    return ApiIngress.options(logging_config={"enable_access_log": settings.serve_access_log},
                              num_replicas=ingress_replicas).bind(router, fb, feed, overrides, pools)


def build_pool(args: dict[str, Any] | None = None) -> Application:
    """One model pool as an application of its own (``args``: ``model`` plus Settings overrides): the
    smallest declarative app, for trying a pool's live tunables with ``serve deploy`` (tests do)."""
    overrides = _plain(dict(args or {}))
    model = overrides.pop("model", "range_predictor")
    load_settings(**overrides)  # a typo fails the deploy, naming the key
    return ModelPool.options(name=POOL_NAMES[model]).bind(model, overrides)


# Serve's proxy must report ready within 5 s (x3) by default; on a busy 2-core machine its start
# can take longer, and the controller then kills and restarts it in a loop. Give it time.
CONTROLLER_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30"}


def start_serve(host: str, port: int) -> None:
    """Start Serve (controller + HTTP proxy) on ``host:port`` in the connected Ray cluster."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port},
                controller_options={"runtime_env": {"env_vars": dict(CONTROLLER_ENV)}})


def start_serve_on_free_port(host: str = "127.0.0.1", attempts: int = 3) -> int:
    """Start Serve on a free port (tests, benchmarks); retried because a port found free can be
    taken before the proxy binds it (by Ray's own randomly placed agents, among others)."""
    import socket

    from ray import serve

    for attempt in range(attempts):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        try:
            start_serve(host, port)
            return port
        except Exception:
            serve.shutdown()
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def deploy(overrides: dict[str, Any] | None = None, name: str = "ml-engine", ingress_replicas: int = 1) -> None:
    """Deploy the graph as application ``name`` at route prefix ``/`` and wait until it is running."""
    from ray import serve

    serve.run(build_graph(overrides, ingress_replicas), name=name, route_prefix="/", blocking=False)
