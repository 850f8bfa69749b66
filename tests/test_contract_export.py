"""Model contracts, the dtype table, model cards in ONNX metadata, and export validation."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from specserve.export.onnx_export import IR_VERSION, OPSET, export_model, validate_export
from specserve.runtime import dtypes
from specserve.runtime.contract import RBM_CONTRACT, ModelCard, contract_for, fill_masked
from specserve.runtime.errors import ContractError, ExportError, InvalidInputError
from specserve.runtime.preprocess import OPTICAL_PREPROCESSING, LogLinearGrid, Preprocessing

SMALL = Preprocessing(grid=LogLinearGrid.from_range(4000.0, 4100.0, 1e-4, 1800.0))


def card(**kw) -> ModelCard:
    base = dict(kind="rbm", preprocessing=SMALL, class_names=("non_cv", "cv"),
                metrics={"accuracy": 0.5}, training_fingerprint="abc")
    base.update(kw)
    return ModelCard(**base)


class ToyFreeEnergy(torch.nn.Module):
    """Two-class free-energy classifier with the RBM contract (binarisation inside)."""

    def __init__(self, n_pixels: int, n_hidden: int = 5, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(2, n_hidden, 2 * n_pixels, generator=g) * 0.1)
        self.a = torch.nn.Parameter(torch.randn(2, 2 * n_pixels, generator=g) * 0.1)
        self.b = torch.nn.Parameter(torch.randn(2, n_hidden, generator=g) * 0.1)

    def forward(self, flux):
        v = torch.cat([(flux > 1.05).float(), (flux < 0.95).float()], dim=-1)  # (B, 2P)
        act = torch.einsum("chv,bv->bch", self.w, v) + self.b  # (B, C, H)
        free = -(v @ self.a.T) - torch.nn.functional.softplus(act).sum(-1)  # (B, C)
        return torch.softmax(-free, dim=-1), free


def test_dtype_table_round_trips_and_rejects_unknown():
    for d in dtypes.DTYPES:
        assert dtypes.from_kserve(d.kserve) is d
        assert dtypes.from_onnx(d.onnx) is d
        assert dtypes.from_numpy(d.numpy) is d
        assert dtypes.from_name(d.name) is d
    assert dtypes.from_kserve("FP32").numpy == np.float32
    for bad in (lambda: dtypes.from_kserve("BYTES"), lambda: dtypes.from_onnx("tensor(string)"),
                lambda: dtypes.from_numpy(np.complex64), lambda: dtypes.from_name("float128")):
        with pytest.raises(ContractError, match="unsupported"):
            bad()


def test_model_card_round_trip_through_metadata():
    c = card(preprocessing=OPTICAL_PREPROCESSING, bounds={"teff": [3000.0, 8000.0]})
    props = c.to_metadata_props()
    assert all(k.startswith("specserve.") for k in props)
    assert ModelCard.from_metadata_props(props) == c
    assert c.dims == {"n_pixels": 3011, "n_classes": 2, "n_labels": 0}


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p.pop("specserve.kind"), "lacks specserve.kind"),
    (lambda p: p.update({"specserve.contract_version": '"99"'}), "not supported"),
    (lambda p: p.update({"specserve.preprocessing": "{not json"}), "not valid JSON"),
    (lambda p: p.update({"specserve.preprocessing": '{"grid": {"kind": "linear"}}'}), "invalid preprocessing"),
    (lambda p: p.update({"specserve.kind": '"teapot"'}), "unknown model kind"),
])
def test_model_card_rejects_bad_metadata(mutate, message):
    props = card().to_metadata_props()
    mutate(props)
    with pytest.raises(ContractError, match=message):
        ModelCard.from_metadata_props(props)


def test_validate_inputs():
    dims = card().dims
    n = dims["n_pixels"]
    ok = RBM_CONTRACT.validate_inputs({"flux": np.ones((3, n), dtype=np.float64)}, dims)
    assert ok["flux"].dtype == np.float32 and ok["flux"].shape == (3, n)
    cases = [
        ({"flux": np.ones((3, n + 1), np.float32)}, "axis 1 must be"),
        ({"flux": np.ones(n, np.float32)}, "must have shape"),
        ({"flux": np.full((1, n), np.nan, np.float32)}, "NaN"),
        ({}, "missing"),
        ({"flux": np.ones((1, n), np.float32), "extra": np.ones(1)}, "unexpected"),
        ({"flux": np.ones((0, n), np.float32)}, "empty batch"),
        ({"flux": np.ones((1, n), dtype=np.complex64)}, "must be float32"),
    ]
    for arrays, message in cases:
        with pytest.raises(InvalidInputError, match=message):
            RBM_CONTRACT.validate_inputs(arrays, dims)
    with pytest.raises(ContractError):
        contract_for("nope")


def test_fill_masked_sets_continuum():
    flux = np.array([[0.5, 0.0, 1.2]], dtype=np.float32)
    out = fill_masked(flux, np.array([[False, True, False]]))
    np.testing.assert_array_equal(out, np.array([[0.5, 1.0, 1.2]], dtype=np.float32))


@pytest.fixture
def exported(tmp_path):
    c = card()
    module = ToyFreeEnergy(c.dims["n_pixels"])
    report = export_model(module, c, tmp_path / "rbm" / "1" / "model.onnx", atol=1e-5, rtol=1e-4)
    return c, module, report


def test_export_writes_a_self_describing_valid_model(exported):
    c, module, report = exported
    model = onnx.load(str(report.path))
    assert model.ir_version == IR_VERSION and model.opset_import[0].version == OPSET
    assert {"Greater", "Less", "Softmax"} <= set(report.op_types)
    assert set(report.max_abs_diff) == {"probabilities", "free_energy"}
    assert max(report.max_abs_diff.values()) <= 1e-4
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    assert ModelCard.from_metadata_props(session.get_modelmeta().custom_metadata_map) == c
    assert [i.name for i in session.get_inputs()] == ["flux"]
    assert session.get_inputs()[0].shape[0] == "batch"
    flux = np.random.default_rng(1).normal(1, 0.1, (7, c.dims["n_pixels"])).astype(np.float32)
    probs, free = session.run(None, {"flux": flux})
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(probs, np.exp(-free) / np.exp(-free).sum(1, keepdims=True), rtol=1e-4)


def test_validation_catches_a_broken_model(exported, tmp_path):
    c, module, report = exported
    model = onnx.load(str(report.path))
    init = model.graph.initializer[0]
    array = onnx.numpy_helper.to_array(init).copy()
    array += 0.5
    init.CopyFrom(onnx.numpy_helper.from_array(array, init.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    with pytest.raises(ExportError, match="differ from torch"):
        validate_export(broken, module, c, atol=1e-5, rtol=1e-4)


def test_validation_checks_ops_metadata_and_contract(exported, tmp_path):
    c, module, report = exported
    with pytest.raises(ExportError, match="outside the allowed set"):
        validate_export(report.path, module, c, atol=1e-5, rtol=1e-4, allowed_ops={"Greater", "Less"})
    model = onnx.load(str(report.path))
    del model.metadata_props[:]
    stripped = tmp_path / "nometa.onnx"
    onnx.save(model, str(stripped))
    with pytest.raises(ExportError, match="lacks specserve"):
        validate_export(stripped, module, c, atol=1e-5, rtol=1e-4)
    other = card(class_names=("a", "b", "c"))
    with pytest.raises(ExportError, match="contract"):
        validate_export(report.path, module, other, atol=1e-5, rtol=1e-4)
