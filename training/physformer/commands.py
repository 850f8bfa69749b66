"""Command-line glue for PhysFormer.

- ``specserve train physformer [--out RUN_DIR] [--cache DIR] [--set KEY=VALUE ...] [--quick] [--no-ablation]``:
  train PhysFormer on the ``stars`` set, the plain-decoder ablation into ``RUN_DIR/ablations/plain_decoder``
  (unless ``--no-ablation``), evaluate (``report.json``, ``report.png``) and print the table.
- ``specserve eval physformer --run RUN_DIR [--cache DIR]``: re-evaluate a run (with its ablation if trained).
- ``specserve train physformer-ensemble --members RUN_DIR RUN_DIR ... --out RUN_DIR``: combine
  trained runs (e.g. seeds) into one model whose encoders are branches
  (:class:`~specserve.training.physformer.model.PhysFormerEnsemble`), calibrate and evaluate it;
  ``specserve export physformer --run RUN_DIR`` exports it like any run.

Importing this module imports neither torch nor scikit-learn; the handlers do.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from specserve.runtime.errors import SpecserveError

DEFAULT_THREADS = 2
QUICK_OVERRIDES = {"epochs": 2, "depth": 1, "d_model": 16, "n_heads": 2, "ffn": 32, "encoder_hidden": 32,
                   "decoder_hidden": 32, "n_layers": 6, "n_components": 4, "n_nodes": 3, "mc_samples": 4,
                   "calibration": "constant"}
"""The smoke configuration; its calibration is one factor per parameter (the per-S/N one runs the
validation split at seven noise levels: tested on its own)."""
QUICK_TRAIN_SPECTRA = 128
ABLATION = "plain_decoder"
ENSEMBLE_SEEDS = (0, 1, 2)
"""The default model (``specserve models build``, the shipped one) is an ensemble of three default
trainings with these seeds (:class:`~specserve.training.physformer.model.PhysFormerEnsemble`): the
seed-to-seed scatter of one training is large (native FGK Teff 128-149 K over four seeds), an
encoder costs a few percent of the generator, and three beat two at every S/N while a fourth adds
little (docs/physformer.md). Each training takes about 5 minutes on 2 cores since the flux layer
is summed by parts."""


def register(train_sub: argparse._SubParsersAction, eval_sub: argparse._SubParsersAction) -> None:
    from specserve.training.common import add_eval_command, add_train_command

    cmd = add_train_command(train_sub, "physformer", "train and evaluate PhysFormer on the 'stars' set",
                            "PhysFormerConfig", f"{QUICK_TRAIN_SPECTRA} training spectra and a tiny network", cmd_train)
    cmd.add_argument("--no-ablation", dest="ablation", action="store_false",
                     help="skip the plain-decoder ablation (its report row stays empty)")
    ens = train_sub.add_parser("physformer-ensemble", help="combine trained PhysFormer runs into one ensemble "
                               "model (their encoders as graph branches), calibrate and evaluate it")
    ens.add_argument("--members", type=Path, nargs="+", required=True, help="run folders of the members (two or more)")
    ens.add_argument("--out", type=Path, required=True, help="run folder of the ensemble")
    ens.add_argument("--cache", type=Path, help="benchmark cache (default: $SPECSERVE_CACHE or ~/.cache/specserve)")
    ens.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch CPU threads (default 2)")
    ens.set_defaults(handler=cmd_ensemble)
    ev = add_eval_command(eval_sub, "physformer", "re-evaluate a PhysFormer run on the 'stars' set", cmd_eval)
    ev.add_argument("--recalibrate", action="store_true",
                    help="fit the run's uncertainty calibration again and save it in its checkpoint before "
                         "evaluating (with --set calibration=snr: per S/N)")
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="with --recalibrate: change a calibration field of the run's config (calibration=snr)")


def quick_config(config: Any = None) -> Any:
    from specserve.training.common import config_with_overrides
    from specserve.training.physformer.model import PhysFormerConfig

    return config_with_overrides({k: str(v) for k, v in QUICK_OVERRIDES.items()}, config or PhysFormerConfig())


def quick_indices(bench, seed: int) -> np.ndarray:
    from specserve.training.common import quick_indices as sample

    return sample(bench, QUICK_TRAIN_SPECTRA, seed)


def qso_inputs(cache: Path | None) -> dict[str, np.ndarray]:
    """The QSO-template spectra of the ``cv`` set (same grid as ``stars``) as non-stellar inputs."""
    from specserve.training.common import load_set
    from specserve.training.inputs import model_inputs

    cv = load_set("cv", cache)
    idx = np.flatnonzero(cv.arrays["source"] == "qso_template")
    return {"qso_template": model_inputs(cv, idx)} if idx.size else {}


def eval_config(mc_samples: int, quick: bool):
    """The evaluation of a run; a quick run's refinement diagnostic is one step at native S/N."""
    from specserve.training.physformer.evaluate import PhysFormerEvalConfig

    if quick:
        return PhysFormerEvalConfig(mc_samples=mc_samples, refinement_rows=("native",), refinement_steps=(1,))
    return PhysFormerEvalConfig(mc_samples=mc_samples)


