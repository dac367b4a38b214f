"""Pools that load only their model, a router that holds metadata only (issue 16), in-process.

1. A set loaded without boosters (the router's) composes exactly the forecasts of the full
   in-process ensemble from stage outputs computed one model at a time (what the pools do), and
   cannot compute a stage itself.
2. It still refuses what the full load refuses: a meta-model stacked on other base versions, a
   truncated booster (checksums are verified although no booster is built), a missing booster.
3. A :class:`StageModel` holds its own model's boosters and nothing else.
4. The router's :class:`ModelSets` loads a set once however many callers wait, keeps the last two,
   and loads a model with boosters only when asked for a pool fallback.

Uses the shipped model set (data/models) and the shipped sample; no Ray, no services.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from configs.settings import get_settings
from deployments.launcher import SHIPPED_MODELS
from configs.errors import ModelLoadError
from inference.ensemble import Ensemble
from inference.layout import BASE_MODELS, META_MODEL, MODEL_NAMES
from inference.registry import METADATA_FILE, ModelRegistry
from inference.stage import StageModel

SETTINGS = get_settings()


@pytest.fixture(scope="module")
def rows() -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """The sample's last 300 candles of each symbol as feature rows (warm-up rows included)."""
    from features.batch import build_features
    from features.candles import load_candles

    names = Ensemble.load(SHIPPED_MODELS, SETTINGS, boosters=False).feature_names
    feats, syms, closes, times = [], [], [], []
    for symbol in SETTINGS.market.symbols:
        candles = load_candles(SETTINGS.sample_dir / f"{symbol}_5m.parquet")
        f = build_features(candles, SETTINGS.features)[list(names)].to_numpy(np.float64)
        feats.append(f[-300:])
        syms += [symbol] * 300
        closes.append(candles["close"].to_numpy()[-300:])
        times.append(candles["open_time"].to_numpy()[-300:])
    return np.vstack(feats), syms, np.concatenate(closes), np.concatenate(times)


def test_a_set_without_boosters_composes_what_the_in_process_ensemble_forecasts(rows):
    feats, syms, closes, times = rows
    full = Ensemble.load(SHIPPED_MODELS, SETTINGS)
    bare = Ensemble.load(SHIPPED_MODELS, SETTINGS, boosters=False)
    assert bare.versions == full.versions and bare.stages == {}
    assert all(not m.boosters and m.booster_names for m in bare.models.values())
    registry = ModelRegistry(SHIPPED_MODELS)
    stages = {m: StageModel(registry.load(m, bare.versions[m]), nthread=1) for m in MODEL_NAMES}  # the pools
    for h in SETTINGS.market.horizons:
        X = bare.model_input(feats, syms)
        outputs = {m: stages[m].predict(X, h) for m in BASE_MODELS}
        outputs[META_MODEL] = stages[META_MODEL].predict(bare.meta_input(X, outputs, h), h)
        composed = bare.compose(feats, syms, closes, times, h, outputs)
        assert [f.to_json() for f in composed] == [f.to_json() for f in full.forecast(feats, syms, closes, times, h)]
    with pytest.raises(ModelLoadError, match="boosters are not loaded in this process"):
        bare.predict_stage("range_predictor", bare.model_input(feats[:2], syms[:2]), 6)


def _copy_with_new_meta(tmp_path: Path, base_versions: dict[str, str]) -> tuple[Path, dict[str, str]]:
    """The shipped registry plus a meta-model version stacked on ``base_versions``."""
    models = shutil.copytree(SHIPPED_MODELS, tmp_path / "models")
    registry = ModelRegistry(models)
    versions = registry.current_versions()
    m = registry.load("meta_model", versions["meta_model"])
    meta = {k: v for k, v in m.metadata.items() if k not in ("files", "version", "model")}
    registry.save("meta_model", "29990101T000000Z-0001", m.boosters, {**meta, "base_versions": base_versions},
                  m.documents, promote=False)
    return models, {**versions, "meta_model": "29990101T000000Z-0001"}


