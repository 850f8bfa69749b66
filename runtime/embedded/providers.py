"""Execution providers: ``--device auto|cpu|cuda[:N]`` to ONNX Runtime providers and session options.

onnxruntime-gpu lists ``CUDAExecutionProvider`` as available whether or not it can load: without
the CUDA 13 and cuDNN 9 libraries, or without a GPU, a session asked for it prints a long error
and silently runs on the CPU. So the CUDA path is probed first, without ONNX Runtime: the
libraries the provider needs are opened with ``ctypes`` (after a quiet
``onnxruntime.preload_dlls()`` for CUDA installed as pip packages) and the CUDA runtime is asked
how many GPUs it sees. ``auto`` takes CUDA only when that probe passes and otherwise the CPU, with
one log line saying why; ``cuda[:N]`` fails with that reason instead.

On the CPU every session gets ``intra_threads`` threads (default: the host's cores shared among
the models, 1 to 4 each) and no spinning, so several sessions on one host do not steal each
other's cores while they wait.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import re
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from specserve.runtime.errors import SpecserveError

log = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_LIBRARIES = ("libcudart.so.13", "libcublasLt.so.13", "libcublas.so.13", "libcurand.so.10",
                  "libcufft.so.12", "libcudnn.so.9")
"""What onnxruntime-gpu 1.31's CUDA provider links against (CUDA 13, cuDNN 9)."""

_DEVICE = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


@dataclass(frozen=True)
class Device:
    """Where sessions run: ``kind`` "cpu" or "cuda", the GPU index, and the CPU threads per session
    (0: decided from the number of models when the repository loads)."""

    kind: str = "cpu"
    index: int = 0
    intra_threads: int = 0
    memory_arena: bool = True
    """ONNX Runtime's CPU memory arena (off: less memory held between runs, for small devices)."""
    note: str = ""
    """Why ``auto`` chose the CPU (empty otherwise)."""

    @property
    def name(self) -> str:
        return f"cuda:{self.index}" if self.kind == "cuda" else "cpu"

    def providers(self) -> list:
        if self.kind == "cuda":
            return [(CUDA_PROVIDER, {"device_id": str(self.index)}), CPU_PROVIDER]
        return [CPU_PROVIDER]

    def session_options(self, n_models: int = 1) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads_per_session(n_models)
        options.inter_op_num_threads = 1
        # waiting threads sleep instead of spinning: several sessions share the cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.enable_cpu_mem_arena = self.memory_arena
        return options

    def threads_per_session(self, n_models: int = 1) -> int:
        if self.intra_threads > 0:
            return self.intra_threads
        return max(1, min(4, (os.cpu_count() or 1) // max(1, n_models)))


def single_threaded_numpy() -> str:
    """Limit numpy's own BLAS (the OpenBLAS numpy ships) to one thread for the whole process, and
    say what was done.

    The preprocessing's least-squares fits are many small matrix products. A server runs several
    messages' preprocessing at once, one per thread, each already using a core; a BLAS that also
    starts a thread per core for every product oversubscribes the cores and spins waiting for its
    workers (measured on the LAMOST exposure, 2 cores: the server's CPU time fell from 25.8 s to
    15.0 s with one BLAS thread). Only numpy's library is touched: torch's, where loaded, keeps
    its own threads."""
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:
        return "numpy's BLAS threads left as they are (threadpoolctl is not installed)"
    root = os.path.dirname(os.path.dirname(np.__file__))
    limits = {info["prefix"]: 1 for info in threadpool_info()
              if info.get("user_api") == "blas" and info.get("filepath", "").startswith(root + os.sep + "numpy")}
    if not limits:
        return "numpy's BLAS threads left as they are (no numpy BLAS library found)"
    threadpool_limits(limits=limits)
    return f"numpy's BLAS ({', '.join(sorted(limits))}) limited to one thread"


def parse_device(text: str) -> tuple[str, int | None]:
    match = _DEVICE.match(text.strip().lower())
    if not match:
        raise SpecserveError(f"--device must be auto, cpu, cuda or cuda:N, got {text!r}")
    kind, index = match.groups()
    if kind != "cuda" and index is not None:
        raise SpecserveError(f"--device {text!r}: only cuda takes a GPU index")
    return kind, None if index is None else int(index)


def _missing_libraries() -> list[str]:
    missing = []
    for name in CUDA_LIBRARIES:
        try:
            ctypes.CDLL(name)
        except OSError:
            missing.append(name)
    return missing


def _gpu_count() -> tuple[int, str]:
    """GPUs the CUDA runtime sees, and its error text when it sees none."""
    cudart = ctypes.CDLL("libcudart.so.13")
    count = ctypes.c_int(0)
    code = cudart.cudaGetDeviceCount(ctypes.byref(count))
    if code != 0:
        cudart.cudaGetErrorString.restype = ctypes.c_char_p
        return 0, cudart.cudaGetErrorString(code).decode(errors="replace")
    return count.value, ""


def cuda_unavailable(index: int = 0) -> str:
    """Why the CUDA provider cannot run on GPU ``index`` here ("" when it can)."""
    if CUDA_PROVIDER not in ort.get_available_providers():
        return f"this onnxruntime build has no {CUDA_PROVIDER}"
    missing = _missing_libraries()
    if missing and hasattr(ort, "preload_dlls"):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:  # CUDA and cuDNN installed as pip packages (nvidia-*); quiet when absent
                ort.preload_dlls()
            except Exception:  # noqa: BLE001 - any failure just leaves the libraries missing
                pass
        missing = _missing_libraries()
    if missing:
        return "CUDA libraries not found: " + ", ".join(missing)
    count, error = _gpu_count()
    if count == 0:
        return f"no CUDA GPU visible ({error or 'none found'})"
    if index >= count:
        return f"GPU {index} asked for, but {count} visible"
    return ""


def resolve_device(text: str = "auto", intra_threads: int = 0) -> Device:
    """The :class:`Device` for ``--device``; ``cuda`` that cannot run raises with the reason."""
    if intra_threads < 0:
        raise SpecserveError(f"--threads must be >= 0, got {intra_threads}")
    kind, index = parse_device(text)
    if kind == "cpu":
        return Device("cpu", 0, intra_threads)
    reason = cuda_unavailable(index or 0)
    if kind == "cuda":
        if reason:
            raise SpecserveError(f"--device {text}: the CUDA provider cannot run here: {reason}")
        return Device("cuda", index or 0, intra_threads)
    if reason:
        return Device("cpu", 0, intra_threads, note=f"CUDA not used: {reason}")
    return Device("cuda", 0, intra_threads)


def session_runs_on(session: ort.InferenceSession, device: Device) -> str:
    """"" when ``session`` runs on ``device``'s provider, else why not (ORT's silent fallback)."""
    if device.kind == "cuda" and session.get_providers()[0] != CUDA_PROVIDER:
        return f"asked for {device.name} but ONNX Runtime fell back to {session.get_providers()[0]}"
    return ""


def run_bound(session: ort.InferenceSession, inputs: dict[str, np.ndarray], output_names: list[str],
              device: tuple[str, int]) -> list[np.ndarray]:
    """One session run with IO binding on ``device`` ("cuda", index): each input is copied to the
    device once, ORT allocates the outputs there and copies them back in one step. Tiny inputs
    (``n_samples``, ``seed``) stay on the host, where ORT's shape kernels read them anyway."""
    kind, index = device
    binding = session.io_binding()
    for name, array in inputs.items():
        where = (kind, index) if array.size > 16 else ("cpu", 0)
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), *where))
    for name in output_names:
        binding.bind_output(name, kind, index)
    session.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()