def headline(report: Mapping[str, Any]) -> str:
    levels = report["snr_levels"]
    lines = [f"{'model':18s} {'FGK MAE Teff K':>14s} {'logg':>6s} {'[Fe/H]':>6s} {'all: Teff':>9s} {'logg':>6s} "
             f"{'[Fe/H]':>6s}  in box  FGK Teff MAE at S/N {'/'.join(levels)}"]
    for name, row in report["rows"].items():
        f, a = row["native"]["fgk"]["mae"], row["native"]["all"]["mae"]
        by_snr = "/".join(f"{row['snr'][s]['fgk']['mae']['teff']:.0f}" for s in levels)
        lines.append(f"{name:18s} {f['teff']:14.0f} {f['logg']:6.3f} {f['feh']:6.3f} {a['teff']:9.0f} {a['logg']:6.3f} "
                     f"{a['feh']:6.3f}  {row['native']['in_box_fraction']:6.3f}  {by_snr}")
    pf = report["rows"]["physformer"]
    lines.append("physformer in box at S/N " + ", ".join(f"{s}: {pf['snr'][s]['in_box_fraction']:.3f}" for s in levels)
                 + "; non-stellar inputs: " + ", ".join(f"{k} {v:.3f}" for k, v in report["in_box_non_stellar"].items()))
    by_snr = pf.get("uncertainty_by_snr", {})
    if by_snr:
        lines.append("FGK 1-sigma coverage Teff/logg/[Fe/H] by S/N: " + ", ".join(
            f"{s} " + "/".join(f"{v['fgk']['coverage_1sigma'][k]:.2f}" for k in ("teff", "logg", "feh"))
            for s, v in by_snr.items()))
    chi2 = pf["reduced_chi2"]
    lines.append(f"reduced chi-square p10/p50/p90: {chi2['p10']:.2f}/{chi2['p50']:.2f}/{chi2['p90']:.2f}; generation "
                 f"median residual rms {report['generation']['median_residual_rms']:.4f}")
    for key, row in pf.get("refinement", {}).items():
        enc = row["encoder"]
        best = min(row["refined"].items(), key=lambda kv: kv[1]["teff"])
        lines.append(f"refinement at {key}: FGK MAE Teff/logg/[Fe/H] encoder {enc['teff']:.0f}/{enc['logg']:.3f}/"
                     f"{enc['feh']:.3f}, best refined ({best[0]}) {best[1]['teff']:.0f}/{best[1]['logg']:.3f}/"
                     f"{best[1]['feh']:.3f}; catalogue labels fit better than the encoder's for "
                     f"{row['catalogue_fits_better_fraction']:.0%}")
    t = report["target"]
    wins = t.get("baseline_wins", [])
    lines.append(f"target (FGK MAE <= 110 K / 0.25 / 0.15, beat every baseline at every S/N, Teff at S/N 5 <= 1.5x "
                 f"native, coverage 0.60-0.76 per S/N, 100 % in box): {'met' if t['met'] else 'NOT met'}"
                 + (f"; S/N 5 / native Teff {t['snr_lowest_teff_over_native']:.2f}" if "snr_lowest_teff_over_native" in t else "")
                 + (f"; baselines ahead: {', '.join(wins)}" if wins else ""))
    return "\n".join(lines)


def _load(run_dir: Path):
    from specserve.training.physformer.model import PhysFormer
    from specserve.training.trainer import CHECKPOINT_NAME, load_checkpoint

    path = run_dir / CHECKPOINT_NAME
    if not path.is_file():
        return None
    checkpoint = load_checkpoint(path)
    if checkpoint.get("model_kind") != "physformer":
        raise SpecserveError(f"{path} holds a {checkpoint.get('model_kind')!r} model, not a PhysFormer")
    return PhysFormer.from_checkpoint(checkpoint), checkpoint


