"""Evaluation report of an RBM classifier on the ``cv`` benchmark set, with two baselines.

:func:`evaluate_rbm` scores the test split and writes ``report.json`` and ``report.png`` into the
run folder. Numbers, for the RBM and for each baseline:

- accuracy, CV recall, CV precision, the confusion matrix (rows true, columns predicted, class
  order ``non_cv, cv``);
- false-positive rate on the real non-CV spectra (every negative whose source is not a template in
  :data:`TEMPLATE_SOURCES`) and on all negatives;
- accuracy, CV recall and real-non-CV false-positive rate at S/N 100, 50, 20, 10, 5, with noise
  added to the raw test spectra (in flux units, before the pipeline normalises them) with a fixed
  seed, for a constant-sigma (``*_vs_snr``) and a photon-like (``*_vs_snr_photon``) noise model;
  a spectrum already noisier than the target keeps its own noise;
- the same three numbers under each raw-level perturbation of
  :data:`specserve.training.inputs.PERTURBATIONS` (``perturbations``).

Every row goes from raw spectra through the runtime's pipeline
(:func:`specserve.training.inputs.evaluation_variants`); :func:`summarise` turns predictions into
the rows, for the torch path here and for the served path (the exported graph behind the
runtime's Analyzer) in :mod:`specserve.export.served`. A spectrum the model does not apply to
(coverage below the runtime's threshold) counts as misclassified.

Baselines, trained on the same training spectra with the same binarisation and the same raw-level
augmentation as the RBM (each training spectrum once as observed and once augmented): scikit-learn
``LogisticRegression`` on the binarised input, and a ``Pipeline`` of ``BernoulliRBM`` features
and ``LogisticRegression``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from specserve.training.benchsets import BenchmarkSet
from specserve.training.common import REPORT_JSON, REPORT_PNG
from specserve.training.inputs import evaluation_variants, model_inputs, torch_inputs, training_pool, variant_key
from specserve.training.perturb import NOISE_MODELS
from specserve.training.rbm.model import RBMClassifier

log = logging.getLogger(__name__)

SNR_LEVELS = (100.0, 50.0, 20.0, 10.0, 5.0)
TEMPLATE_SOURCES = frozenset({"qso_template"})
"""Negative sources that are not real observed spectra (left out of the real-non-CV FPR)."""
TARGET = {"min_accuracy_at_snr_ge_20": 0.99, "max_fpr_real_non_cv": 0.01}
BASELINE_NAMES = ("logreg_binarised", "bernoulli_rbm_logreg")


# ---------------------------------------------------------------- metrics


@dataclass(frozen=True)
class EvalConfig:
    snr_levels: tuple[float, ...] = SNR_LEVELS
    noise_seed: int = 20240601
    """Seed of the noise injected into the test spectra (one generator per S/N level)."""
    baseline_seed: int = 0
    logreg_c: float = 1.0
    logreg_max_iter: int = 1000
    bernoulli_components: int = 64
    bernoulli_iter: int = 20
    bernoulli_lr: float = 0.02
    batch_size: int = 512


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, real_negative: np.ndarray) -> dict[str, Any]:
    """Binary metrics (positive = CV = 1). ``real_negative`` marks the real non-CV spectra."""
    y_true, y_pred = np.asarray(y_true).astype(int), np.asarray(y_pred).astype(int)
    tp = int(((y_true == 1) & (y_pred == 1)).sum())
    fp = int(((y_true == 0) & (y_pred == 1)).sum())
    fn = int(((y_true == 1) & (y_pred == 0)).sum())
    tn = int(((y_true == 0) & (y_pred == 0)).sum())
    real = np.asarray(real_negative, bool)

    def ratio(num: int, den: int) -> float | None:
        return num / den if den else None

    return {
        "accuracy": ratio(tp + tn, y_true.size),
        "cv_recall": ratio(tp, tp + fn),
        "cv_precision": ratio(tp, tp + fp),
        "fpr_real_non_cv": ratio(int((y_pred[real] == 1).sum()), int(real.sum())),
        "fpr_all_non_cv": ratio(fp, fp + tn),
        "false_positives_real_non_cv": int((y_pred[real] == 1).sum()),
        "confusion_matrix": [[tn, fp], [fn, tp]],
    }


def _snr_key(snr: float) -> str:
    return f"{snr:g}"


_SUMMARY_KEYS = ("accuracy", "cv_recall", "fpr_real_non_cv")


def _labels_from(prob: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Predicted classes; a spectrum without prediction (NaN: not applicable) counts as a miss."""
    pred = np.nan_to_num(prob, nan=-1.0).argmax(axis=1)
    missing = ~np.isfinite(prob).all(axis=1)
    pred[missing] = 1 - y[missing]
    return pred


