"""The exported SPT behind a real server: ages and masses with uncertainties through the domain API
and through KServe v2 (tritonclient), MC samples per request, bounds refused."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from conftest import serving

from specserve.protos import specserve_pb2 as pb
from specserve.protos import specserve_pb2_grpc as pb_grpc
from specserve.runtime.client import Client
from specserve.runtime.embedded.analysis import SpectrumInput
from specserve.runtime.engine.repository import load_model_file
from specserve.runtime.wire import to_proto
from specserve.training.rbm.evaluate import model_inputs


@pytest.fixture(scope="module")
def spt_server(spt_run, tmp_path_factory):
    from specserve.export.spt import export_spt

    _, run_dir, _, _ = spt_run
    repo = tmp_path_factory.mktemp("spt-serve")
    export_spt(run_dir, repo, served_check=False)  # serving only: the skew tests check the served metrics
    with serving(repo) as address:
        yield address, repo


def _giants(bench, n: int) -> list[SpectrumInput]:
    grid = bench.preprocessing.grid.wavelength
    a = bench.arrays
    out = []
    for i in bench.split_indices("test")[:n]:
        out.append(SpectrumInput(f"kic{a['kic'][i]}", grid, a["flux"][i], ivar=a["ivar"][i], mask=a["mask"][i]))
    return out


def test_domain_api_returns_age_and_mass_with_uncertainties(spt_server, spt_run):
    address, repo = spt_server
    bench = spt_run[0]
    spectra = _giants(bench, 6)
    with Client(address) as client:
        info = {m.name: m for m in client.list_models()}
        assert info["spt"].ready and info["spt"].metadata["labels"] == "age,mass"
        default = int(info["spt"].metadata["mc_samples_default"])
        first = client.analyze(spectra)
        second = client.analyze(spectra)
        few = client.analyze(spectra, mc_samples=5)
    assert [r.id for r in first] == [s.id for s in spectra]
    for row in first:
        assert row.ok and row.models == ["spt:1"]
        assert 0.3 < row.values["age"] < 30 and 0.5 < row.values["mass"] < 4
        assert row.values["age_err"] > 0 and row.values["mass_err"] > 0
        assert row.values["n_samples"] == default
    assert all(r.values["n_samples"] == 5 for r in few)
    # new dropout masks on every request: the estimates move, within their MC errors
    ages1 = np.array([r.values["age"] for r in first])
    ages2 = np.array([r.values["age"] for r in second])
    assert not np.array_equal(ages1, ages2)
    # the server's preprocessing of grid spectra reproduces the set's model input
    direct = load_model_file("spt", "1", repo / "spt" / "1" / "model.onnx")
    flux = model_inputs(bench, bench.split_indices("test")[:6])
    want = direct.run({"flux": flux, "n_samples": np.array([256])})["mean"][:, 0]
    np.testing.assert_allclose(ages1, want, rtol=0.05)


def test_samples_beyond_the_bound_are_invalid_argument(spt_server, spt_run):
    address, _ = spt_server
    spectra = _giants(spt_run[0], 1)
    stub = pb_grpc.SpecServeStub(grpc.insecure_channel(address))
    with pytest.raises(grpc.RpcError) as info:
        stub.Analyze(pb.AnalyzeRequest(spectra=[to_proto(spectra[0])], mc_samples=100000), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "n_samples must be between 1 and" in info.value.details()


def test_optical_spectrum_is_not_applicable_with_the_reason(spt_server, kit):
    from specserve.runtime.io import read_spectra

    address, _ = spt_server
    spectrum = read_spectra(sorted((kit / "lamost_dr1/fits").glob("*.fits"))[0])[0]
    with Client(address) as client:
        [row] = client.analyze([spectrum])
    assert row.ok and not row.values and row.notes and "spt: spectrum covers 0%" in row.notes[0]


def test_kserve_infer_with_tritonclient(spt_server, spt_run):
    address, _ = spt_server
    bench = spt_run[0]
    flux = model_inputs(bench, bench.split_indices("test")[:3])
    client = triton.InferenceServerClient(address)
    meta = client.get_model_metadata("spt")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("flux", "FP32", [-1, flux.shape[1]]), ("n_samples", "INT64", [1]), ("seed", "FP32", [1])]
    assert [(t.name, list(t.shape)) for t in meta.outputs] == [("mean", [-1, 2]), ("std", [-1, 2]),
                                                                ("samples", [-1, -1, 2])]
    inp = triton.InferInput("flux", list(flux.shape), "FP32")
    inp.set_data_from_numpy(flux)
    a = client.infer("spt", [inp])  # n_samples and seed left to the server
    b = client.infer("spt", [inp])
    assert a.as_numpy("mean").shape == (3, 2) and np.all(a.as_numpy("std") > 0)
    assert not np.array_equal(a.as_numpy("samples"), b.as_numpy("samples"))
    n = triton.InferInput("n_samples", [1], "INT64")
    n.set_data_from_numpy(np.array([7], np.int64))
    c = client.infer("spt", [inp, n], outputs=[triton.InferRequestedOutput("samples")])
    assert c.as_numpy("samples").shape == (7, 3, 2)
    n.set_data_from_numpy(np.array([0], np.int64))
    with pytest.raises(triton.InferenceServerException) as info:
        client.infer("spt", [inp, n])
    assert "INVALID_ARGUMENT" in str(info.value.status())