def test_a_set_without_boosters_still_refuses_mismatched_sets_and_bad_files(tmp_path):
    shipped = ModelRegistry(SHIPPED_MODELS).current_versions()
    models, mixed = _copy_with_new_meta(tmp_path, {m: "20200101T000000Z-dead" for m in BASE_MODELS})
    with pytest.raises(ModelLoadError, match="was stacked on"):
        Ensemble.load(models, SETTINGS, boosters=False, versions=mixed)

    registry = ModelRegistry(models)
    booster = sorted((models / "tpsl_classifier" / shipped["tpsl_classifier"]).glob("*.ubj"))[0]
    good = booster.read_bytes()
    booster.write_bytes(good[: len(good) // 2])  # an interrupted copy
    with pytest.raises(ModelLoadError, match="checksum mismatch"):
        registry.load("tpsl_classifier", shipped["tpsl_classifier"], boosters=False)
    booster.write_bytes(good)

    # A version whose file list lacks a booster the layout requires (saved without it).
    m = registry.load("signal_classifier", shipped["signal_classifier"])
    meta = {k: v for k, v in m.metadata.items() if k not in ("files", "version", "model")}
    dropped = sorted(m.boosters)[0]
    registry.save("signal_classifier", "29990101T000000Z-0002",
                  {k: b for k, b in m.boosters.items() if k != dropped}, meta, m.documents, promote=False)
    short = {**shipped, "signal_classifier": "29990101T000000Z-0002"}
    with pytest.raises(ModelLoadError, match=f"boosters missing: \\['{dropped}'\\]"):
        Ensemble.load(models, SETTINGS, boosters=False, versions=short)
    with pytest.raises(ModelLoadError, match="boosters missing"):  # the pool refuses it too
        StageModel(registry.load("signal_classifier", "29990101T000000Z-0002"))


def test_a_stage_model_holds_its_own_models_boosters_only(rows):
    feats, syms, _, _ = rows
    registry = ModelRegistry(SHIPPED_MODELS)
    full = Ensemble.load(SHIPPED_MODELS, SETTINGS)
    X = full.model_input(feats, syms)
    for model in BASE_MODELS:
        loaded = registry.load(model, full.versions[model])
        stage = StageModel(loaded)
        files = json.loads((loaded.path / METADATA_FILE).read_text())["files"]
        assert set(stage.boosters) == {n[:-4] for n in files if n.endswith(".ubj")} == loaded.booster_names
        np.testing.assert_array_equal(stage.predict(X, 18), full.predict_stage(model, X, 18))


def test_the_routers_model_sets_load_once_keep_two_and_boosters_only_for_a_fallback(tmp_path):
    from deployments.model_pools import ModelSets

    current = ModelRegistry(SHIPPED_MODELS).current_versions()
    models, newer = _copy_with_new_meta(tmp_path, {m: current[m] for m in BASE_MODELS})
    sets = ModelSets(SETTINGS.model_copy(update={"models_dir": models}))
    calls: list[tuple] = []
    load = sets._sets._load
    sets._sets._load = lambda key: calls.append(key) or load(key)

    async def run() -> None:
        first = await asyncio.gather(*(sets.get(current) for _ in range(5)))
        assert len(calls) == 1 and all(e is first[0] for e in first) and first[0].stages == {}
        await sets.get(newer)
        assert await sets.get(current) is first[0] and len(calls) == 2
        assert sets.loaded()["booster_models"] == []
        stage = await sets.stage("range_predictor", current["range_predictor"])
        assert stage.boosters and stage.version == current["range_predictor"]
        assert sets.loaded()["booster_models"] == [["range_predictor", current["range_predictor"]]]
        third = {**current, "meta_model": "29990101T000000Z-0009"}
        with pytest.raises(Exception):  # no such version: refused, nothing cached
            await sets.get(third)
        assert len(sets.loaded()["sets"]) == 2

    asyncio.run(run())