def summarise(y: np.ndarray, real: np.ndarray, probabilities: Mapping[str, np.ndarray],
              snr_levels: tuple[float, ...]) -> dict[str, Any]:
    """The report's rows from class probabilities (n, 2) per evaluation variant (NaN rows: the
    model did not apply): native metrics, ``<metric>_vs_snr`` (constant noise) and
    ``<metric>_vs_snr_photon``, and ``perturbations``."""
    per = {k: classification_metrics(y, _labels_from(p, y), real) for k, p in probabilities.items()}
    out = dict(per["native"])
    out["n_not_applicable"] = int((~np.isfinite(probabilities["native"]).all(axis=1)).sum())
    for noise in NOISE_MODELS:
        suffix = "" if noise == "constant" else f"_{noise}"
        for name in _SUMMARY_KEYS:
            out[f"{name}_vs_snr{suffix}"] = {_snr_key(s): per[variant_key(noise, s)][name] for s in snr_levels
                                             if variant_key(noise, s) in per}
    out["perturbations"] = {k[len("perturb_"):]: {n: m[n] for n in _SUMMARY_KEYS}
                            for k, m in per.items() if k.startswith("perturb_")}
    return out


def torch_predictions(model: RBMClassifier, bench: BenchmarkSet, variants: Mapping[str, list],
                      batch_size: int = 512) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(probabilities, model input flux) per variant on the torch path: raw spectra -> the
    runtime's pipeline -> the torch model; NaN rows where the model does not apply."""
    probs, fluxes = {}, {}
    for key, raws in variants.items():
        prepared, ok = torch_inputs(bench, raws)
        fluxes[key] = prepared.model_flux()
        p = rbm_predict(model, fluxes[key], batch_size)[0].astype(np.float64)
        p[~ok] = np.nan
        probs[key] = p
    return probs, fluxes


def check_target(rows: Mapping[str, Any], snr_levels: tuple[float, ...]) -> dict[str, Any]:
    """The target on a summary's rows: accuracy at native S/N and every constant-noise S/N >= 20,
    and the real-non-CV false-positive rate there."""
    ge20 = [s for s in snr_levels if s >= 20]
    accs = [rows["accuracy"]] + [rows["accuracy_vs_snr"][_snr_key(s)] for s in ge20]
    fprs = [rows["fpr_real_non_cv"]] + [rows["fpr_real_non_cv_vs_snr"][_snr_key(s)] for s in ge20]
    target = {**TARGET, "checked_at": ["native"] + [_snr_key(s) for s in ge20],
              "measured_min_accuracy": min(v for v in accs if v is not None),
              "measured_max_fpr_real_non_cv": max(v for v in fprs if v is not None)}
    target["met"] = bool(target["measured_min_accuracy"] >= TARGET["min_accuracy_at_snr_ge_20"]
                         and target["measured_max_fpr_real_non_cv"] <= TARGET["max_fpr_real_non_cv"])
    return target


