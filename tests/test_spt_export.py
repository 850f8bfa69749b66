"""`specserve export spt`: MC dropout inside the ONNX graph, its validation, and the exported model."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from specserve.export.cli import main
from specserve.export.spt import check_mc, export_spt_model, spt_card
from specserve.runtime.contract import ModelCard
from specserve.runtime.engine.repository import load_model_file
from specserve.runtime.errors import ExportError
from specserve.runtime.layout import read_config
from specserve.training.rbm.evaluate import model_inputs
from specserve.training.trainer import CHECKPOINT_NAME, load_checkpoint


@pytest.fixture(scope="module")
def exported(spt_run, tmp_path_factory):
    _, run_dir, _, _ = spt_run
    repo = tmp_path_factory.mktemp("spt-repo")
    assert main(["export", "spt", "--run", str(run_dir), "--repository", str(repo)]) == 0
    return repo


def test_export_writes_a_self_describing_model_with_random_ops(exported, spt_run, capsys):
    bench, run_dir, model, report = spt_run
    path = exported / "spt" / "1" / "model.onnx"
    graph = onnx.load(str(path))
    ops = {n.op_type for n in graph.graph.node}
    assert "RandomUniformLike" in ops and "Tile" in ops and "Dropout" not in ops
    assert graph.opset_import[0].version <= 21
    config = read_config(exported / "spt")
    assert config.max_batch_size == 0 and [t.name for t in config.input if t.optional] == ["n_samples", "seed"]
    assert {t.name: list(t.dims) for t in config.output}["samples"] == [-1, -1, 2]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    card = ModelCard.from_metadata_props(session.get_modelmeta().custom_metadata_map)
    assert card.kind == "spt" and card.label_names == ("age", "mass") and card.label_units == ("Gyr", "Msun")
    assert card.preprocessing == bench.preprocessing
    assert card.normalisation["mc_samples"] == {"default": model.config.mc_samples, "max": model.config.mc_samples_max}
    np.testing.assert_allclose(card.normalisation["std_scale"], model.std_scale.numpy(), rtol=1e-6)
    # the card's headline is the served path's number (the report's rows rerun through the file)
    saved = json.loads((run_dir / "report.json").read_text())
    assert card.metrics["path"] == "served" and saved["served_vs_torch"]["failures"] == []
    assert card.metrics["spt"]["mape_age"] == saved["served"]["mape_age"]
    assert card.metrics["torch_path"]["mape_age"] == report["spt"]["mape_age"]


def test_exported_model_draws_new_masks_every_run_and_honours_n_samples(exported, spt_run):
    bench = spt_run[0]
    flux = model_inputs(bench, bench.split_indices("test")[:5])
    loaded = load_model_file("spt", "1", exported / "spt" / "1" / "model.onnx")  # the server's loader
    assert loaded.ready, loaded.reason
    a = loaded.run({"flux": flux})  # n_samples and seed filled in
    b = loaded.run({"flux": flux})
    assert a["samples"].shape == (loaded.card.normalisation["mc_samples"]["default"], 5, 2)
    assert not np.array_equal(a["mean"], b["mean"]) and np.all(a["std"] > 0)
    # means of two runs of 64 draws agree within their MC error (same model, new masks): the mean
    # is exp(mean log draw), so in log space the difference of two independent means of t draws,
    # with the spread pooled from both runs' draws (one run of a few draws estimates it too
    # poorly for a 6-sigma bound)
    t = 64
    a64, b64 = (loaded.run({"flux": flux, "n_samples": np.array([t])}) for _ in range(2))
    la, lb = np.log(a64["samples"].astype(np.float64)), np.log(b64["samples"].astype(np.float64))
    np.testing.assert_allclose(np.log(a64["mean"]), la.mean(axis=0), atol=1e-5)
    spread = np.sqrt(0.5 * (la.var(axis=0, ddof=1) + lb.var(axis=0, ddof=1)))
    assert np.all(np.abs(la.mean(axis=0) - lb.mean(axis=0)) < 6 * spread * np.sqrt(2.0 / t) + 1e-6)
    c = loaded.run({"flux": flux, "n_samples": np.array([3])})
    assert c["samples"].shape == (3, 5, 2)
    # a session of its own in the same process does not repeat the first session's draws
    other = load_model_file("spt", "1", exported / "spt" / "1" / "model.onnx").run({"flux": flux})
    assert not np.array_equal(other["samples"], a["samples"])


def test_n_samples_outside_the_bound_is_refused(exported, spt_run):
    from specserve.runtime.errors import InvalidInputError

    bench = spt_run[0]
    loaded = load_model_file("spt", "1", exported / "spt" / "1" / "model.onnx")
    flux = model_inputs(bench, bench.split_indices("test")[:1])
    for bad in (0, loaded.card.normalisation["mc_samples"]["max"] + 1):
        with pytest.raises(InvalidInputError, match="n_samples must be between 1 and"):
            loaded.run({"flux": flux, "n_samples": np.array([bad])})


def test_export_validation_fails_without_dropout(spt_run, tmp_path):
    _, run_dir, model, _ = spt_run
    checkpoint = load_checkpoint(run_dir / CHECKPOINT_NAME)
    card = spt_card(checkpoint, None)
    no_dropout = copy.deepcopy(model)
    for layer in no_dropout.mc_dropouts():
        layer.p = 0.0
    with pytest.raises(ExportError, match="MC dropout did not survive|no spread"):
        export_spt_model(no_dropout, card, tmp_path / "a")
    # a graph exported without dropout, checked against the real (stochastic) model
    with pytest.raises(ExportError, match="no random operator"):
        export_spt_model(no_dropout, card, tmp_path / "b", reference=model)


def test_mc_check_catches_a_wrong_dropout_rate(spt_run, tmp_path):
    _, run_dir, model, _ = spt_run
    card = spt_card(load_checkpoint(run_dir / CHECKPOINT_NAME), None)
    report, check = export_spt_model(model, card, tmp_path / "good")
    assert all(abs(r - 1) < 0.1 for r in check.std_ratio) and check.runs_differ and check.sessions_differ
    assert check.timing["ratio"] > 0
    other = copy.deepcopy(model)
    for layer in other.mc_dropouts():
        layer.p = min(0.9, layer.p * 2.5)
    with pytest.raises(ExportError, match="standard deviations differ"):
        check_mc(report.path, other, card)
