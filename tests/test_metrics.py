"""Prometheus metrics over HTTP from a real server: counts, histograms and gauges per model."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from prometheus_client.parser import text_string_to_metric_families
from test_hot_reload import repo  # noqa: F401 - the toy-RBM repository
from tritonclient.utils import InferenceServerException

SPECSERVE = str(Path(sys.executable).with_name("specserve"))
ENV = {**os.environ, "ORT_DISABLE_TELEMETRY": "1"}


def _samples(url: str) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_endpoint_counts_runs_failures_batches(repo):  # noqa: F811
    root, _, c = repo
    n = c.dims["n_pixels"]
    proc = subprocess.Popen([SPECSERVE, "serve", "--repository", str(root), "--port", "0", "--metrics-port", "0",
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        line = proc.stdout.readline()
        assert "serving" in line, proc.stderr.read()
        metrics_line = next(l for l in iter(proc.stderr.readline, "") if "metrics on" in l)
        url = metrics_line.strip().rsplit(" on ", 1)[1]
        client = triton.InferenceServerClient(line.strip().rsplit(" on ", 1)[1])
        for rows in (1, 1, 40):
            tensor = triton.InferInput("flux", [rows, n], "FP32")
            tensor.set_data_from_numpy(np.ones((rows, n), np.float32))
            client.infer("rbm", [tensor])
        bad = triton.InferInput("flux", [1, n - 1], "FP32")
        bad.set_data_from_numpy(np.ones((1, n - 1), np.float32))
        with pytest.raises(InferenceServerException):
            client.infer("rbm", [bad])
        client.close()
        m = _samples(url)
        rbm = (("model", "rbm"),)
        assert m[("specserve_requests_total", rbm)] == 4 and m[("specserve_request_failures_total", rbm)] == 1
        assert m[("specserve_request_seconds_count", rbm)] == 4 and m[("specserve_request_seconds_sum", rbm)] > 0
        assert m[("specserve_compute_seconds_count", rbm)] == 3 and m[("specserve_queue_seconds_count", rbm)] == 3
        assert m[("specserve_batch_size_count", rbm)] == 3 and m[("specserve_batch_size_sum", rbm)] == 42
        assert m[("specserve_batch_size_bucket", (("le", "1.0"), ("model", "rbm")))] == 2
        assert m[("specserve_batch_size_bucket", (("le", "64.0"), ("model", "rbm")))] == 3
        assert m[("specserve_queue_depth", rbm)] == 0 and m[("specserve_models_ready", ())] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_busy_metrics_port_asked_for_is_an_error(repo):  # noqa: F811
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([SPECSERVE, "serve", "--repository", str(repo[0]), "--port", "0",
                                 "--metrics-port", str(port)], capture_output=True, text=True, timeout=60, env=ENV)
    assert result.returncode == 1 and f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr


def test_request_log_has_one_line_per_request_with_its_id(repo, tmp_path):  # noqa: F811
    from specserve.runtime.client import Client
    from specserve.runtime.embedded.analysis import SpectrumInput

    root, _, c = repo
    n = c.dims["n_pixels"]
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([SPECSERVE, "serve", "--repository", str(root), "--port", "0", "--metrics-port", "-1",
                                 "--log-requests"], stdout=subprocess.PIPE, stderr=log_file, text=True, env=ENV)
    try:
        line = proc.stdout.readline()
        address = line.strip().rsplit(" on ", 1)[1]
        client = triton.InferenceServerClient(address)
        tensor = triton.InferInput("flux", [2, n], "FP32")
        tensor.set_data_from_numpy(np.ones((2, n), np.float32))
        client.infer("rbm", [tensor], request_id="night-42")
        assigned = client.infer("rbm", [tensor]).get_response().id  # no id sent: the server gives one
        bad = triton.InferInput("flux", [1, n - 1], "FP32")
        bad.set_data_from_numpy(np.ones((1, n - 1), np.float32))
        with pytest.raises(InferenceServerException):
            client.infer("rbm", [bad], request_id="bad-1")
        client.close()
        wave = np.exp(np.linspace(np.log(3700), np.log(7400), 3000))
        with Client(address) as domain:
            rows = list(domain.stream([SpectrumInput(f"s{i}", wave, np.ones(wave.size)) for i in range(5)], batch_size=2))
        assert len(rows) == 5
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    lines = [l for l in log_path.read_text().splitlines() if "specserve.requests" in l]
    assert any("ModelInfer id=night-42 model=rbm n=2 OK" in l for l in lines), lines
    assert len(assigned) == 12 and any(f"ModelInfer id={assigned} model=rbm n=2 OK" in l for l in lines)
    assert any("ModelInfer id=bad-1 model=rbm n=1 INVALID_ARGUMENT" in l and "flux" in l for l in lines)
    analyze = [l for l in lines if "Analyze id=" in l]
    # the client's stream: three messages (2 + 2 + 1 spectra), one shared stream prefix
    assert len(analyze) == 3 and all("models=all" in l and " OK " in l for l in analyze)
    ids = [l.split("id=")[1].split()[0] for l in analyze]
    assert len({i.rsplit("-", 1)[0] for i in ids}) == 1 and sorted(i.rsplit("-", 1)[1] for i in ids) == ["0", "1", "2"]
