"""Model repository changes while serving: repository RPCs and the folder watch. A version that
fails to load leaves the previous one serving and is reported, with its reason. Spoken to with
tritonclient (our KServe protos cannot share a process with it; see protos/README.md)."""

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
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_contract_export import ToyFreeEnergy, card
from tritonclient.utils import InferenceServerException

from specserve.export.onnx_export import export_model
from specserve.export.repository import write_model

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
                             "--poll-repository", "0.3", "--model-control", "explicit"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "ORT_DISABLE_TELEMETRY": "1"})
    line = proc.stdout.readline()
    assert "serving" in line, proc.stderr.read()
    address = line.strip().rsplit(" on ", 1)[1]
    client = triton.InferenceServerClient(address)
    yield client, proc, address
    client.close()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def _infer(client, n_pixels: int, rows: int = 1) -> str:
    """The version that answered a ModelInfer request."""
    tensor = triton.InferInput("flux", [rows, n_pixels], "FP32")
    tensor.set_data_from_numpy(np.ones((rows, n_pixels), np.float32))
    return client.infer("rbm", [tensor]).get_response().model_version


def _wait(predicate, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def _health(served, service: str) -> str:
    """The grpc.health.v1 status of ``service`` on the served address."""
    with grpc.insecure_channel(served[2]) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


def _index(client) -> list[tuple[str, str, str, str]]:
    return [(m.name, m.version, m.state, m.reason) for m in client.get_model_repository_index().models]


def test_corrupt_version_keeps_the_previous_serving_and_a_good_one_replaces_it(served, repo):
    client = served[0]
    root, onnx_path, c = repo
    n = c.dims["n_pixels"]
    assert _infer(client, n) == "1"
    # a corrupt version 2 arrives: RepositoryModelLoad says why, version 1 keeps answering
    (root / "rbm" / "2").mkdir()
    (root / "rbm" / "2" / "model.onnx").write_bytes(b"half a model")
    with pytest.raises(InferenceServerException) as err:
        client.load_model("rbm")
    assert "FAILED_PRECONDITION" in str(err.value.status())
    assert "version 2 did not load" in err.value.message() and "version 1 keeps serving" in err.value.message()
    assert _infer(client, n) == "1"
    assert client.is_model_ready("rbm") and not client.is_model_ready("rbm", "2")
    assert _health(served, "model/rbm") == "SERVING" and _health(served, "") == "SERVING"
    index = _index(client)
    assert ("rbm", "1", "READY", "") in index
    assert any(v == "2" and state == "UNAVAILABLE" and "cannot load" in reason for _, v, state, reason in index)
    # a good version 2 replaces it: the folder watch picks it up without a request
    shutil.copy(onnx_path, root / "rbm" / "2" / "model.onnx")
    assert _wait(lambda: _infer(client, n) == "2")
    assert client.is_model_ready("rbm", "2")
    assert _index(client) == [("rbm", "2", "READY", "")]


def test_added_model_is_loaded_and_unload_and_load_work(served, repo):
    client = served[0]
    root, onnx_path, c = repo
    write_model(root, "second", 1, onnx_path, c)
    assert _wait(lambda: ("second", "1", "READY", "") in _index(client))
    assert client.is_model_ready("second")
    assert _wait(lambda: _health(served, "model/second") == "SERVING")
    client.unload_model("second")
    assert not client.is_model_ready("second")
    assert _health(served, "model/second") == "NOT_SERVING" and _health(served, "model/rbm") == "SERVING"
    assert [s for name, _, s, _ in _index(client) if name == "second"] == ["UNAVAILABLE"]
    client.load_model("second")
    assert client.is_model_ready("second") and _health(served, "model/second") == "SERVING"
    with pytest.raises(InferenceServerException) as err:
        client.load_model("nothing")
    assert "NOT_FOUND" in str(err.value.status())
    # a folder that is removed is unloaded; the others keep serving
    shutil.rmtree(root / "second")
    assert _wait(lambda: not client.is_model_ready("second"))
    assert _wait(lambda: _health(served, "model/second") == "NOT_SERVING")
    assert _infer(client, c.dims["n_pixels"]) == "1"
    assert client.is_server_ready()


def test_model_statistics_count_requests_failures_and_batches(served, repo):
    client = served[0]
    n = repo[2].dims["n_pixels"]
    for rows in (1, 1, 3):
        _infer(client, n, rows)
    bad = triton.InferInput("flux", [2, n - 1], "FP32")
    bad.set_data_from_numpy(np.ones((2, n - 1), np.float32))
    with pytest.raises(InferenceServerException) as err:
        client.infer("rbm", [bad])
    assert "INVALID_ARGUMENT" in str(err.value.status())
    (rbm,) = client.get_inference_statistics("rbm").model_stats
    assert rbm.name == "rbm" and rbm.version == "1"
    assert rbm.inference_stats.success.count == 3 and rbm.inference_stats.fail.count == 1
    assert rbm.inference_count == 5 and rbm.execution_count == 3 and rbm.last_inference > 0
    assert rbm.inference_stats.compute_infer.count == 3 and rbm.inference_stats.compute_infer.ns > 0
    assert rbm.inference_stats.success.ns >= rbm.inference_stats.compute_infer.ns
    assert [(b.batch_size, b.compute_infer.count) for b in rbm.batch_stats] == [(1, 2), (3, 1)]
    with pytest.raises(InferenceServerException) as missing:
        client.get_inference_statistics("nothing")
    assert "NOT_FOUND" in str(missing.value.status())
    # no name: every ready model
    assert [m.name for m in client.get_inference_statistics().model_stats] == ["rbm"]


SHIPPED_SPT = Path(__file__).resolve().parents[1] / "runtime" / "models" / "spt" / "1" / "model.onnx"


def test_a_model_of_another_kind_in_the_folder_is_refused(served, repo):
    """A valid SPT file dropped into rbm/3 is not served as rbm: refused by the folder's
    config.pbtxt, and without one by the folder's kind; version 1 keeps answering."""
    client = served[0]
    root, _, c = repo
    (root / "rbm" / "3").mkdir()
    shutil.copy(SHIPPED_SPT, root / "rbm" / "3" / "model.onnx")
    with pytest.raises(InferenceServerException) as err:
        client.load_model("rbm")
    assert "version 3 did not load" in err.value.message() and "probabilities" in err.value.message()
    assert _infer(client, c.dims["n_pixels"]) == "1"
    (root / "rbm" / "config.pbtxt").unlink()
    with pytest.raises(InferenceServerException) as err:
        client.load_model("rbm")
    assert "is a spt model" in err.value.message() and "serves rbm" in err.value.message()
    assert _infer(client, c.dims["n_pixels"]) == "1" and client.is_model_ready("rbm")


def test_an_unchanged_model_is_not_reinstalled(served, repo):
    client = served[0]
    n = repo[2].dims["n_pixels"]
    for _ in range(3):
        _infer(client, n)
    client.load_model("rbm")  # nothing changed on disk
    (stats,) = client.get_inference_statistics("rbm").model_stats
    assert stats.inference_count == 3  # the same loaded model, its statistics kept


def test_swapping_versions_never_fails_an_admitted_request(served, repo):
    """Eight callers infer without pause while twelve new versions are loaded one after another:
    every request is answered, by whichever version held it."""
    import threading

    client = served[0]
    root, onnx_path, c = repo
    n = c.dims["n_pixels"]
    failures, answered, stop = [], [], threading.Event()

    def caller() -> None:
        own = triton.InferenceServerClient(served[2])
        while not stop.is_set():
            try:
                answered.append(_infer(own, n))
            except InferenceServerException as exc:
                failures.append(str(exc))
        own.close()

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        for version in range(2, 14):
            (root / "rbm" / str(version)).mkdir()
            shutil.copy(onnx_path, root / "rbm" / str(version) / "model.onnx")
            client.load_model("rbm")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert failures == [] and len(answered) > 100
    # the callers were answered across swaps (by version 1 and later ones); the last load serves
    assert "1" in answered and len(set(answered)) >= 2 and _infer(client, n) == "13"
