"""The engine's models: a session model (:mod:`specserve.runtime.embedded.session`) with its
``config.pbtxt`` as Triton reads it, its batcher and its statistics.

A model folder's config is read with every version that loads; a config Triton would reject makes
the model not ready with the parse error as the reason (:mod:`specserve.runtime.layout`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from specserve.runtime.embedded import session as sessions
from specserve.runtime.embedded.providers import Device
from specserve.runtime.embedded.session import SessionModel, lookup
from specserve.runtime.engine.batching import Batcher, BatchingConfig, Runner, batching_config
from specserve.runtime.engine.memory import RequestMemory
from specserve.runtime.engine.stats import ModelStats
from specserve.runtime.errors import ContractError
from specserve.runtime.layout import check_config, model_config, read_config

__all__ = ["LoadedModel", "load_model_dir", "load_model_file", "load_repository", "lookup", "session_options"]

log = logging.getLogger(__name__)


@dataclass
class LoadedModel(SessionModel):
    stats: ModelStats = field(init=False)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    config: object | None = None
    """The model's config.pbtxt as Triton parses it (a ``ModelConfig``; generated from the card
    when the folder has none)."""
    batcher: Batcher | None = None
    workers: int = 1
    """Session runs at once when batching (the batcher's default worker count)."""

    def __post_init__(self) -> None:
        self.stats = ModelStats(self.name)

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

    def start_batching(self, memory: RequestMemory | None = None) -> None:
        """Give this (ready) model its batcher, configured from its folder's config.pbtxt; its
        queued requests count in ``memory`` (the server's budget) when given."""
        if self.ready and self.batcher is None:
            runner = Runner(self.name, self.version, self._contract, self.prepare, self.execute, self.stats)
            self.batcher = Batcher(runner, self.batching, self.workers, memory)

    def stop_batching(self, timeout: float | None = None) -> None:
        """Close the batcher: nothing new is accepted, everything queued is answered."""
        if self.batcher is not None:
            self.batcher.close(timeout=timeout)


def session_options(intra_threads: int | None = None):
    """CPU session options with ``intra_threads`` threads (default: the host's cores, at most 4)."""
    return Device("cpu", intra_threads=intra_threads or 0).session_options()


def load_model_file(name: str, version: str, path: Path, device: Device | None = None,
                    n_models: int = 1) -> LoadedModel:
    """Load one ``model.onnx`` and its folder's config; failures come back as a not-ready model
    with the reason."""
    device = device or Device()
    model = sessions.load_model_file(name, version, path, device, n_models, kind=LoadedModel)
    if not model.ready:
        return model
    try:
        config = read_config(path.parent.parent)
        if config is not None:
            check_config(config, name, model.card)
        model.batching = batching_config(config)
    except ContractError as exc:
        model.card, model.session, model.reason = None, None, str(exc)
        log.warning("model %s version %s not ready: %s", name, version, model.reason)
        return model
    model.config = config if config is not None else model_config(name, model.card)
    if device.kind != "cuda":  # single-threaded sessions on a many-core host: several runs at once
        model.workers = max(1, (os.cpu_count() or 1) // device.threads_per_session(n_models))
    return model


def load_model_dir(model_dir: Path, device: Device | None = None, n_models: int = 1) -> LoadedModel:
    """A model folder's newest version that loads, or (none loading) the newest, not ready, with its reason."""
    return sessions.load_model_dir(model_dir, device, n_models, load_model_file, LoadedModel)


def load_repository(repo: str | Path, device: Device | None = None) -> dict[str, LoadedModel]:
    """Every model folder under ``repo``: its newest loadable version, or not ready with a reason."""
    return sessions.load_repository(repo, device, load_model_file, LoadedModel)
