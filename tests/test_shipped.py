"""The default models shipped in the package (runtime/models): the manifest, every model against
its contract, `specserve models ship`, and which repository is served when none is named."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import onnxruntime as ort
import pytest

from specserve.export import ship as ship_module
from specserve.export.ship import card_headline, ship
from specserve.runtime.contract import ModelCard
from specserve.runtime.defaults import (
    DEFAULT_MODELS,
    MANIFEST,
    SHIPPED,
    SIZE_BUDGET,
    default_repository,
    missing_models,
    read_manifest,
    verify_manifest,
)
from specserve.runtime.errors import DatasetError, SpecserveError
from specserve.runtime.kinds import KINDS, VARIANTS, kind_of, variant_of
from specserve.runtime.layout import model_folders, read_config

EXPECTED = {"rbm", "spt", "physformer", "physformer-generate"} | {
    f"{m}-{p}" for m in DEFAULT_MODELS for p in VARIANTS}


def _card(path) -> tuple[ort.InferenceSession, ModelCard]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session, ModelCard.from_metadata_props(session.get_modelmeta().custom_metadata_map)


def test_the_shipped_repository_is_what_its_manifest_says():
    manifest = read_manifest()
    assert verify_manifest() == []
    assert set(manifest["models"]) == EXPECTED == {p.name for p in model_folders(SHIPPED)}
    assert manifest["total_bytes"] <= SIZE_BUDGET == manifest["budget_bytes"]
    assert manifest["built"]["commit"] != "unknown" and "specserve models ship" in manifest["built"]["command"]
    for name in EXPECTED:
        assert {f"{name}/config.pbtxt", f"{name}/1/model.onnx"} <= set(manifest["files"]), name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_shipped_model_keeps_its_contract_and_its_card_matches_the_manifest(name):
    folder = SHIPPED / name
    session, card = _card(folder / "1" / "model.onnx")
    kind = kind_of(card)
    assert kind.name == name.removesuffix(f"-{variant_of(name)}")
    card.contract.validate_session(session, card.dims)  # names, dtypes and shapes of the contract
    config = read_config(folder)
    assert config is not None and config.name == name and config.platform == "onnxruntime_onnx"
    inputs = card.contract.dummy_inputs(card.dims, batch=2, seed=1)
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, inputs)))
    assert set(outputs) == set(card.contract.output_names)
    assert all(np.all(np.isfinite(v)) for v in outputs.values()), name
    entry = read_manifest()["models"][name]
    assert entry["kind"] == card.kind and entry["training_data"] == card.training_fingerprint
    assert entry["headline"] == json.loads(json.dumps(card_headline(card)))
    if variant_of(name):
        variant = card.metrics["variant"]
        assert variant["of"] == kind.name and variant["precision"] == variant_of(name)
        assert variant["accuracy"]["within_limits"] is True


def test_the_shipped_models_meet_their_headline_targets():
    """The numbers the README promises, from the manifest (measured on the served path at build)."""
    models = read_manifest()["models"]
    rbm = models["rbm"]["headline"]
    assert rbm["accuracy"] >= 0.99 and rbm["fpr_real_non_cv"] <= 0.01
    spt = models["spt"]["headline"]
    assert spt["mape_age"] < 25 and spt["mape_mass"] < 8
    assert all(0.55 <= c <= 0.8 for c in spt["coverage_1sigma"].values())
    physformer = models["physformer"]["headline"]
    assert physformer["fgk_mae"]["teff"] < 250
    for precision in VARIANTS:
        for base in DEFAULT_MODELS:
            assert models[f"{base}-{precision}"]["headline"]["within_limits"] is True, (base, precision)


@pytest.fixture
def copy(tmp_path):
    """A copy of the shipped repository to break."""
    target = tmp_path / "shipped"
    shutil.copytree(SHIPPED, target)
    return target


def test_a_changed_missing_or_unlisted_file_is_named(copy):
    (copy / "rbm" / "config.pbtxt").write_text((copy / "rbm" / "config.pbtxt").read_text() + "\n")
    (copy / "spt-fp16" / "1" / "model.onnx").unlink()
    (copy / "rbm" / "notes.txt").write_text("hello")
    problems = verify_manifest(copy)
    assert any(p.startswith("rbm/config.pbtxt:") and "bytes" in p for p in problems)
    assert "spt-fp16/1/model.onnx: listed but missing" in problems
    assert "rbm/notes.txt: not in the manifest" in problems
    (copy / MANIFEST).write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        verify_manifest(copy)
    (copy / MANIFEST).unlink()
    with pytest.raises(DatasetError, match="no manifest"):
        read_manifest(copy)


def test_ship_copies_a_built_repository_with_its_manifest(copy, tmp_path):
    """`models ship` from a built repository (newest version of each model, renumbered 1)."""
    for name in ("rbm", "spt"):  # a newer version 2 of two models, and an older 1 left beside it
        shutil.copytree(copy / name / "1", copy / name / "2")
        (copy / name / "1" / "model.onnx").write_bytes(b"an older version")
    target = tmp_path / "package" / "models"
    target.parent.mkdir()
    manifest = ship(copy, target)
    assert verify_manifest(target) == []
    assert set(manifest["models"]) == EXPECTED and manifest["models"]["rbm"]["built_as_version"] == 2
    original = read_manifest()
    assert {k: v["sha256"] for k, v in manifest["files"].items()} == {
        k: v["sha256"] for k, v in original["files"].items()}
    assert manifest["models"]["spt"]["headline"] == original["models"]["spt"]["headline"]
    assert not (target / "rbm" / "2").exists() and not list(target.parent.glob("specserve-ship-*"))


def test_ship_refuses_an_incomplete_or_oversized_repository(copy, tmp_path, monkeypatch):
    target = tmp_path / "models"
    target.mkdir()
    (target / "keep").write_text("the shipped copy before")
    shutil.rmtree(copy / "physformer-generate")
    with pytest.raises(SpecserveError, match="lacks physformer-generate"):
        ship(copy, target)
    shutil.copytree(SHIPPED / "physformer-generate", copy / "physformer-generate")
    monkeypatch.setattr(ship_module, "SIZE_BUDGET", 1_000_000)
    with pytest.raises(SpecserveError, match="over the shipped budget of 1 MiB"):
        ship(copy, target)
    assert (target / "keep").read_text() == "the shipped copy before"  # untouched by both refusals
    assert not list(tmp_path.glob("specserve-ship-*"))


def _build(repository, when: float) -> None:
    """A stand-in for a `models build` output at ``when``: the default models' folders."""
    for name in ("rbm", "spt", "physformer", "physformer-generate"):
        path = repository / name / "1" / "model.onnx"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        os.utime(path, (when, when))


