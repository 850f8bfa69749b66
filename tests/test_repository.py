"""Model repository: Triton layout written by export, loaded by the runtime."""

from __future__ import annotations

import numpy as np
import pytest
from test_contract_export import ToyFreeEnergy, card

from specserve.export.onnx_export import export_model
from specserve.export.repository import config_pbtxt, write_model
from specserve.runtime.engine.repository import load_repository
from specserve.runtime.errors import InvalidInputError, ModelNotFoundError, ModelNotReadyError


@pytest.fixture
def repo(tmp_path):
    c = card()
    report = export_model(ToyFreeEnergy(c.dims["n_pixels"]), c, tmp_path / "build" / "model.onnx",
                          atol=1e-5, rtol=1e-4)
    repo = tmp_path / "repo"
    write_model(repo, "rbm", 1, report.path, c)
    return repo, c, report


def test_layout_and_config(repo):
    root, c, _ = repo
    assert (root / "rbm" / "1" / "model.onnx").is_file()
    text = (root / "rbm" / "config.pbtxt").read_text()
    assert text == config_pbtxt("rbm", c)
    assert 'platform: "onnxruntime_onnx"' in text and "TYPE_FP32" in text
    assert f"dims: [ {c.dims['n_pixels']} ]" in text and "dims: [ 2 ]" in text
    assert "non_cv, cv" in (root / "rbm" / "README.md").read_text()


def test_load_and_run(repo):
    root, c, _ = repo
    models = load_repository(root)
    model = models["rbm"]
    assert model.ready and model.version == "1" and model.card == c
    flux = np.random.default_rng(0).normal(1, 0.1, (4, c.dims["n_pixels"])).astype(np.float32)
    out = model.run({"flux": flux})
    assert out["probabilities"].shape == (4, 2) and out["free_energy"].shape == (4, 2)
    np.testing.assert_allclose(out["probabilities"].sum(1), 1.0, rtol=1e-6)
    with pytest.raises(InvalidInputError):
        model.run({"flux": flux[:, :-1]})


def test_corrupt_newer_version_falls_back_and_bad_model_is_not_ready(repo):
    root, c, report = repo
    (root / "rbm" / "2").mkdir()
    (root / "rbm" / "2" / "model.onnx").write_bytes(b"not an onnx file")
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "1" / "model.onnx").write_bytes(report.path.read_bytes()[:500])
    models = load_repository(root)
    assert models["rbm"].ready and models["rbm"].version == "1"
    broken = models["broken"]
    assert not broken.ready and "cannot load" in broken.reason
    with pytest.raises(ModelNotReadyError, match="not ready"):
        broken.run({"flux": np.ones((1, 3), np.float32)})
    with pytest.raises(ModelNotFoundError):
        load_repository(root / "nowhere")
