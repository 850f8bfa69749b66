"""Command-line glue for the SPT (see :mod:`specserve.training.commands` for the RBM's).

- ``specserve train spt [--out RUN_DIR] [--cache DIR] [--set KEY=VALUE ...] [--quick] [--no-ablations]``:
  train the SPT on the ``giants`` set (:func:`~specserve.training.spt.train.train_spt`), train
  the two ablations (dot-product attention, MSE loss) into ``RUN_DIR/ablations/<name>`` unless
  ``--no-ablations``, evaluate (``report.json``, ``report.png``) and print the table.
- ``specserve eval spt --run RUN_DIR [--cache DIR]``: re-evaluate a run, with the ablations found in
  its folder.

Importing this module imports neither torch nor scikit-learn; the handlers do.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from specserve.runtime.errors import SpecserveError

log = logging.getLogger(__name__)

DEFAULT_THREADS = 2
QUICK_OVERRIDES = {"epochs": 3, "depth": 1, "d_model": 16, "n_heads": 2, "ffn": 32, "head_hidden": 32,
                   "patch_size": 128, "mc_samples": 16}
QUICK_TRAIN_SPECTRA = 200
ABLATIONS_DIR = "ablations"


def register(train_sub: argparse._SubParsersAction, eval_sub: argparse._SubParsersAction) -> None:
    from specserve.training.common import add_eval_command, add_train_command

    cmd = add_train_command(train_sub, "spt", "train and evaluate the SPT (ages, masses) on the 'giants' set",
                            "SPTConfig", f"{QUICK_TRAIN_SPECTRA} training spectra and a tiny network", cmd_train_spt)
    cmd.add_argument("--no-ablations", dest="ablations", action="store_false",
                     help="skip the dot-attention and MSE-loss ablations (their report rows stay empty)")
    add_eval_command(eval_sub, "spt", "re-evaluate an SPT run on the 'giants' set", cmd_eval_spt)


def quick_config(config: Any = None) -> Any:
    from specserve.training.common import config_with_overrides
    from specserve.training.spt.model import SPTConfig

    return config_with_overrides({k: str(v) for k, v in QUICK_OVERRIDES.items()}, config or SPTConfig())


def quick_indices(bench, seed: int) -> np.ndarray:
    from specserve.training.common import quick_indices as sample

    return sample(bench, QUICK_TRAIN_SPECTRA, seed)


def train_ablations(config, run_dir: Path, bench, train_indices: np.ndarray | None = None,
                    run_info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Train every ablation of :data:`~specserve.training.spt.evaluate.ABLATIONS` next to the run."""
    from specserve.training.spt.evaluate import ABLATIONS
    from specserve.training.spt.train import train_spt

    models = {}
    for name, change in ABLATIONS.items():
        t0 = time.perf_counter()
        print(f"training the ablation {name} ({', '.join(f'{k}={v}' for k, v in change.items())})", flush=True)
        models[name], _ = train_spt(dataclasses.replace(config, **change), run_dir / ABLATIONS_DIR / name, bench,
                                    train_indices=train_indices, run_info={**dict(run_info or {}), "ablation": name})
        print(f"  {name} trained in {time.perf_counter() - t0:.0f} s", flush=True)
    return models


def load_ablations(run_dir: Path) -> dict[str, Any]:
    from specserve.training.spt.evaluate import ABLATIONS
    from specserve.training.spt.model import SpectralTransformer
    from specserve.training.trainer import CHECKPOINT_NAME, load_checkpoint

    found = {}
    for name in ABLATIONS:
        path = run_dir / ABLATIONS_DIR / name / CHECKPOINT_NAME
        if path.is_file():
            found[name] = SpectralTransformer.from_checkpoint(load_checkpoint(path))
    return found


