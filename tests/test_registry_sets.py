"""``python -m inference.registry promote-set <version>``: the four models move in one atomic step.

Unit tests on a registry of small fake versions (bytes stand in for boosters: promotion verifies
checksums and the feature-set hash, it does not build boosters).
"""

from __future__ import annotations

import json
import os

import pytest

from configs.errors import ModelNotFoundError
from inference import registry_cli
from inference.registry import CURRENT_FILE, CURRENT_SET_FILE, MODEL_NAMES, ModelRegistry


def _registry(tmp_path, versions=("v1", "v2"), promote_first=True) -> ModelRegistry:
    reg = ModelRegistry(tmp_path / "models")  # this engine's feature-set hash, as the CLI computes it
    for version in versions:
        for model in MODEL_NAMES:
            reg.save(model, version, {"b": f"{model} {version}".encode()}, {"created": version}, promote=False)
    if promote_first:
        reg.promote_set(versions[0])
    return reg


def test_promote_set_swaps_all_four_with_one_replace_before_the_per_model_pointers(tmp_path, monkeypatch):
    reg = _registry(tmp_path)
    replaced = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (replaced.append(str(dst)), real(src, dst))[1])
    reg.promote_set("v2")
    set_file = str(reg.root / CURRENT_SET_FILE)
    assert replaced.count(set_file) == 1 and replaced[0] == set_file  # the set moves first, in one step
    assert sorted(replaced[1:]) == sorted(str(reg.root / m / CURRENT_FILE) for m in MODEL_NAMES)
    assert reg.current_versions() == {m: "v2" for m in MODEL_NAMES}
    assert json.loads((reg.root / CURRENT_SET_FILE).read_text())["versions"] == {m: "v2" for m in MODEL_NAMES}


def test_readers_follow_the_set_pointer_even_when_per_model_files_disagree(tmp_path):
    reg = _registry(tmp_path)
    reg.promote_set("v2")
    # A crash after the set's replace and before the per-model files: readers must see v2 all along.
    (reg.root / "meta_model" / CURRENT_FILE).write_text("v1\n")
    assert reg.current("meta_model") == "v2" and reg.current_versions()["meta_model"] == "v2"


def test_a_set_with_a_missing_version_promotes_nothing(tmp_path):
    reg = _registry(tmp_path)
    reg.save("range_predictor", "v3", {"b": b"only one"}, {}, promote=False)
    with pytest.raises(ModelNotFoundError, match="tpsl_classifier, signal_classifier, meta_model"):
        reg.promote_set("v3")
    assert reg.current_versions() == {m: "v1" for m in MODEL_NAMES}
    assert (reg.root / "range_predictor" / CURRENT_FILE).read_text().strip() == "v1"


def test_promoting_one_model_still_works_and_moves_it_in_the_set(tmp_path):
    reg = _registry(tmp_path)
    reg.promote("meta_model", "v2")
    assert reg.current_versions() == {**{m: "v1" for m in MODEL_NAMES}, "meta_model": "v2"}
    assert (reg.root / "meta_model" / CURRENT_FILE).read_text().strip() == "v2"


def test_a_registry_without_a_set_pointer_reads_the_per_model_files(tmp_path):
    reg = _registry(tmp_path, promote_first=False)
    for model in MODEL_NAMES:
        reg.promote(model, "v2")  # per-model, as registries written before promote-set
    assert not (reg.root / CURRENT_SET_FILE).exists()
    assert reg.current_versions() == {m: "v2" for m in MODEL_NAMES}


def test_cli_promote_set_and_roll_back_by_the_same_command(tmp_path, capsys):
    reg = _registry(tmp_path)
    root = ["--root", str(reg.root)]
    assert registry_cli.main([*root, "promote-set", "v2"]) == 0
    assert "current set -> v2 (before: v1)" in capsys.readouterr().out
    assert reg.current_versions() == {m: "v2" for m in MODEL_NAMES}
    assert registry_cli.main([*root, "promote-set", "v1"]) == 0  # the rollback
    assert reg.current_versions() == {m: "v1" for m in MODEL_NAMES}
    assert registry_cli.main([*root, "promote-set", "nope"]) == 2
    assert "no version 'nope'" in capsys.readouterr().err
    assert registry_cli.main([*root, "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["models"]
    assert {(r["model"], r["version"]) for r in rows if r["current"]} == {(m, "v1") for m in MODEL_NAMES}
