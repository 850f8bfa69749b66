"""Loading a model repository (Triton layout) into ONNX Runtime sessions.

A model folder ``<repo>/<name>/`` holds numbered version folders with a ``model.onnx`` each; the
highest version that loads and matches its contract is served. A model that fails to load is kept
in the listing as not ready, with the reason, and never takes the others down.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .contract import ModelCard, fill_defaults
from .errors import ContractError, ModelNotFoundError, ModelNotReadyError

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

    @property
    def ready(self) -> bool:
        return self.session is not None

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate ``inputs`` against the contract and run the session."""
        if not self.ready:
            raise ModelNotReadyError(f"model {self.name!r} is not ready: {self.reason}")
        contract = self.card.contract
        checked = contract.validate_inputs(fill_defaults(self.card, inputs, _RNG), self.card.dims)
        outputs = self.session.run(contract.output_names, checked)
        return dict(zip(contract.output_names, outputs))


def session_options(intra_threads: int | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_threads or max(1, min(4, os.cpu_count() or 1))
    options.inter_op_num_threads = 1
    return options


def load_model_file(name: str, version: str, path: Path, providers: list[str] | None = None) -> LoadedModel:
    """Load one ``model.onnx``; failures come back as a not-ready model with the reason."""
    model = LoadedModel(name, version, path)
    try:
        session = ort.InferenceSession(str(path), sess_options=session_options(),
                                       providers=providers or ["CPUExecutionProvider"])
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


def load_repository(repo: str | Path, providers: list[str] | None = None) -> dict[str, LoadedModel]:
    """Every model folder under ``repo``: its newest loadable version, or not ready with a reason."""
    repo = Path(repo)
    if not repo.is_dir():
        raise ModelNotFoundError(f"model repository {repo} does not exist "
                                 "(`specserve models build` builds the default one)")
    models: dict[str, LoadedModel] = {}
    for model_dir in sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")):
        versions = sorted((int(v.name) for v in model_dir.iterdir() if v.is_dir() and v.name.isdigit()), reverse=True)
        chosen: LoadedModel | None = None
        for version in versions:
            path = model_dir / str(version) / "model.onnx"
            candidate = load_model_file(model_dir.name, str(version), path, providers)
            if candidate.ready:
                chosen = candidate
                break
            chosen = chosen or candidate
        models[model_dir.name] = chosen or LoadedModel(model_dir.name, "", None, reason="no numbered version folder")
    return models