def headline(report: Mapping[str, Any]) -> str:
    """The report's table: MAPE and coverage per row, and the target verdict."""
    def cov(row: Mapping[str, Any], key: str) -> str:
        c = row.get(key)
        return "    -    " if c is None else f"{c['age']:.3f}/{c['mass']:.3f}"

    lines = [f"{'model':20s} {'MAPE age %':>10s} {'MAPE mass %':>11s} {'1-sigma cov':>11s} {'2-sigma cov':>11s}"]
    rows = [("spt", report["spt"])] + [(k, v) for k, v in report["baselines"].items() if k != "label_oracle"]
    rows.append(("label_oracle", report["baselines"]["label_oracle"]))
    for name, row in rows:
        lines.append(f"{name:20s} {row['mape_age']:10.2f} {row['mape_mass']:11.2f} "
                     f"{cov(row, 'coverage_1sigma'):>11s} {cov(row, 'coverage_2sigma'):>11s}")
    for name in report.get("ablations_not_trained", []):
        lines.append(f"{name:20s} not trained (run 'specserve train spt' without --no-ablations)")
    t = report["target"]
    lines.append(
        f"target (beat every non-oracle row, <= {t['oracle_ratio_max']}x oracle, 1-sigma coverage "
        f"{t['coverage_1sigma_min']:.0%}-{t['coverage_1sigma_max']:.0%}): "
        f"{'met' if t['met'] else 'not judged, rows missing' if t.get('missing_rows') else 'NOT met'} "
        f"(oracle ratio age {t['oracle_ratio']['age']:.2f}, mass {t['oracle_ratio']['mass']:.2f}; "
        f"beaten: {', '.join(k for k, v in t['beats'].items() if v) or 'none'})")
    return "\n".join(lines)


def cmd_train_spt(args: argparse.Namespace) -> int:
    from specserve.training.common import config_with_overrides, load_set, require_training_extra

    require_training_extra(args.threads)
    from specserve.training.spt.evaluate import SPTEvalConfig, evaluate_spt
    from specserve.training.spt.model import SPTConfig
    from specserve.training.spt.train import train_spt

    base = quick_config() if args.quick else SPTConfig()
    config = config_with_overrides(dict(args.overrides), base)
    run_dir = args.out if args.out is not None else Path("runs") / f"spt-{time.strftime('%Y%m%d-%H%M%S')}"
    bench = load_set("giants", args.cache)
    train_indices = quick_indices(bench, config.seed) if args.quick else None
    info = {"quick": bool(args.quick), "cache": str(args.cache) if args.cache else None}
    t0 = time.perf_counter()
    model, trainer = train_spt(config, run_dir, bench, train_indices=train_indices, run_info=info)
    train_s = time.perf_counter() - t0
    print(f"SPT trained in {train_s:.0f} s ({trainer.step} steps)", flush=True)
    ablations = train_ablations(config, Path(run_dir), bench, train_indices, info) if args.ablations else {}
    report = evaluate_spt(model, bench, run_dir, SPTEvalConfig(mc_samples=config.mc_samples),
                          train_indices=train_indices, ablations=ablations,
                          extra={"training": {"wall_s": round(train_s, 2), "steps": trainer.step,
                                              "threads": args.threads}})
    print(f"run folder: {run_dir}; report: {Path(run_dir) / 'report.json'}")
    print(headline(report))
    return 0


def cmd_eval_spt(args: argparse.Namespace) -> int:
    from specserve.training.common import load_set, require_training_extra

    require_training_extra(args.threads)
    from specserve.training.spt.evaluate import SPTEvalConfig, evaluate_spt
    from specserve.training.spt.model import SpectralTransformer
    from specserve.training.trainer import CHECKPOINT_NAME, load_checkpoint

    path = Path(args.run) / CHECKPOINT_NAME
    if not path.is_file():
        raise SpecserveError(f"no {CHECKPOINT_NAME} in {args.run}")
    checkpoint = load_checkpoint(path)
    if checkpoint.get("model_kind") != "spt":
        raise SpecserveError(f"{path} holds a {checkpoint.get('model_kind')!r} model, not an SPT")
    model = SpectralTransformer.from_checkpoint(checkpoint)
    bench = load_set("giants", args.cache)
    data = checkpoint.get("config", {}).get("data", {})
    if data.get("content_hash") and data["content_hash"] != bench.meta.get("content_hash"):
        log.warning("the cached 'giants' set differs from the one this run was trained on")
    indices = data.get("train_indices")
    report = evaluate_spt(model, bench, args.run, SPTEvalConfig(mc_samples=model.config.mc_samples),
                          train_indices=None if indices is None else np.asarray(indices),
                          ablations=load_ablations(Path(args.run)),
                          extra={"checkpoint": {"step": checkpoint.get("step"), "epoch": checkpoint.get("epoch"),
                                                "best": checkpoint.get("best"),
                                                "calibration": checkpoint.get("calibration")}})
    print(f"run folder: {args.run}; report: {Path(args.run) / 'report.json'}")
    print(headline(report))
    return 0
