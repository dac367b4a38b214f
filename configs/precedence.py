"""Which source wins: serve_config.yaml ``args`` are defaults *below* the ``MLE_*`` environment.

Settings ranks keyword arguments highest (code that deploys the graph passes overrides that must
win). serve_config.yaml's ``args`` arrive as those keyword arguments, so left as they are the
committed ``feed: replay`` would beat an operator's ``MLE_FEED=binance`` -- silently.
``deployments.app:build_app`` therefore passes them through :func:`below_environment` first, and
/health/detailed shows :func:`setting_sources` for the choices that differ per environment.
"""

from __future__ import annotations

from typing import Any

from configs.settings import Settings


def environment_values() -> dict[str, Any]:
    """What the ``MLE_*`` environment and ``.env`` set, as Settings keys (nested for ``__`` names)."""
    from pydantic_settings import DotEnvSettingsSource, EnvSettingsSource

    out: dict[str, Any] = {}
    for source in (DotEnvSettingsSource(Settings), EnvSettingsSource(Settings)):  # env beats .env
        _merge(out, source())
    return out


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def below_environment(args: dict[str, Any], env: dict[str, Any] | None = None,
                      ) -> tuple[dict[str, Any], list[str]]:
    """``args`` without what the environment sets (nested keys one by one), and the dropped keys.

    Why: ``args`` become keyword arguments, the highest-priority source; left as they are, the
    committed ``feed: replay`` of serve_config.yaml would beat an operator's ``MLE_FEED=binance``.
    """
    env = environment_values() if env is None else env
    kept: dict[str, Any] = {}
    dropped: list[str] = []
    for key, value in args.items():
        if key not in env:
            kept[key] = value
        elif isinstance(value, dict) and isinstance(env[key], dict):
            sub, sub_dropped = below_environment(value, env[key])
            dropped += [f"{key}.{k}" for k in sub_dropped]
            if sub:
                kept[key] = sub
        else:
            dropped.append(key)
    return kept, dropped


# Choices that differ per environment: /health/detailed says where each one came from.
PER_ENVIRONMENT = ("feed", "replay_speed", "binance_api_url", "binance_ws_url", "http_host", "http_port",
                   "max_data_age_s")


def setting_sources(overrides: dict[str, Any], env: dict[str, Any] | None = None) -> dict[str, str]:
    """Per :data:`PER_ENVIRONMENT` key: ``environment`` (MLE_* or .env), ``args`` (serve_config.yaml
    args or the deploying code) or ``default`` (code defaults and configs/*.yaml)."""
    env = environment_values() if env is None else env
    return {k: "args" if k in overrides else "environment" if k in env else "default" for k in PER_ENVIRONMENT}
