"""Loading a model repository (Triton layout) into ONNX Runtime sessions.

A model folder ``<repo>/<name>/`` holds numbered version folders with a ``model.onnx`` each; the
highest version that loads and matches its contract is served. A model that fails to load is kept
in the listing as not ready, with the reason, and never takes the others down.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from specserve.runtime.contract import ModelCard, fill_defaults
from specserve.runtime.engine.batching import Batcher, BatchingConfig, Runner
from specserve.runtime.engine.layout import (
    ModelConfig,
    batching_config,
    check_config,
    model_config,
    model_folders,
    model_versions,
    read_config,
    version_file,
)
from specserve.runtime.engine.providers import Device, run_bound, session_runs_on
from specserve.runtime.engine.stats import ModelStats
from specserve.runtime.errors import ContractError, ModelNotFoundError, ModelNotReadyError

log = logging.getLogger(__name__)

_RNG = np.random.default_rng()
"""Seeds of MC-dropout runs: fresh OS entropy per process, a new draw per run."""


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
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    config: ModelConfig | None = None
    """The model's config.pbtxt as Triton parses it (generated from the card when the folder has none)."""
    batcher: Batcher | None = None
    workers: int = 1
    """Session runs at once when batching (the batcher's default worker count)."""
    io_binding: tuple[str, int] | None = None
    """Device ("cuda", index) the session's inputs and outputs are bound to; None: plain ``session.run``."""

    def __post_init__(self) -> None:
        self.stats = ModelStats(self.name)

    @property
    def ready(self) -> bool:
        return self.session is not None

    def require_ready(self) -> "LoadedModel":
        """This model, or ModelNotReadyError with the reason it is not ready."""
        if not self.ready:
            raise ModelNotReadyError(f"model {self.name!r} is not ready: {self.reason}")
        return self

    def prepare(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``inputs`` with the optional ones filled in, checked against the contract (raises
        InvalidInputError naming the problem, ModelNotReadyError for a model not loaded)."""
        self.require_ready()
        return self._contract.validate_inputs(fill_defaults(self.card, inputs, _RNG), self._dims)

    @functools.cached_property
    def _contract(self):
        return self.card.contract

    @functools.cached_property
    def _dims(self) -> dict[str, int]:
        return self.card.dims

    def execute(self, checked: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One session run on prepared inputs: the outputs by name (IO binding on CUDA)."""
        names = self._contract.output_names
        if self.io_binding:
            return dict(zip(names, run_bound(self.session, checked, names, self.io_binding)))
        return dict(zip(names, self.session.run(names, checked)))

    def run(self, inputs: Mapping[str, np.ndarray], deadline: float | None = None) -> dict[str, np.ndarray]:
        """Validate ``inputs`` against the contract and run them (through the batcher when the
        model has one); counted in ``stats``."""
        if self.batcher is not None:
            return self.batcher.submit(dict(inputs), deadline).result()
        return self._run_now(inputs)

    def _run_now(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter_ns()
        try:
            checked = self.prepare(inputs)
            t1 = time.perf_counter_ns()
            outputs = self.execute(checked)
        except Exception:
            self.stats.record_request(False, time.perf_counter_ns() - t0)
            raise
        t2 = time.perf_counter_ns()
        batch = int(checked[self._contract.inputs[0].name].shape[0])
        self.stats.record_execution(batch, t2 - t1)
        self.stats.record_request(True, t2 - t0, 0, batch)
        return outputs

    def start_batching(self) -> None:
        """Give this (ready) model its batcher, configured from its folder's config.pbtxt."""
        if self.ready and self.batcher is None:
            runner = Runner(self.name, self.version, self._contract, self.prepare, self.execute, self.stats)
            self.batcher = Batcher(runner, self.batching, self.workers)

    def stop_batching(self, timeout: float | None = None) -> None:
        """Close the batcher: nothing new is accepted, everything queued is answered."""
        if self.batcher is not None:
            self.batcher.close(timeout=timeout)


def lookup(models: Mapping[str, LoadedModel], name: str, version: str = "", ready: bool = True) -> LoadedModel:
    """The one lookup of a model by name (and version, "" for the loaded one): ModelNotFoundError
    for an unknown name or version, ModelNotReadyError (with the reason) when ``ready`` is asked."""
    model = models.get(name)
    if model is None:
        raise ModelNotFoundError(f"unknown model {name!r} (available: {', '.join(sorted(models))})")
    if version and version != model.version:
        raise ModelNotFoundError(f"model {name!r} has no loaded version {version!r} (serving {model.version!r})")
    return model.require_ready() if ready else model


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
        try:
            config = read_config(path.parent.parent)
            if config is not None:
                check_config(config, name, card)
            model.batching = batching_config(config)
        except ContractError as exc:
            model.reason = str(exc)
        else:
            model.card, model.session = card, session
            model.config = config if config is not None else model_config(name, card)
    if model.ready:
        if device.kind == "cuda":
            model.io_binding = ("cuda", device.index)
        else:  # single-threaded sessions on a many-core host: several runs at once
            model.workers = max(1, (os.cpu_count() or 1) // device.threads_per_session(n_models))
    if not model.ready:
        log.warning("model %s version %s not ready: %s", name, version, model.reason)
    return model


def load_model_dir(model_dir: Path, device: Device | None = None, n_models: int = 1) -> LoadedModel:
    """A model folder's newest version that loads, or (none loading) the newest, not ready, with its reason."""
    newest: LoadedModel | None = None
    for version in model_versions(model_dir):
        candidate = load_model_file(model_dir.name, str(version), version_file(model_dir, version),
                                    device, n_models)
        if candidate.ready:
            if newest is not None:
                candidate.newer_failure = (newest.version, newest.reason)
            return candidate
        newest = newest or candidate
    return newest or LoadedModel(model_dir.name, "", None, reason="no numbered version folder")


def load_repository(repo: str | Path, device: Device | None = None) -> dict[str, LoadedModel]:
    """Every model folder under ``repo``: its newest loadable version, or not ready with a reason.
    On the CPU the host's cores are shared among the models (:meth:`Device.threads_per_session`)."""
    repo = Path(repo)
    if not repo.is_dir():
        raise ModelNotFoundError(f"model repository {repo} does not exist "
                                 "(`specserve models build` builds the default one)")
    folders = model_folders(repo)
    return {d.name: load_model_dir(d, device, len(folders)) for d in folders}
