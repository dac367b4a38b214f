"""Settings: defaults without environment, YAML validation naming the key, env overrides."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from configs.settings import CONFIG_DIR, YAML_FILES, load_settings
from configs.errors import ConfigError


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    import os

    for key in list(os.environ):
        if key.startswith("MLE_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no stray .env
    return monkeypatch


@pytest.fixture
def config_copy(clean_env, tmp_path) -> Path:
    d = tmp_path / "cfg"
    d.mkdir()
    for name in YAML_FILES:
        shutil.copy(CONFIG_DIR / name, d / name)
    clean_env.setenv("MLE_CONFIG_DIR", str(d))
    return d


def test_defaults_need_no_environment(clean_env):
    s = load_settings()
    assert s.market.symbols == ["BTCUSDT", "ETHUSDT"]
    assert s.market.horizons == [6, 18, 36, 72]
    assert s.http_port == 8000 and s.ray_port == 6380
    assert s.database_url.get_secret_value() == "postgresql://127.0.0.1:5432/test"
    assert s.api_keys == []


def test_env_overrides_and_key_list(clean_env):
    k1, k2 = "first-key-of-thirty-two-chars-0", "second-key-of-thirty-two-chars-"
    clean_env.setenv("MLE_API_KEYS", f"{k1}, {k2}")
    clean_env.setenv("MLE_HTTP_PORT", "8100")
    s = load_settings()
    assert [k.get_secret_value() for k in s.api_keys] == [k1, k2]
    assert k1 not in repr(s)  # keys never appear in logs or reprs
    assert s.http_port == 8100


def test_unknown_yaml_key_names_the_key(config_copy):
    (config_copy / "features.yaml").write_text((config_copy / "features.yaml").read_text()
                                              + "  tp_vol_multt: 2.0\n")
    with pytest.raises(ConfigError, match=r"labels\.tp_vol_multt"):
        load_settings()


def test_bad_yaml_value_names_the_key(config_copy):
    text = (config_copy / "market.yaml").read_text().replace("[6, 18, 36, 72]", "[6, -18]")
    (config_copy / "market.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"market\.horizons"):
        load_settings()


def test_recursive_periods_are_bounded(config_copy):
    text = (config_copy / "features.yaml").read_text().replace("ema_periods: [9, 21, 50]", "ema_periods: [9, 200]")
    (config_copy / "features.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"features\.ema_periods"):
        load_settings()


def test_yaml_values_are_read(config_copy):
    text = (config_copy / "market.yaml").read_text().replace("[BTCUSDT, ETHUSDT]", "[BTCUSDT, ETHUSDT, SOLUSDT]")
    (config_copy / "market.yaml").write_text(text)
    assert load_settings().market.symbols == ["BTCUSDT", "ETHUSDT", "SOLUSDT"]


def test_bad_env_value_names_the_key(clean_env):
    clean_env.setenv("MLE_HTTP_PORT", "eighty")
    with pytest.raises(ConfigError, match="http_port"):
        load_settings()


def _committed_args() -> dict:
    import yaml

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "serve_config.yaml").read_text())
    return dict(config["applications"][0].get("args") or {})


def test_serve_config_args_are_defaults_below_the_environment(clean_env, tmp_path):
    """MLE_FEED=binance beats the committed ``feed: replay`` (it used to be silently ignored)."""
    from configs.precedence import below_environment, setting_sources

    args = _committed_args()
    assert args.get("feed") == "replay", "the committed config's default feed is the replay"
    kept, dropped = below_environment(args)
    assert dropped == [] and load_settings(**kept).feed == "replay"
    assert setting_sources(kept)["feed"] == "args"

    clean_env.setenv("MLE_FEED", "binance")
    (tmp_path / ".env").write_text("MLE_REPLAY_SPEED=7\n")  # .env ranks with the environment
    kept, dropped = below_environment(args)
    assert sorted(dropped) == ["feed", "replay_speed"]
    s = load_settings(**kept)
    assert s.feed == "binance" and s.replay_speed == 7
    sources = setting_sources(kept)
    assert sources["feed"] == sources["replay_speed"] == "environment" and sources["http_port"] == "default"


def test_nested_args_lose_only_the_keys_the_environment_sets(clean_env):
    from configs.precedence import below_environment

    clean_env.setenv("MLE_FEATURES__MAX_BRIDGE_CANDLES", "12")
    kept, dropped = below_environment({"features": {"max_bridge_candles": 3, "rsi_periods": [6, 10]}})
    assert dropped == ["features.max_bridge_candles"]
    s = load_settings(**kept)
    assert s.features.max_bridge_candles == 12 and s.features.rsi_periods == (6, 10)
