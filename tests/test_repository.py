"""Model repository: Triton layout written by export, loaded by the runtime."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import text_format
from test_contract_export import ToyFreeEnergy, card
from tritonclient.grpc import model_config_pb2

from specserve.export.onnx_export import export_model
from specserve.export.repository import config_pbtxt, write_model
from specserve.runtime.engine.batching import BatchingConfig
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
    config = text_format.Parse(text, model_config_pb2.ModelConfig())  # Triton's own schema
    assert config.name == "rbm" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 256
    assert [(t.name, list(t.dims), t.data_type) for t in config.input] == [
        ("flux", [c.dims["n_pixels"]], model_config_pb2.TYPE_FP32)]
    assert [(t.name, list(t.dims)) for t in config.output] == [("probabilities", [2]), ("free_energy", [2])]
    assert config.HasField("dynamic_batching") and config.dynamic_batching.default_queue_policy.max_queue_size == 1024
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


# ------------------------------------------------------------------ config.pbtxt as Triton reads it


def _config(root, text: str):
    (root / "rbm" / "config.pbtxt").write_text(text)
    return load_repository(root)["rbm"]


def test_a_commented_out_line_is_a_comment(repo):
    root, c, _ = repo
    model = _config(root, 'name: "rbm"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
                          "# dynamic_batching { max_queue_delay_microseconds: 50000 }\n")
    assert model.ready and model.config.max_batch_size == 8 and not model.config.HasField("dynamic_batching")
    # as on Triton: no dynamic_batching, no delay and no sharing of runs between callers
    assert model.batching == BatchingConfig(max_batch_size=8, max_queue_delay_s=0.0, dynamic=False)


def test_instance_groups_add_up_and_a_rate_limiter_is_not_a_count(repo):
    root, _, _ = repo
    model = _config(root, 'max_batch_size: 16\ndynamic_batching { max_queue_delay_microseconds: 300 }\n'
                          "instance_group [ { count: 2 kind: KIND_CPU rate_limiter { resources [ { name: \"r\" "
                          "count: 7 } ] } }, { kind: KIND_CPU } ]\n")
    assert model.ready
    assert model.batching == BatchingConfig(max_batch_size=16, max_queue_delay_s=0.0003, instances=3)


@pytest.mark.parametrize("text, reason", [
    ("max_batch_sise: 8\n", 'no field named "max_batch_sise"'),
    ("max_batch_size: eight\n", "max_batch_size"),
    ('name: "other"\n', "not the folder's name"),
    ('platform: "tensorrt_plan"\n', "platform"),
    ('input [ { name: "spectrum" data_type: TYPE_FP32 dims: [ 3 ] } ]\n', "no tensors ['spectrum']"),
])
def test_a_config_triton_rejects_is_rejected_with_the_reason(repo, text, reason):
    root, _, _ = repo
    model = _config(root, text)
    assert not model.ready and reason in model.reason and "config.pbtxt" in model.reason


def test_a_broken_config_leaves_the_serving_version_serving(repo):
    from specserve.runtime.engine.store import ModelStore

    root, _, _ = repo
    store = ModelStore(root)
    try:
        assert store.ready_model("rbm").version == "1"
        (root / "rbm" / "config.pbtxt").write_text("max_batch_sise: 8\n")
        assert store.reload("rbm").ready  # the loaded version keeps serving
        version, reason = store.failures["rbm"]
        assert version == "1" and "max_batch_sise" in reason
    finally:
        store.close()


def test_optional_inputs_are_marked_optional():
    from test_contract_export import card as rbm_card

    from specserve.runtime.contract import ModelCard
    from specserve.runtime.layout import model_config

    rbm = rbm_card()
    spt = ModelCard(kind="spt", preprocessing=rbm.preprocessing, label_names=("age", "mass"),
                    label_units=("Gyr", "Msun"), normalisation={"mc_samples": {"default": 4, "max": 16}})
    config = model_config("spt", spt, max_batch_size=200)
    assert config.max_batch_size == 0 and config.parameters["specserve_max_batch_rows"].string_value == "64"
    assert {t.name: t.optional for t in config.input} == {"flux": False, "n_samples": True, "seed": True}
