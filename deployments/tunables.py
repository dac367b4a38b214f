"""Tunables operators change on a running graph: Serve ``user_config`` -> ``reconfigure``.

Why not ``args``: ``args`` build the application, so changing one makes ``serve deploy`` rebuild
the graph and restart every replica (a model reload, a feed reseed, dropped in-flight requests).
A deployment's ``user_config`` is delivered to its live replicas through ``reconfigure``: a batch
size, a poll interval or a rate limit changes within a second and nothing restarts.

Each value is validated exactly as the Settings field of the same name (same bounds, same
``ConfigError``), so ``batch_max_size: 0`` fails the deploy like ``MLE_BATCH_MAX_SIZE=0`` would. A
key the deployment does not take is refused, naming the ones it does. A key left out (or null)
falls back to the Settings value (``args``, ``MLE_*``, YAML): without a ``user_config`` nothing
changes from before.
"""

from __future__ import annotations

from typing import Any, Mapping

from configs.settings import Settings, load_settings

# Deployment -> the Settings fields its user_config may set (docs/operations.md, serve_config.yaml).
POOL_TUNABLES = ("batch_max_size", "batch_wait_s")
ROUTER_TUNABLES = ("model_poll_s",)
INGRESS_TUNABLES = ("rate_limit_per_minute",)


def apply_tunables(overrides: Mapping[str, Any] | None, user_config: Mapping[str, Any] | None,
                   allowed: tuple[str, ...], also: tuple[str, ...] = ()) -> Settings:
    """The deployment's Settings with ``user_config``'s tunables applied (``also``: other keys the
    deployment reads from its user_config itself, e.g. the router's ``model_versions``)."""
    config = dict(user_config or {})
    unknown = sorted(set(config) - set(allowed) - set(also))
    if unknown:
        raise ValueError(f"user_config: {', '.join(unknown)} cannot be changed live here; this deployment takes "
                         f"{', '.join(allowed + also)} (everything else goes in the application's args)")
    tuned = {k: config[k] for k in allowed if config.get(k) is not None}
    return load_settings(**{**dict(overrides or {}), **tuned})


def replica_identity() -> dict[str, Any]:
    """Which replica this is (Serve's replica id and the process id): a restart changes both."""
    import os

    from ray import serve

    try:
        replica = serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica (unit tests)
        replica = None
    return {"replica": replica, "pid": os.getpid()}
