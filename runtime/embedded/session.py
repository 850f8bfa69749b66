"""One model version in an ONNX Runtime session, and a repository folder of them: what the
embedded runtime runs in-process, and what the engine wraps with batching, statistics and the
repository's config.

A model folder ``<repo>/<name>/`` holds numbered version folders with a ``model.onnx`` each
(:mod:`specserve.runtime.layout`); the newest version that loads and matches its contract is
used. A model that fails to load is kept as not ready, with the reason, and never takes the others
down. Needs numpy and onnxruntime only.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnxruntime as ort

from specserve.runtime.contract import ModelCard, fill_defaults
from specserve.runtime.embedded.providers import Device, run_bound, session_runs_on
from specserve.runtime.errors import ContractError, ModelNotFoundError, ModelNotReadyError
from specserve.runtime.layout import model_folders, model_versions, version_file

log = logging.getLogger(__name__)

_RNG = np.random.default_rng()
"""Seeds of MC-dropout runs: fresh OS entropy per process, a new draw per run."""


@dataclass
class SessionModel:
    """A model version: its card and session when ready, else the reason it is not."""

    name: str
    version: str
    path: Path | None
    card: ModelCard | None = None
    session: ort.InferenceSession | None = None
    reason: str = ""
    io_binding: tuple[str, int] | None = None
    """Device ("cuda", index) the session's inputs and outputs are bound to; None: plain ``session.run``."""
    newer_failure: tuple[str, str] | None = None
    """(version, reason) of the newest version on disk when it did not load and this older one did."""

    @property
    def ready(self) -> bool:
        return self.session is not None

    def require_ready(self) -> "SessionModel":
        """This model, or ModelNotReadyError with the reason it is not ready."""
        if not self.ready:
            raise ModelNotReadyError(f"model {self.name!r} is not ready: {self.reason}")
        return self

    def prepare(self, inputs: Mapping[str, np.ndarray], finite: bool = True) -> dict[str, np.ndarray]:
        """``inputs`` with the optional ones filled in, checked against the contract (raises
        InvalidInputError naming the problem, ModelNotReadyError for a model not loaded);
        ``finite`` False: the batched inputs' values are left to ``ModelContract.check_finite``."""
        self.require_ready()
        return self._contract.validate_inputs(fill_defaults(self.card, inputs, _RNG), self._dims, finite)

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

    def shrink_arena(self) -> None:
        """Give back the CPU memory arena's chunks that no run is using: one one-row run with
        ONNX Runtime's ``memory.enable_memory_arena_shrinkage`` option (runs keep their speed,
        the arena is regrown by the next burst). Nothing for a model not loaded or without arena."""
        if self.session is None:
            return
        options = ort.RunOptions()
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        feed = self.prepare(self._contract.dummy_inputs(self._dims, batch=1))
        self.session.run(self._contract.output_names, feed, options)

    def run(self, inputs: Mapping[str, np.ndarray], deadline: float | None = None) -> dict[str, np.ndarray]:
        """Check ``inputs`` against the contract and run them (``deadline`` is for the engine's
        queue; an in-process run starts at once)."""
        return self.execute(self.prepare(inputs))


M = TypeVar("M", bound=SessionModel)


def lookup(models: Mapping[str, M], name: str, version: str = "", ready: bool = True) -> M:
    """The one lookup of a model by name (and version, "" for the loaded one): ModelNotFoundError
    for an unknown name or version, ModelNotReadyError (with the reason) when ``ready`` is asked."""
    model = models.get(name)
    if model is None:
        raise ModelNotFoundError(f"unknown model {name!r} (available: {', '.join(sorted(models))})")
    if version and version != model.version:
        raise ModelNotFoundError(f"model {name!r} has no loaded version {version!r} (serving {model.version!r})")
    return model.require_ready() if ready else model


def load_model_file(name: str, version: str, path: Path, device: Device | None = None, n_models: int = 1,
                    kind: type[M] = SessionModel) -> M:
    """Load one ``model.onnx`` on ``device`` (default the CPU) as a ``kind``; failures come back
    as a not-ready model with the reason."""
    device = device or Device()
    model = kind(name, version, path)
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
        if device.kind == "cuda":
            model.io_binding = ("cuda", device.index)
    if not model.ready:
        log.warning("model %s version %s not ready: %s", name, version, model.reason)
    return model


def load_model_dir(model_dir: Path, device: Device | None = None, n_models: int = 1, load=load_model_file,
                   kind: type[M] = SessionModel) -> M:
    """A model folder's newest version that ``load`` (:func:`load_model_file` or the engine's) makes
    ready, or (none loading) the newest, not ready, with its reason."""
    newest = None
    for version in model_versions(model_dir):
        candidate = load(model_dir.name, str(version), version_file(model_dir, version), device, n_models)
        if candidate.ready:
            if newest is not None:
                candidate.newer_failure = (newest.version, newest.reason)
            return candidate
        newest = newest or candidate
    return newest or kind(model_dir.name, "", None, reason="no numbered version folder")


def load_repository(repo: str | Path, device: Device | None = None, load=load_model_file,
                    kind: type[M] = SessionModel) -> dict[str, M]:
    """Every model folder under ``repo``: its newest loadable version, or not ready with a reason.
    On the CPU the host's cores are shared among the models (:meth:`Device.threads_per_session`)."""
    repo = Path(repo)
    if not repo.is_dir():
        raise ModelNotFoundError(f"model repository {repo} does not exist "
                                 "(`specserve models build` builds the default one)")
    folders = model_folders(repo)
    return {d.name: load_model_dir(d, device, len(folders), load, kind) for d in folders}
