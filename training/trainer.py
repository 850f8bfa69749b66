"""One generic training loop (minGPT style): no model-specific code.

A :class:`Trainer` owns a model and a run directory. Training is a sequence of :class:`Phase` s
(for the RBM: contrastive-divergence pretraining, then discriminative fine-tuning); each phase
brings its optimizer, a function producing the batches of an epoch, a loss function
``loss(model, batch) -> (scalar tensor, {name: float})`` and optionally a validation function
``validate(model) -> {name: float}`` with the metric (``monitor``) that selects the best model.

The run directory receives:

- ``config.json``: the resolved run configuration (written once, by the constructor);
- ``metrics.jsonl``: one JSON object per epoch (phase, epoch, global step, elapsed seconds,
  mean training metrics as ``train/<name>``, validation metrics as ``val/<name>``, ``best``);
- ``checkpoint.pt``: ``model_kind``, ``model_config``, ``state_dict``, ``step``, ``epoch``,
  ``phase``, ``best`` (metric name, value, mode) and the run ``config``, enough to rebuild the
  model from the file alone. With a monitor it holds the best epoch on validation (and the model
  is set back to it at the end of the phase); without one, the last epoch.

Progress: a tqdm bar per phase on a terminal and one ``logging`` line every ``log_every`` epochs.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"

LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, Mapping[str, float]]]
Callback = Callable[["Trainer", dict[str, Any]], None]


def seed_everything(seed: int) -> None:
    """Seed Python, numpy's global generator and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Phase:
    """One stage of training; see the module docstring."""

    name: str
    epochs: int
    optimizer: torch.optim.Optimizer
    batches: Callable[[int], Iterable[Any]]
    """epoch index -> the batches of that epoch."""
    loss: LossFn
    validate: Callable[[nn.Module], Mapping[str, float]] | None = None
    monitor: str | None = None
    """Key of ``validate``'s result that selects the best epoch; None keeps the last epoch."""
    mode: str = "min"
    grad_clip: float | None = None
    scheduler: Any = None
    """A ``torch.optim.lr_scheduler`` stepped after every optimiser step, or None."""

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"Phase.mode must be 'min' or 'max', got {self.mode!r}")
        if self.monitor is not None and self.validate is None:
            raise ValueError(f"phase {self.name!r}: a monitor needs a validate function")


