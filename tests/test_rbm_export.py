"""`specserve export rbm` and `specserve models build --if-missing` on a run trained on the real cv set."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from specserve.export.cli import main
from specserve.export.rbm import ATOL, RTOL
from specserve.runtime.contract import ModelCard
from specserve.runtime.layout import read_config
from specserve.training.common import REPORT_JSON
from specserve.training.inputs import model_inputs
from specserve.training.rbm.model import RBMClassifier


def _export(run_dir, repo) -> int:
    return main(["export", "rbm", "--run", str(run_dir), "--repository", str(repo)])


def test_export_command_writes_a_validated_self_describing_model(cv_run, tmp_path, capsys):
    bench, run_dir, model, _ = cv_run
    repo = tmp_path / "repo"
    assert _export(run_dir, repo) == 0
    out = capsys.readouterr().out
    assert "torch vs ORT max |diff|" in out and f"exported to {repo / 'rbm' / '1'}" in out
    config = read_config(repo / "rbm")
    assert config.name == "rbm" and config.platform == "onnxruntime_onnx" and list(config.input[0].dims) == [3011]
    assert "Chen, Wu, Bu & Zhao 2014" in (repo / "rbm" / "README.md").read_text()

    session = ort.InferenceSession(str(repo / "rbm" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    card = ModelCard.from_metadata_props(session.get_modelmeta().custom_metadata_map)
    report = json.loads((run_dir / REPORT_JSON).read_text())
    assert card.kind == "rbm" and card.class_names == ("non_cv", "cv")
    assert card.preprocessing == bench.preprocessing
    assert card.training_fingerprint == f"cv:sha256:{bench.meta['content_hash']}"
    assert card.metrics["rbm"]["accuracy"] == report["rbm"]["accuracy"]
    assert set(card.metrics["baselines"]) == {"logreg_binarised", "bernoulli_rbm_logreg"}

    # parity on the real test spectra, not only on the exporter's random inputs
    flux = model_inputs(bench, bench.split_indices("test"))
    probs, free = session.run(None, {"flux": flux})
    with torch.no_grad():
        want_p, want_f = (t.numpy() for t in model.eval()(torch.from_numpy(flux)))
    np.testing.assert_allclose(free, want_f, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(probs, want_p, atol=ATOL, rtol=RTOL)
    decided = np.abs(want_p[:, 1] - 0.5) > 1e-3  # away from the decision boundary
    assert np.array_equal(probs[decided].argmax(1), want_p[decided].argmax(1))

    assert _export(run_dir, repo) == 0  # a second export is the next version
    assert (repo / "rbm" / "2" / "model.onnx").is_file()


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_export_command_fails_on_a_broken_model(cv_run, tmp_path, monkeypatch, capsys):
    _, run_dir, _, _ = cv_run
    forward = RBMClassifier.forward

    def traced_branch(self, flux):
        # a Python branch on the batch size: tracing at batch 2 bakes in one side, so torch and the
        # exported graph disagree at batch 1, 3 and 64 (a classic silent export bug)
        probs, free = forward(self, flux)
        return (probs, free) if flux.shape[0] == 2 else (probs, free + 1.0)

    monkeypatch.setattr(RBMClassifier, "forward", traced_branch)
    repo = tmp_path / "repo"
    assert _export(run_dir, repo) == 1
    err = capsys.readouterr().err
    assert "output 'free_energy' at batch 1" in err and "differ from torch" in err
    assert not (repo / "rbm").exists()  # nothing half-exported reaches the repository

    assert main(["export", "rbm", "--run", str(tmp_path / "nothing"), "--repository", str(repo)]) == 1
    assert "no checkpoint.pt" in capsys.readouterr().err


def test_models_build_if_missing_keeps_a_ready_repository(cv_run, tmp_path, capsys):
    _, run_dir, _, _ = cv_run
    repo = tmp_path / "models"
    assert _export(run_dir, repo) == 0
    before = (repo / "rbm" / "1" / "model.onnx").stat().st_mtime_ns
    assert main(["models", "build", "--repository", str(repo), "--if-missing", "--models", "rbm"]) == 0
    assert "is ready (rbm)" in capsys.readouterr().out
    assert (repo / "rbm" / "1" / "model.onnx").stat().st_mtime_ns == before
    assert sorted(p.name for p in (repo / "rbm").iterdir() if p.is_dir()) == ["1"]


@pytest.mark.parametrize("argv", [["export", "rbm"], ["models"]])
def test_export_and_models_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
