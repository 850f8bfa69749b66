"""``--device auto|cpu|cuda[:N]``: provider choice, the CUDA probe, CPU session threads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_repository import repo  # noqa: F401 - the toy RBM repository fixture

from specserve.runtime.embedded import providers
from specserve.runtime.embedded.providers import Device, cuda_unavailable, parse_device, resolve_device
from specserve.runtime.engine.repository import load_repository
from specserve.runtime.errors import SpecserveError

SPECSERVE = str(Path(sys.executable).with_name("specserve"))


def test_parse_device():
    assert parse_device("auto") == ("auto", None)
    assert parse_device("CPU") == ("cpu", None)
    assert parse_device("cuda") == ("cuda", None) and parse_device("cuda:3") == ("cuda", 3)
    for bad in ("gpu", "cuda:", "cuda:x", "cpu:1", "auto:0", ""):
        with pytest.raises(SpecserveError, match="--device"):
            parse_device(bad)
    with pytest.raises(SpecserveError, match="--threads"):
        resolve_device("cpu", -1)


def test_auto_takes_cuda_only_when_the_probe_passes():
    reason = cuda_unavailable()
    device = resolve_device("auto")
    if reason:  # this machine (no GPU or no CUDA 13 / cuDNN 9): the CPU, saying why in one note
        assert device.kind == "cpu" and device.providers() == ["CPUExecutionProvider"]
        assert device.note == f"CUDA not used: {reason}"
        with pytest.raises(SpecserveError, match="cannot run here: " + reason.split(" (")[0][:30]):
            resolve_device("cuda")
    else:
        assert device.kind == "cuda" and device.providers()[0][0] == "CUDAExecutionProvider"
    assert resolve_device("cpu").kind == "cpu" and resolve_device("cpu").note == ""


def test_probe_reports_missing_libraries_and_no_gpu(monkeypatch):
    # as onnxruntime-gpu lists it (the CPU build, installed by default, does not)
    monkeypatch.setattr(providers.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(providers, "_missing_libraries", lambda: ["libcudnn.so.9"])
    monkeypatch.setattr(providers.ort, "preload_dlls", lambda: print("noise that must stay hidden"), raising=False)
    assert cuda_unavailable() == "CUDA libraries not found: libcudnn.so.9"
    monkeypatch.setattr(providers, "_missing_libraries", lambda: [])
    monkeypatch.setattr(providers, "_gpu_count", lambda: (0, "no CUDA-capable device is detected"))
    assert cuda_unavailable() == "no CUDA GPU visible (no CUDA-capable device is detected)"
    monkeypatch.setattr(providers, "_gpu_count", lambda: (2, ""))
    assert cuda_unavailable(1) == "" and cuda_unavailable(2) == "GPU 2 asked for, but 2 visible"
    monkeypatch.setattr(providers.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert "no CUDAExecutionProvider" in cuda_unavailable()


def test_cpu_threads_are_shared_among_the_models(repo):  # noqa: F811
    root, c, _ = repo
    cores = os.cpu_count() or 1
    assert Device().threads_per_session(1) == max(1, min(4, cores))
    assert Device().threads_per_session(1000) == 1 and Device(intra_threads=3).threads_per_session(10) == 3
    models = load_repository(root, Device(intra_threads=1))
    options = models["rbm"].session.get_session_options()
    assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert models["rbm"].session.get_providers() == ["CPUExecutionProvider"]
    flux = np.ones((2, c.dims["n_pixels"]), np.float32)
    assert models["rbm"].run({"flux": flux})["probabilities"].shape == (2, 2)


def test_serve_with_a_bad_or_unavailable_device_exits_with_the_reason(repo):  # noqa: F811
    root, _, _ = repo
    bad = subprocess.run([SPECSERVE, "serve", "--repository", str(root), "--port", "0", "--device", "tpu"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "--device must be auto, cpu, cuda or cuda:N" in bad.stderr
    reason = cuda_unavailable(7)
    if reason:  # cuda:7 cannot run here: a clear error, no ONNX Runtime provider spam, no server
        out = subprocess.run([SPECSERVE, "serve", "--repository", str(root), "--port", "0", "--device", "cuda:7"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and "the CUDA provider cannot run here" in out.stderr
        assert "onnxruntime.ai" not in out.stderr + out.stdout and len(out.stderr.splitlines()) == 1