@torch.no_grad()
def rbm_predict(model: RBMClassifier, flux: np.ndarray, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (N, C), free energies (N, C)) as numpy."""
    model.eval()
    probs, free = [], []
    for lo in range(0, flux.shape[0], batch_size):
        p, f = model(torch.from_numpy(np.ascontiguousarray(flux[lo:lo + batch_size])))
        probs.append(p.numpy())
        free.append(f.numpy())
    c = model.config.n_classes
    return (np.concatenate(probs) if probs else np.zeros((0, c), np.float32),
            np.concatenate(free) if free else np.zeros((0, c), np.float32))


@torch.no_grad()
def binarised(model: RBMClassifier, flux: np.ndarray) -> np.ndarray:
    """The model's own binarisation of ``flux``: (N, 2P) uint8."""
    return model.binarise(torch.from_numpy(flux)).numpy().astype(np.uint8)


def fit_baselines(model: RBMClassifier, bench: BenchmarkSet, train_idx: np.ndarray,
                  config: EvalConfig) -> dict[str, Any]:
    """The two scikit-learn baselines on the binarised, noise-augmented training spectra."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import BernoulliRBM
    from sklearn.pipeline import Pipeline

    cfg = model.config
    rng = np.random.default_rng(config.baseline_seed)
    flux = model_inputs(bench, train_idx)
    y = bench.arrays["label"][train_idx].astype(int)
    if cfg.augment_snr_max:
        flux = np.concatenate([flux, training_pool(cfg, bench, train_idx, rng, 1.0).epoch(0).model_flux()])
        y = np.concatenate([y, y])
    x = binarised(model, flux)
    baselines: dict[str, Any] = {
        "logreg_binarised": LogisticRegression(C=config.logreg_c, max_iter=config.logreg_max_iter),
        "bernoulli_rbm_logreg": Pipeline([
            ("rbm", BernoulliRBM(n_components=config.bernoulli_components, learning_rate=config.bernoulli_lr,
                                 n_iter=config.bernoulli_iter, batch_size=64, random_state=config.baseline_seed)),
            ("logreg", LogisticRegression(C=config.logreg_c, max_iter=config.logreg_max_iter)),
        ]),
    }
    for name, estimator in baselines.items():
        t0 = time.perf_counter()
        estimator.fit(x, y)
        log.info("baseline %s fitted on %d spectra in %.1f s", name, len(y), time.perf_counter() - t0)
    return baselines


# ---------------------------------------------------------------- report


def evaluate_rbm(model: RBMClassifier, bench: BenchmarkSet, run_dir: str | Path,
                 config: EvalConfig = EvalConfig(), train_indices: np.ndarray | None = None,
                 extra: Mapping[str, Any] | None = None, plot: bool = True) -> dict[str, Any]:
    """Score ``model`` and the baselines on the test split of ``bench``; write the report files.

    ``train_indices`` are the baselines' training spectra (default: the whole train split);
    ``extra`` is copied into the report (e.g. the checkpoint's step and training time).
    Returns the report dictionary (the content of ``report.json``).
    """
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    a = bench.arrays
    test = bench.split_indices("test")
    train = bench.split_indices("train") if train_indices is None else np.asarray(train_indices)
    y = a["label"][test].astype(int)
    real = (y == 0) & ~np.isin(a["source"][test], sorted(TEMPLATE_SOURCES))

    variants = evaluation_variants(bench, test, config.snr_levels, config.noise_seed)
    probs, fluxes = torch_predictions(model, bench, variants, config.batch_size)
    rbm = summarise(y, real, probs, config.snr_levels)
    prob = probs["native"]
    free = rbm_predict(model, fluxes["native"], config.batch_size)[1]
    misclassified = np.flatnonzero(_labels_from(prob, y) != y)
    rbm["misclassified"] = [
        {"object_id": str(a["object_id"][test][i]), "source": str(a["source"][test][i]),
         "label": int(y[i]), "p_cv": float(prob[i, 1])} for i in misclassified
    ]
    t_rbm = time.perf_counter() - t_start

    baselines = fit_baselines(model, bench, train, config)
    baseline_reports = {}
    for name, estimator in baselines.items():
        predicted = {}
        for key, flux in fluxes.items():
            p = estimator.predict_proba(binarised(model, flux)).astype(np.float64)
            p[~np.isfinite(probs[key]).all(axis=1)] = np.nan
            predicted[key] = p
        baseline_reports[name] = summarise(y, real, predicted, config.snr_levels)

    report = {
        "model": "rbm",
        "benchmark": {
            "name": bench.name, "content_hash": bench.meta.get("content_hash"), "split": "test",
            "n_test": int(test.size), "n_cv": int((y == 1).sum()), "n_non_cv": int((y == 0).sum()),
            "n_real_non_cv": int(real.sum()), "template_sources": sorted(TEMPLATE_SOURCES),
            "n_train_baselines": int(train.size),
        },
        "class_names": list(bench.meta.get("class_names", ["non_cv", "cv"])),
        "model_config": model.config.to_dict(),
        "eval_config": {**asdict(config), "snr_levels": list(config.snr_levels)},
        "data_path": "raw test spectra -> runtime pipeline (the server's) -> model; noise and "
                     "perturbations on the raw flux",
        "snr_levels": [_snr_key(s) for s in config.snr_levels],
        "rbm": rbm,
        "baselines": baseline_reports,
        "free_energy": {
            name: {"mean": free[y == c].mean(0).tolist(), "std": free[y == c].std(0).tolist()}
            for c, name in enumerate(("non_cv", "cv")) if (y == c).any()
        },
        "target": check_target(rbm, config.snr_levels),
        "timing_s": {"rbm": round(t_rbm, 2)},
    }
    if extra:
        report.update(dict(extra))
    report["timing_s"]["evaluation"] = round(time.perf_counter() - t_start, 2)
    if plot:
        report["plot"] = REPORT_PNG if plot_report(report, free, y, run_dir / REPORT_PNG) else None
    (run_dir / REPORT_JSON).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    log.info("report written to %s", run_dir / REPORT_JSON)
    return report


def plot_report(report: Mapping[str, Any], free: np.ndarray, y: np.ndarray, path: Path) -> bool:
    """Free-energy histograms per class, confusion matrix, accuracy and FPR vs S/N."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'specserve[train]'): no %s", path.name)
        return False
    names = report["class_names"]
    colours = ("tab:blue", "tab:red")
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    panels = [(free[:, c], f"free energy of the {names[c]} RBM, F_{names[c]}") for c in range(free.shape[1])]
    panels.append((free[:, 0] - free[:, 1], f"F_{names[0]} - F_{names[1]} (logit of {names[1]})"))
    for ax, (values, title) in zip(axes[0], panels):
        bins = np.linspace(values.min(), values.max(), 40) if values.size and values.max() > values.min() else 10
        for c, colour in enumerate(colours):
            ax.hist(values[y == c], bins=bins, alpha=0.6, color=colour, label=f"true {names[c]}")
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("test spectra")
        ax.legend(fontsize=8)
    axes[0, 2].axvline(0.0, color="k", lw=0.8, ls="--")

    cm = np.asarray(report["rbm"]["confusion_matrix"])
    ax = axes[1, 0]
    ax.imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black", fontsize=14)
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"RBM, test split (accuracy {report['rbm']['accuracy']:.4f})", fontsize=9)

    snrs = [float(s) for s in report["snr_levels"]]
    models = [("RBM", report["rbm"])] + list(report["baselines"].items())
    for ax, key, title in ((axes[1, 1], "accuracy", "accuracy"),
                           (axes[1, 2], "fpr_real_non_cv", "false-positive rate, real non-CV")):
        for (name, m), marker in zip(models, "os^"):
            values = [m[f"{key}_vs_snr"][s] for s in report["snr_levels"]]
            ax.plot(snrs, values, marker=marker, label=f"{name} (native {m[key]:.3f})")
        limit = TARGET["min_accuracy_at_snr_ge_20"] if key == "accuracy" else TARGET["max_fpr_real_non_cv"]
        ax.axhline(limit, color="k", lw=0.8, ls="--", label="target")
        ax.set_xscale("log")
        ax.set_xlabel("injected S/N")
        ax.set_title(f"{title} vs injected S/N", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(f"RBM CV classifier on '{report['benchmark']['name']}' "
                 f"({report['benchmark']['n_test']} test spectra; target met: {report['target']['met']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