def cmd_train(args: argparse.Namespace) -> int:
    from specserve.training.common import config_with_overrides, load_set, require_training_extra

    require_training_extra(args.threads)
    from specserve.training.physformer.evaluate import evaluate_physformer
    from specserve.training.physformer.model import PhysFormerConfig
    from specserve.training.physformer.train import train_physformer

    base = quick_config() if args.quick else PhysFormerConfig()
    config = config_with_overrides(dict(args.overrides), base)
    run_dir = Path(args.out) if args.out is not None else Path("runs") / f"physformer-{time.strftime('%Y%m%d-%H%M%S')}"
    bench = load_set("stars", args.cache)
    train_indices = quick_indices(bench, config.seed) if args.quick else None
    info = {"quick": bool(args.quick)}
    t0 = time.perf_counter()
    model, trainer = train_physformer(config, run_dir, bench, train_indices=train_indices, run_info=info)
    train_s = time.perf_counter() - t0
    print(f"PhysFormer trained in {train_s:.0f} s ({trainer.step} steps)", flush=True)
    ablation = None
    if args.ablation:
        t1 = time.perf_counter()
        ablation, _ = train_physformer(dataclasses.replace(config, decoder="plain"), run_dir / "ablations" / ABLATION,
                                       bench, train_indices=train_indices, run_info={**info, "ablation": ABLATION})
        print(f"ablation {ABLATION} trained in {time.perf_counter() - t1:.0f} s", flush=True)
    report = evaluate_physformer(model, bench, run_dir, eval_config(config.mc_samples, args.quick),
                                 train_indices=train_indices, ablation=ablation, others=qso_inputs(args.cache),
                                 extra={"training": {"wall_s": round(train_s, 2), "steps": trainer.step}})
    print(f"run folder: {run_dir}; report: {run_dir / 'report.json'}")
    print(headline(report))
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from specserve.training.common import load_set, require_training_extra

    require_training_extra(args.threads)
    from specserve.training.physformer.evaluate import evaluate_physformer
    from specserve.training.physformer.train import build_ensemble

    if len(args.members) < 2:
        raise SpecserveError("an ensemble needs at least two --members")
    bench = load_set("stars", args.cache)
    t0 = time.perf_counter()
    model = build_ensemble(args.members, args.out, bench, {"built_by": "specserve train physformer-ensemble"})
    print(f"ensemble of {len(args.members)} PhysFormers calibrated in {time.perf_counter() - t0:.0f} s", flush=True)
    report = evaluate_physformer(model, bench, args.out, eval_config(model.config.mc_samples, False),
                                 others=qso_inputs(args.cache),
                                 extra={"ensemble": [str(m) for m in args.members]})
    print(f"run folder: {args.out}; report: {args.out / 'report.json'}")
    print(headline(report))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from specserve.training.common import load_set, require_training_extra

    require_training_extra(args.threads)
    from specserve.training.physformer.evaluate import evaluate_physformer

    loaded = _load(Path(args.run))
    if loaded is None:
        raise SpecserveError(f"no checkpoint.pt in {args.run}")
    model, checkpoint = loaded
    ablation = _load(Path(args.run) / "ablations" / ABLATION)
    bench = load_set("stars", args.cache)
    if getattr(args, "recalibrate", False):
        from specserve.training.physformer.model import PhysFormer
        from specserve.training.physformer.train import calibrate

        overrides = dict(item.split("=", 1) for item in args.overrides)
        if set(overrides) - {"calibration"}:
            raise SpecserveError(f"--set with --recalibrate takes calibration=... only, got {sorted(overrides)}")
        if overrides:
            config = dataclasses.replace(model.config, **overrides)
            state = model.state_dict()
            model = PhysFormer(config)
            model.load_state_dict(state)
            model.eval()
        from specserve.training.trainer import CHECKPOINT_NAME, update_checkpoint

        calibration = calibrate(model, bench, model.config.mc_samples, model.config.seed)
        update_checkpoint(Path(args.run) / CHECKPOINT_NAME, model, calibration=calibration,
                          model_config=model.config.to_dict())
        if "std_table" in calibration:
            print("calibration factors by S/N " + ", ".join(
                f"{snr:g}: " + "/".join(f"{v:.2f}" for v in row)
                for snr, row in zip(calibration["std_knots_snr"], calibration["std_table"])))
        else:
            print("calibration factors " + "/".join(f"{v:.2f}" for v in calibration["std_scale"]))
    indices = checkpoint.get("config", {}).get("data", {}).get("train_indices")
    quick = bool(checkpoint.get("config", {}).get("quick"))
    report = evaluate_physformer(model, bench, args.run, eval_config(model.config.mc_samples, quick),
                                 train_indices=None if indices is None else np.asarray(indices),
                                 ablation=None if ablation is None else ablation[0], others=qso_inputs(args.cache))
    print(f"run folder: {args.run}; report: {Path(args.run) / 'report.json'}")
    print(headline(report))
    return 0