class Trainer:
    """Runs phases on ``model``, writing config, metrics and checkpoints into ``run_dir``."""

    def __init__(self, model: nn.Module, run_dir: str | Path, config: Mapping[str, Any], *,
                 model_kind: str, model_config: Mapping[str, Any], seed: int = 0,
                 log_every: int = 1, callbacks: Sequence[Callback] = (), progress: bool | None = None):
        self.model = model
        self.run_dir = Path(run_dir)
        self.config = dict(config)
        self.model_kind = model_kind
        self.model_config = dict(model_config)
        self.log_every = max(1, int(log_every))
        self.callbacks = list(callbacks)
        self.progress = progress  # None: a bar only on a terminal
        self.step = 0
        self.history: list[dict[str, Any]] = []
        seed_everything(seed)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / CONFIG_NAME).write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        (self.run_dir / METRICS_NAME).write_text("")
        self._start = time.perf_counter()

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT_NAME

    def fit(self, phase: Phase) -> dict[str, Any]:
        """Train ``phase.epochs`` epochs; returns {"metric", "value", "epoch"} of the kept model."""
        best_value, best_epoch, best_state = math.inf if phase.mode == "min" else -math.inf, -1, None
        sign = 1.0 if phase.mode == "min" else -1.0
        bar = tqdm(range(phase.epochs), desc=phase.name, unit="epoch", leave=False,
                   disable=(not self.progress) if self.progress is not None else None)
        for epoch in bar:
            self.model.train()
            sums: dict[str, float] = {}
            n_batches = 0
            for batch in phase.batches(epoch):
                loss, metrics = phase.loss(self.model, batch)
                phase.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if phase.grad_clip is not None:
                    nn.utils.clip_grad_norm_(self.model.parameters(), phase.grad_clip)
                phase.optimizer.step()
                if phase.scheduler is not None:
                    phase.scheduler.step()
                self.step += 1
                n_batches += 1
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
            record: dict[str, Any] = {"phase": phase.name, "epoch": epoch, "step": self.step,
                                      "time_s": round(time.perf_counter() - self._start, 3)}
            record.update({f"train/{k}": v / max(n_batches, 1) for k, v in sums.items()})
            if phase.validate is not None:
                self.model.eval()
                with torch.no_grad():
                    record.update({f"val/{k}": float(v) for k, v in phase.validate(self.model).items()})
                self.model.train()
            improved = False
            if phase.monitor is not None:
                value = record[f"val/{phase.monitor}"]
                improved = sign * value < sign * best_value
                if improved:
                    best_value, best_epoch = value, epoch
                    best_state = copy.deepcopy(self.model.state_dict())
                    self.save_checkpoint(phase, epoch, {"metric": phase.monitor, "value": value, "mode": phase.mode})
            record["best"] = improved
            self._log(record, bar)
        if phase.monitor is None:
            last = phase.epochs - 1
            self.save_checkpoint(phase, last, {"metric": None, "value": None, "mode": None})
            return {"metric": None, "value": None, "epoch": last}
        if best_state is not None:
            self.model.load_state_dict(best_state)
            log.info("%s: kept epoch %d (val/%s %.5g)", phase.name, best_epoch, phase.monitor, best_value)
        self.model.eval()
        return {"metric": phase.monitor, "value": best_value, "epoch": best_epoch}

    def save_checkpoint(self, phase: Phase, epoch: int, best: Mapping[str, Any]) -> Path:
        state = {
            "model_kind": self.model_kind,
            "model_config": self.model_config,
            "state_dict": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "step": self.step,
            "epoch": epoch,
            "phase": phase.name,
            "best": dict(best),
            "config": self.config,
        }
        tmp = self.checkpoint_path.with_suffix(".pt.tmp")
        torch.save(state, tmp)
        tmp.replace(self.checkpoint_path)
        return self.checkpoint_path

    def _log(self, record: dict[str, Any], bar: Any) -> None:
        self.history.append(record)
        with (self.run_dir / METRICS_NAME).open("a") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
        terse = {k.split("/", 1)[0][0] + "/" + k.split("/", 1)[1]: v for k, v in record.items() if "/" in k}
        bar.set_postfix({k: f"{v:.4g}" for k, v in terse.items()}, refresh=False)
        if record["epoch"] % self.log_every == 0 or record["best"]:
            metrics = " ".join(f"{k} {v:.4g}" for k, v in terse.items())
            log.info("%s epoch %d step %d %.1fs %s%s", record["phase"], record["epoch"], record["step"],
                     record["time_s"], metrics, " *" if record["best"] else "")
        for callback in self.callbacks:
            callback(self, record)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :class:`Trainer` (tensors and plain Python values only)."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)


def update_checkpoint(path: str | Path, model: nn.Module, **extra: Any) -> None:
    """Rewrite a checkpoint with ``model``'s current state (e.g. after post-training calibration)
    and extra top-level entries; the rest (step, epoch, best, config) is kept."""
    state = load_checkpoint(path)
    state["state_dict"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    state.update(extra)
    tmp = Path(path).with_suffix(".pt.tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def run_config(kind: str, model_config: Mapping[str, Any], bench: Any, train: np.ndarray, n_validation: int,
               subset: bool, run_info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``config.json`` of a run on a benchmark set: model, data (set, hash, sizes, recipe and,
    for a subset of the train split, its indices), torch version and threads, and ``run_info``."""
    return {
        "model_kind": kind,
        "model_config": dict(model_config),
        "data": {
            "benchmark": bench.name, "content_hash": bench.meta.get("content_hash"),
            "n_train": int(train.size), "n_validation": int(n_validation),
            "preprocessing": bench.meta.get("preprocessing"),
            "train_indices": [int(i) for i in train] if subset else None,
        },
        "torch": {"version": str(torch.__version__), "threads": torch.get_num_threads()},
        **dict(run_info or {}),
    }


def warmup_cosine(optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int,
                  warmup_epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step learning rate: linear warm-up over ``warmup_epochs``, then cosine decay to 0."""
    total = max(1, epochs * steps_per_epoch)
    warmup = max(1, warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total)))
