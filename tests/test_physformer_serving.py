"""PhysFormer exported (both graphs, flux layer inside) and served: parameters with uncertainties,
reduced chi-square and model spectra through the domain API; physformer-generate through KServe v2."""

from __future__ import annotations

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from conftest import serving

from specserve.export.cli import main
from specserve.runtime.client import Client
from specserve.runtime.contract import ModelCard
from specserve.runtime.embedded.analysis import SpectrumInput
from specserve.training.common import load_set


@pytest.fixture(scope="module")
def repo(physformer_run, tmp_path_factory):
    repo = tmp_path_factory.mktemp("pf-repo")
    assert main(["export", "physformer", "--run", str(physformer_run), "--repository", str(repo)]) == 0
    return repo


@pytest.fixture(scope="module")
def server(repo):
    with serving(repo) as address:
        yield address


def test_both_graphs_are_standard_onnx_with_the_flux_layer(repo):
    for name in ("physformer", "physformer-generate"):
        graph = onnx.load(str(repo / name / "1" / "model.onnx"))
        assert graph.opset_import[0].version <= 21
        assert all(n.domain in ("", "ai.onnx") for n in graph.graph.node)
        ops = {n.op_type for n in graph.graph.node}
        assert {"CumSum", "Exp", "Conv"} <= ops  # optical depth, transmission, broadening
        card = ModelCard.from_metadata_props({p.key: p.value for p in graph.metadata_props})
        assert card.label_names == ("teff", "logg", "feh") and card.bounds["teff"] == [2500.0, 50000.0]
    assert "RandomUniformLike" in {n.op_type for n in onnx.load(str(repo / "physformer" / "1" / "model.onnx")).graph.node}


def _stars(n: int) -> list[SpectrumInput]:
    bench = load_set("stars")
    wave = bench.preprocessing.grid.wavelength
    a = bench.arrays
    return [SpectrumInput(f"s{i}", wave, a["flux"][i], ivar=a["ivar"][i], mask=a["mask"][i])
            for i in bench.split_indices("test")[:n]]


def test_domain_api_returns_parameters_errors_chi2_and_model_spectra(server):
    spectra = _stars(5)
    with Client(server) as client:
        rows = client.analyze(spectra, models=["physformer"], model_spectrum=True)
        again = client.analyze(spectra, models=["physformer"])
    for row in rows:
        assert row.ok and row.models == ["physformer:1"], row.notes
        v = row.values
        assert 2500 <= v["teff"] <= 50000 and -1 <= v["logg"] <= 6 and -4.5 <= v["feh"] <= 1
        assert v["teff_err"] > 0 and v["logg_err"] > 0 and np.isfinite(v["reduced_chi2"]) and v["reduced_chi2"] > 0
        assert row.model_spectra["physformer"].shape == (3011,)
        assert np.all(row.model_spectra["physformer"] > 0)
    assert all(not r.model_spectra for r in again)  # only when asked
    assert [r.values["teff"] for r in rows] != [r.values["teff"] for r in again]  # MC: new masks each run


def test_every_model_by_default_skips_the_generator(server):
    spectra = _stars(2)
    with Client(server) as client:
        rows = client.analyze(spectra)  # no models named: every model that analyses spectra
        assert all(r.ok and r.models == ["physformer:1"] for r in rows), [r.notes for r in rows]
        # naming the generator in the domain API is a clear client error, not a crash
        with pytest.raises(grpc.RpcError) as err:
            client.analyze(spectra, models=["physformer-generate"])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not analyse spectra" in err.value.details() and "ModelInfer" in err.value.details()


def test_non_stellar_input_stays_in_the_box(server):
    wave = load_set("stars").preprocessing.grid.wavelength
    rng = np.random.default_rng(0)
    items = [SpectrumInput("noise", wave, rng.normal(1.0, 0.5, wave.size)),
             SpectrumInput("flat", wave, np.ones(wave.size))]
    with Client(server) as client:
        rows = client.analyze(items, models=["physformer"])
    for row in rows:
        assert 2500 <= row.values["teff"] <= 50000 and -4.5 <= row.values["feh"] <= 1
        assert np.isnan(row.values["reduced_chi2"])  # no ivar given: no chi-square


def test_generate_through_kserve_matches_the_file(server, repo):
    client = triton.InferenceServerClient(server)
    meta = client.get_model_metadata("physformer-generate")
    assert [(t.name, list(t.shape)) for t in meta.inputs] == [("parameters", [-1, 3])]
    params = np.array([[3800.0, 4.7, -0.2], [5777.0, 4.44, 0.0], [9500.0, 4.0, -0.5]], np.float32)
    inp = triton.InferInput("parameters", [3, 3], "FP32")
    inp.set_data_from_numpy(params)
    spectrum = client.infer("physformer-generate", [inp]).as_numpy("spectrum")
    direct = ort.InferenceSession(str(repo / "physformer-generate" / "1" / "model.onnx"),
                                  providers=["CPUExecutionProvider"]).run(None, {"parameters": params})[0]
    assert spectrum.shape == (3, 3011)
    np.testing.assert_allclose(spectrum, direct, rtol=1e-6)
    inp.set_data_from_numpy(np.array([[100.0, 4.0, 0.0]] * 3, np.float32))
    with pytest.raises(triton.InferenceServerException) as info:
        client.infer("physformer-generate", [inp])
    assert "INVALID_ARGUMENT" in str(info.value.status()) and "teff must be within" in info.value.message()


def test_kserve_inversion_needs_ivar(server):
    client = triton.InferenceServerClient(server)
    flux = np.ones((2, 3011), np.float32)
    inp = triton.InferInput("flux", [2, 3011], "FP32")
    inp.set_data_from_numpy(flux)
    with pytest.raises(triton.InferenceServerException) as info:
        client.infer("physformer", [inp])
    assert "INVALID_ARGUMENT" in str(info.value.status()) and "ivar" in info.value.message()
    iv = triton.InferInput("ivar", [2, 3011], "FP32")
    iv.set_data_from_numpy(np.full((2, 3011), 1e4, np.float32))
    result = client.infer("physformer", [inp, iv])
    assert result.as_numpy("parameters").shape == (2, 3) and result.as_numpy("reduced_chi2").shape == (2,)
