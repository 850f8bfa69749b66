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
from tritonclient.utils import InferenceServerException

from test_hot_reload import repo  # noqa: F401 - the toy-RBM repository

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