def test_the_default_repository_is_the_newest_complete_one(tmp_path, copy):
    built = read_manifest(copy)["built"]["unix"]
    cache = tmp_path / "cache"
    choice = default_repository(cache, shipped=copy)
    assert choice.path == copy and choice.shipped and f"there is no {cache / 'models'}" in choice.reason
    _build(cache / "models", built - 3600)
    shutil.rmtree(cache / "models" / "spt")
    choice = default_repository(cache, shipped=copy)
    assert choice.shipped and choice.reason.endswith("lacks spt")
    _build(tmp_path / "older" / "models", built - 3600)
    choice = default_repository(tmp_path / "older", shipped=copy)
    assert choice.shipped and "are newer than" in choice.reason
    _build(tmp_path / "newer" / "models", time.time())
    choice = default_repository(tmp_path / "newer", shipped=copy)
    assert choice.path == tmp_path / "newer" / "models" and not choice.shipped and "is newer than" in choice.reason
    # an installation without shipped models serves the cache's, and says what is missing
    (copy / MANIFEST).unlink()
    choice = default_repository(cache, shipped=copy)
    assert choice.path == cache / "models" and "lacks spt" in choice.reason and "models build" in choice.reason
    assert missing_models(cache / "models") == ["spt"]


def test_every_kind_has_a_shipped_model():
    assert set(KINDS) <= EXPECTED
