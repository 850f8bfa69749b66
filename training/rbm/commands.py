"""``specserve train rbm`` and ``specserve eval rbm``.

- ``specserve train rbm [--out RUN_DIR] [--cache DIR] [--set KEY=VALUE ...] [--quick]``: train the
  RBM classifier on the ``cv`` set (:func:`specserve.training.rbm.train.train_rbm`), evaluate it
  (``report.json`` and ``report.png``, :mod:`specserve.training.rbm.evaluate`), print the run
  folder and the headline numbers. ``--set`` overrides any
  :class:`~specserve.training.rbm.model.RBMConfig` field.
- ``specserve eval rbm --run RUN_DIR [--cache DIR]``: re-evaluate the run's ``checkpoint.pt``.

Importing this module imports neither torch, scikit-learn nor matplotlib; the handlers do.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from specserve.runtime.errors import SpecserveError
from specserve.training.common import (
    DEFAULT_THREADS,
    REPORT_JSON,
    add_eval_command,
    add_train_command,
    config_with_overrides,
    default_run_dir,
    load_cv,
    quick_indices,
    require_training_extra,
)

log = logging.getLogger(__name__)

QUICK_OVERRIDES = {"cd_epochs": 2, "finetune_epochs": 3}
QUICK_TRAIN_SPECTRA = 300


def register(train_sub: argparse._SubParsersAction, eval_sub: argparse._SubParsersAction) -> None:
    """Add ``train rbm`` and ``eval rbm`` (handler in ``handler``)."""
    quick = f"{QUICK_TRAIN_SPECTRA} training spectra, " + ", ".join(f"{k}={v}" for k, v in QUICK_OVERRIDES.items())
    add_train_command(train_sub, "rbm", "train and evaluate the RBM CV classifier on the 'cv' set", "RBMConfig",
                      quick, cmd_train_rbm)
    add_eval_command(eval_sub, "rbm", "re-evaluate an RBM run's checkpoint on the 'cv' set", cmd_eval_rbm)


def headline(report: Mapping[str, Any]) -> str:
    """A few lines with the report's main numbers."""
    levels = report["snr_levels"]

    def fmt(v: float | None) -> str:
        return "  n/a " if v is None else f"{v:.4f}"

    lines = [f"{'model':22s} {'accuracy':>8s} {'recall':>7s} {'precis.':>7s} {'FPR real':>8s}  "
             f"accuracy at S/N {'/'.join(levels)}"]
    for name, m in [("rbm", report["rbm"])] + list(report["baselines"].items()):
        accs = " ".join(fmt(m["accuracy_vs_snr"][s]) for s in levels)
        lines.append(f"{name:22s} {fmt(m['accuracy']):>8s} {fmt(m['cv_recall']):>7s} {fmt(m['cv_precision']):>7s} "
                     f"{fmt(m['fpr_real_non_cv']):>8s}  {accs}")
    t = report["target"]
    lines.append(f"target (accuracy >= {t['min_accuracy_at_snr_ge_20']:.0%} at S/N >= 20, FPR real non-CV <= "
                 f"{t['max_fpr_real_non_cv']:.0%}): {'met' if t['met'] else 'NOT met'} "
                 f"(min accuracy {t['measured_min_accuracy']:.4f}, max FPR {t['measured_max_fpr_real_non_cv']:.4f} "
                 f"over {', '.join(t['checked_at'])})")
    return "\n".join(lines)


def cmd_train_rbm(args: argparse.Namespace) -> int:
    require_training_extra(getattr(args, "threads", DEFAULT_THREADS))
    from specserve.training.rbm.evaluate import EvalConfig, evaluate_rbm
    from specserve.training.rbm.model import RBMConfig
    from specserve.training.rbm.train import train_rbm

    overrides = {k: str(v) for k, v in QUICK_OVERRIDES.items()} if args.quick else {}
    overrides.update(dict(args.overrides))
    config = config_with_overrides(overrides, RBMConfig())
    run_dir = args.out if args.out is not None else default_run_dir("rbm")
    bench = load_cv(args.cache)
    train_indices = None
    if args.quick:
        train_indices = quick_indices(bench, QUICK_TRAIN_SPECTRA, config.seed)
    t0 = time.perf_counter()
    model, trainer = train_rbm(config, run_dir, bench, train_indices=train_indices,
                               run_info={"quick": bool(args.quick), "cache": str(args.cache) if args.cache else None})
    train_s = time.perf_counter() - t0
    eval_config = EvalConfig(bernoulli_iter=5) if args.quick else EvalConfig()
    report = evaluate_rbm(model, bench, run_dir, eval_config, train_indices=train_indices,
                          extra={"training": {"wall_s": round(train_s, 2), "steps": trainer.step,
                                              "checkpoint": trainer.checkpoint_path.name}})
    print(f"run folder: {run_dir}")
    print(f"trained in {train_s:.1f} s ({trainer.step} steps); evaluated in {report['timing_s']['evaluation']:.1f} s; "
          f"report: {Path(run_dir) / REPORT_JSON}")
    print(headline(report))
    return 0


def cmd_eval_rbm(args: argparse.Namespace) -> int:
    require_training_extra(getattr(args, "threads", DEFAULT_THREADS))
    from specserve.training.rbm.evaluate import EvalConfig, evaluate_rbm
    from specserve.training.rbm.model import RBMClassifier
    from specserve.training.trainer import CHECKPOINT_NAME, load_checkpoint

    path = Path(args.run) / CHECKPOINT_NAME
    if not path.is_file():
        raise SpecserveError(f"no {CHECKPOINT_NAME} in {args.run}")
    checkpoint = load_checkpoint(path)
    if checkpoint.get("model_kind") != "rbm":
        raise SpecserveError(f"{path} holds a {checkpoint.get('model_kind')!r} model, not an RBM")
    model = RBMClassifier.from_checkpoint(checkpoint)
    bench = load_cv(args.cache)
    data = checkpoint.get("config", {}).get("data", {})
    if data.get("content_hash") and data["content_hash"] != bench.meta.get("content_hash"):
        log.warning("the cached 'cv' set differs from the one this run was trained on")
    indices = data.get("train_indices")
    quick = bool(checkpoint.get("config", {}).get("quick"))
    report = evaluate_rbm(model, bench, args.run, EvalConfig(bernoulli_iter=5) if quick else EvalConfig(),
                          train_indices=None if indices is None else np.asarray(indices),
                          extra={"checkpoint": {"step": checkpoint.get("step"), "phase": checkpoint.get("phase"),
                                                "epoch": checkpoint.get("epoch"), "best": checkpoint.get("best")}})
    print(f"run folder: {args.run}; report: {Path(args.run) / REPORT_JSON}")
    print(headline(report))
    return 0
