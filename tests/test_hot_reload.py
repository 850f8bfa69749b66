"""Model repository changes while serving: repository RPCs and the folder watch. A version that
fails to load leaves the previous one serving and is reported, with its reason."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from specserve.export.onnx_export import export_model
from specserve.export.repository import write_model
from specserve.protos import grpc_service_pb2 as kserve
from specserve.protos import grpc_service_pb2_grpc as kserve_grpc

from test_contract_export import ToyFreeEnergy, card

SPECSERVE = str(Path(sys.executable).with_name("specserve"))


@pytest.fixture
def repo(tmp_path):
    c = card()
    report = export_model(ToyFreeEnergy(c.dims["n_pixels"]), c, tmp_path / "build" / "model.onnx", atol=1e-5, rtol=1e-4)
    write_model(tmp_path / "repo", "rbm", 1, report.path, c)
    return tmp_path / "repo", report.path, c


@pytest.fixture
def served(repo):
    proc = subprocess.Popen([SPECSERVE, "serve", "--repository", str(repo[0]), "--port", "0", "--device", "cpu",
                             "--poll-repository", "0.3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "ORT_DISABLE_TELEMETRY": "1"})
    line = proc.stdout.readline()
    assert "serving" in line, proc.stderr.read()
    channel = grpc.insecure_channel(line.strip().rsplit(" on ", 1)[1])
    yield kserve_grpc.GRPCInferenceServiceStub(channel), proc
    channel.close()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def _infer(stub, n_pixels: int, version: str = "") -> kserve.ModelInferResponse:
    flux = np.ones((1, n_pixels), np.float32)
    request = kserve.ModelInferRequest(model_name="rbm", model_version=version, inputs=[
        kserve.ModelInferRequest.InferInputTensor(name="flux", datatype="FP32", shape=list(flux.shape))])
    request.raw_input_contents.append(flux.tobytes())
    return stub.ModelInfer(request, timeout=10)


def _wait(predicate, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def _index(stub) -> list[tuple[str, str, str, str]]:
    return [(m.name, m.version, m.state, m.reason) for m in stub.RepositoryIndex(kserve.RepositoryIndexRequest()).models]


def test_corrupt_version_keeps_the_previous_serving_and_a_good_one_replaces_it(served, repo):
    stub, _ = served
    root, onnx_path, c = repo
    n = c.dims["n_pixels"]
    assert _infer(stub, n).model_version == "1"
    # a corrupt version 2 arrives: RepositoryModelLoad says why, version 1 keeps answering
    (root / "rbm" / "2").mkdir()
    (root / "rbm" / "2" / "model.onnx").write_bytes(b"half a model")
    with pytest.raises(grpc.RpcError) as err:
        stub.RepositoryModelLoad(kserve.RepositoryModelLoadRequest(model_name="rbm"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "version 2 did not load" in err.value.details() and "version 1 keeps serving" in err.value.details()
    assert _infer(stub, n).model_version == "1"
    assert stub.ModelReady(kserve.ModelReadyRequest(name="rbm")).ready
    assert not stub.ModelReady(kserve.ModelReadyRequest(name="rbm", version="2")).ready
    index = _index(stub)
    assert ("rbm", "1", "READY", "") in index
    assert any(v == "2" and state == "UNAVAILABLE" and "cannot load" in reason for _, v, state, reason in index)
    # a good version 2 replaces it: the folder watch picks it up without a request
    shutil.copy(onnx_path, root / "rbm" / "2" / "model.onnx")
    assert _wait(lambda: _infer(stub, n).model_version == "2")
    assert stub.ModelReady(kserve.ModelReadyRequest(name="rbm", version="2")).ready
    assert _index(stub) == [("rbm", "2", "READY", "")]


def test_added_model_is_loaded_and_unload_and_load_work(served, repo):
    stub, _ = served
    root, onnx_path, c = repo
    write_model(root, "second", 1, onnx_path, c)
    assert _wait(lambda: ("second", "1", "READY", "") in _index(stub))
    assert stub.ModelReady(kserve.ModelReadyRequest(name="second")).ready
    stub.RepositoryModelUnload(kserve.RepositoryModelUnloadRequest(model_name="second"))
    assert not stub.ModelReady(kserve.ModelReadyRequest(name="second")).ready
    assert [s for name, _, s, _ in _index(stub) if name == "second"] == ["UNAVAILABLE"]
    stub.RepositoryModelLoad(kserve.RepositoryModelLoadRequest(model_name="second"))
    assert stub.ModelReady(kserve.ModelReadyRequest(name="second")).ready
    with pytest.raises(grpc.RpcError) as err:
        stub.RepositoryModelLoad(kserve.RepositoryModelLoadRequest(model_name="nothing"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # a folder that is removed is unloaded; the others keep serving
    shutil.rmtree(root / "second")
    assert _wait(lambda: not stub.ModelReady(kserve.ModelReadyRequest(name="second")).ready)
    assert _infer(stub, c.dims["n_pixels"]).model_version == "1"
    assert stub.ServerReady(kserve.ServerReadyRequest()).ready
