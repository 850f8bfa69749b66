"""Loading a model repository (Triton layout) into ONNX Runtime sessions.

A model folder ``<repo>/<name>/`` holds numbered version folders with a ``model.onnx`` each; the
highest version that loads and matches its contract is served. A model that fails to load is kept
in the listing as not ready, with the reason, and never takes the others down.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import metrics
from .contract import ModelCard, fill_defaults
from .errors import ContractError, ModelNotFoundError, ModelNotReadyError
from .providers import Device, session_runs_on

log = logging.getLogger(__name__)

_RNG = np.random.default_rng()
"""Seeds of MC-dropout runs: fresh OS entropy per process, a new draw per run."""


class ModelStats:
    """Counters of one loaded model version, in the KServe ``ModelStatistics`` sense: requests that
    succeeded or failed (count and total ns), session runs (executions), inferences (batch rows),
    compute time per batch size, and the time of the last inference. Thread-safe. Every record also
    goes to the Prometheus metrics of model ``name``."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self._lock = threading.Lock()
        self.success = [0, 0]
        self.fail = [0, 0]
        self.compute = [0, 0]
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self.batches: dict[int, list[int]] = {}

    def record(self, ok: bool, total_ns: int, batch: int = 0, compute_ns: int = 0) -> None:
        metrics.observe_run(self.name, ok, total_ns * 1e-9, batch, compute_ns * 1e-9)
        with self._lock:
            target = self.success if ok else self.fail
            target[0] += 1
            target[1] += total_ns
            if ok:
                self.inference_count += batch
                self.execution_count += 1
                self.compute[0] += 1
                self.compute[1] += compute_ns
                entry = self.batches.setdefault(batch, [0, 0])
                entry[0] += 1
                entry[1] += compute_ns
                self.last_inference_ms = int(time.time() * 1000)

    def snapshot(self) -> dict:
        with self._lock:
            return {"success": tuple(self.success), "fail": tuple(self.fail), "compute": tuple(self.compute),
                    "inference_count": self.inference_count, "execution_count": self.execution_count,
                    "last_inference_ms": self.last_inference_ms,
                    "batches": {k: tuple(v) for k, v in sorted(self.batches.items())}}


@dataclass
class LoadedModel:
    name: str
    version: str
    path: Path | None
    card: ModelCard | None = None
    session: ort.InferenceSession | None = None
    reason: str = ""
    stats: ModelStats = field(init=False)
    newer_failure: tuple[str, str] | None = None
    """(version, reason) of the newest version on disk when it did not load and this older one did."""

    def __post_init__(self) -> None:
        self.stats = ModelStats(self.name)

    @property
    def ready(self) -> bool:
        return self.session is not None

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate ``inputs`` against the contract and run the session (counted in ``stats``)."""
        if not self.ready:
            raise ModelNotReadyError(f"model {self.name!r} is not ready: {self.reason}")
        t0 = time.perf_counter_ns()
        contract = self.card.contract
        try:
            checked = contract.validate_inputs(fill_defaults(self.card, inputs, _RNG), self.card.dims)
            t1 = time.perf_counter_ns()
            outputs = self.session.run(contract.output_names, checked)
        except Exception:
            self.stats.record(False, time.perf_counter_ns() - t0)
            raise
        t2 = time.perf_counter_ns()
        batch = int(checked[contract.inputs[0].name].shape[0]) if contract.inputs else 0
        self.stats.record(True, t2 - t0, batch, t2 - t1)
        return dict(zip(contract.output_names, outputs))


def session_options(intra_threads: int | None = None) -> ort.SessionOptions:
    """CPU session options with ``intra_threads`` threads (default: the host's cores, at most 4)."""
    return Device("cpu", intra_threads=intra_threads or 0).session_options()


def load_model_file(name: str, version: str, path: Path, device: Device | None = None,
                    n_models: int = 1) -> LoadedModel:
    """Load one ``model.onnx`` on ``device`` (default the CPU); failures come back as a not-ready
    model with the reason."""
    device = device or Device()
    model = LoadedModel(name, version, path)
    try:
        session = ort.InferenceSession(str(path), sess_options=device.session_options(n_models),
                                       providers=device.providers())
        fallback = session_runs_on(session, device)
        if fallback:
            raise ContractError(fallback)
        card = ModelCard.from_metadata_props(session.get_modelmeta().custom_metadata_map)
        card.contract.validate_session(session, card.dims)
    except ContractError as exc:
        model.reason = str(exc)
    except Exception as exc:  # onnxruntime raises its own types for corrupt files
        model.reason = f"cannot load {path}: {type(exc).__name__}: {exc}"
    else:
        model.card, model.session = card, session
    if not model.ready:
        log.warning("model %s version %s not ready: %s", name, version, model.reason)
    return model


def model_versions(model_dir: Path) -> list[int]:
    """The numbered version folders of a model, newest first."""
    return sorted((int(v.name) for v in model_dir.iterdir() if v.is_dir() and v.name.isdigit()), reverse=True)


def load_model_dir(model_dir: Path, device: Device | None = None, n_models: int = 1) -> LoadedModel:
    """A model folder's newest version that loads, or (none loading) the newest, not ready, with its reason."""
    newest: LoadedModel | None = None
    for version in model_versions(model_dir):
        candidate = load_model_file(model_dir.name, str(version), model_dir / str(version) / "model.onnx",
                                    device, n_models)
        if candidate.ready:
            if newest is not None:
                candidate.newer_failure = (newest.version, newest.reason)
            return candidate
        newest = newest or candidate
    return newest or LoadedModel(model_dir.name, "", None, reason="no numbered version folder")


def model_folders(repo: Path) -> list[Path]:
    return sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_repository(repo: str | Path, device: Device | None = None) -> dict[str, LoadedModel]:
    """Every model folder under ``repo``: its newest loadable version, or not ready with a reason.
    On the CPU the host's cores are shared among the models (:meth:`Device.threads_per_session`)."""
    repo = Path(repo)
    if not repo.is_dir():
        raise ModelNotFoundError(f"model repository {repo} does not exist "
                                 "(`specserve models build` builds the default one)")
    folders = model_folders(repo)
    return {d.name: load_model_dir(d, device, len(folders)) for d in folders}


def folder_signature(model_dir: Path) -> tuple:
    """What a change of a model folder changes: its versions' model files, sizes and mtimes."""
    entries = []
    for version in model_versions(model_dir):
        path = model_dir / str(version) / "model.onnx"
        try:
            st = path.stat()
        except OSError:
            entries.append((version, None))
            continue
        entries.append((version, st.st_size, st.st_mtime_ns))
    return tuple(entries)
