"""docs/configuration.md is generated from Settings and must match the code it documents."""

from __future__ import annotations

from configs.settings import Settings
from scripts import gen_config_docs


def test_committed_reference_is_up_to_date():
    committed = gen_config_docs.OUT.read_text()
    assert committed == gen_config_docs.render(), (
        "docs/configuration.md is out of date: run `python -m scripts.gen_config_docs` and commit it")


def test_every_setting_is_documented_with_its_env_var():
    text = gen_config_docs.render()
    for name, info in Settings.model_fields.items():
        sub = getattr(info.annotation, "model_fields", None)
        if sub is None:
            assert f"| `{name}` | `MLE_{name.upper()}` |" in text, name
        else:
            for leaf in sub:
                assert f"`{name}.{leaf}" in text, f"{name}.{leaf}"


def test_env_var_names_really_configure_the_field(monkeypatch):
    """The documented nested variable name is the one pydantic-settings reads."""
    monkeypatch.setenv("MLE_MODELS__XGB_PARAMS__MAX_DEPTH", "9")
    monkeypatch.setenv("MLE_HTTP_PORT", "8123")
    s = Settings()
    assert s.models.xgb_params.max_depth == 9 and s.http_port == 8123
    text = gen_config_docs.render()
    assert "`MLE_MODELS__XGB_PARAMS__MAX_DEPTH`" in text and "`MLE_HTTP_PORT`" in text


def test_check_mode_reports_a_stale_file(tmp_path):
    stale = tmp_path / "configuration.md"
    stale.write_text("old\n")
    assert gen_config_docs.main(["--check", "--out", str(stale)]) == 1
    assert gen_config_docs.main(["--out", str(stale)]) == 0
    assert gen_config_docs.main(["--check", "--out", str(stale)]) == 0


def test_seed_setting_names_map_to_real_settings(monkeypatch):
    """Every engine setting the seed mapping names exists and is read from the variable it shows."""
    text = gen_config_docs.render()
    seeds = [seed for seed, _, _ in gen_config_docs.SEED_SETTINGS]
    for name in ("API_KEY", "DATABASE_URL", "REDIS_URL", "MODEL_PATH", "SUPPORTED_SYMBOLS", "DEFAULT_HORIZONS",
                 "CORS_ORIGINS", "BINANCE_API_KEY"):
        assert any(name in seed for seed in seeds), name
    for seed, keys, _ in gen_config_docs.SEED_SETTINGS:
        assert f"| `{seed}` |" in text
        for key in keys:
            top, _, leaf = key.partition(".")
            assert top in Settings.model_fields, key
            if leaf:
                assert leaf in Settings.model_fields[top].annotation.model_fields, key
    monkeypatch.setenv("MLE_MARKET__SYMBOLS", '["BTCUSDT"]')
    monkeypatch.setenv("MLE_CORS_ORIGINS", "http://localhost:3000,https://app.example")
    monkeypatch.setenv("MLE_MODELS_DIR", "/srv/models")
    s = Settings()
    assert s.market.symbols == ["BTCUSDT"] and s.cors_origins == ["http://localhost:3000", "https://app.example"]
    assert str(s.models_dir) == "/srv/models"
