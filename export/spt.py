"""Export a trained SPT run to ONNX, with Monte Carlo dropout inside the graph.

One ONNX run draws ``n_samples`` (T) samples: the deterministic body runs once per spectrum, the
pooled features are tiled T times (ONNX ``Tile``) and the stochastic head runs on all T x B rows;
its dropout masks come from ``RandomUniformLike`` shifted by the ``seed`` input (see
:mod:`specserve.training.spt.model`). There is no ``Dropout`` node, so ONNX Runtime's EliminateDropout
pass has nothing to remove, and the exporter cannot constant-fold draws shaped like activations.

Validation (any failure raises :class:`~specserve.runtime.errors.ExportError` and writes nothing
into the repository):

1. deterministic parity: the same weights exported with dropout off, torch vs ONNX Runtime at
   batch 1, 3 and 64 within ``ATOL + RTOL * |torch|`` (mean in Gyr and Msun, std exactly 0), plus
   the checker, operator, contract and metadata checks of
   :func:`~specserve.export.onnx_export.validate_export`;
2. the MC graph passes the same structural checks, contains ``RandomUniformLike`` and no
   ``Dropout``, and keeps its randomness under ONNX Runtime's default optimisations;
3. statistics on fixed inputs (:func:`check_mc`): ``MC_CHECK_SAMPLES`` samples each from torch and
   ONNX Runtime; per target, the mean over the inputs of the log-sample means agrees within 3
   standard errors (and every single input within 4.5, a Bonferroni bound for 16 comparisons),
   and the average standard deviations agree within 10 %;
4. two runs on the same input and seed differ, and two sessions in one process given different
   seeds differ.

The report also times, at batch 64, one MC run with T = 64 against one deterministic pass.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from specserve.export.onnx_export import ExportReport, export_model, load_run, op_types
from specserve.export.rbm import next_version
from specserve.export.repository import write_model
from specserve.export.served import check_spt, rewrite_metadata
from specserve.runtime.contract import ModelCard
from specserve.runtime.errors import ExportError
from specserve.runtime.preprocess import Preprocessing

log = logging.getLogger(__name__)

ATOL = 1e-4
RTOL = 1e-4
"""Deterministic parity of mean (Gyr, Msun; values 0.5-15): float32 sums over 8,000 pixels and
three attention layers differ between torch and ONNX Runtime by ~1e-6 relative."""
MC_CHECK_SAMPLES = 4000
MC_CHECK_INPUTS = 8
MEAN_SE_LIMIT = 3.0
SINGLE_SE_LIMIT = 4.5
STD_RATIO_TOLERANCE = 0.10
ALLOWED_OPS = {
    "Add", "Cast", "Concat", "Constant", "ConstantOfShape", "Div", "Equal", "Erf", "Exp", "Expand", "Floor",
    "Gather", "Gemm", "GreaterOrEqual", "LayerNormalization", "MatMul", "Mul", "Pad", "Pow", "RandomUniformLike",
    "ReduceMax", "ReduceMean", "ReduceSum", "Reshape", "Shape", "Slice", "Softmax", "Sqrt", "Sub", "Tile", "Transpose", "Unsqueeze", "Where",
}
"""Operators an SPT graph may contain: standard, no control flow, no custom ops."""
DESCRIPTION = ("Red-giant age and mass after Zhang et al. 2024 (A&A, arXiv:2401.04900): Spectral Transformer with "
               "multi-head Hadamard self-attention, trained with a Mahalanobis-distance loss on log age and log mass; "
               "Monte Carlo dropout in the regression head, T samples drawn inside one graph run.")


@dataclass
class MCCheck:
    mean_z: list[float]
    max_single_z: list[float]
    std_ratio: list[float]
    runs_differ: bool
    sessions_differ: bool
    samples: int
    timing: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        return (f"MC check ({self.samples} samples): mean z {', '.join(f'{z:+.2f}' for z in self.mean_z)}; "
                f"max single z {', '.join(f'{z:.2f}' for z in self.max_single_z)}; std ratio ORT/torch "
                f"{', '.join(f'{r:.3f}' for r in self.std_ratio)}; runs differ {self.runs_differ}, "
                f"sessions differ {self.sessions_differ}")


def spt_card(checkpoint: dict[str, Any], report: dict[str, Any] | None) -> ModelCard:
    """The model card for an SPT checkpoint (and its evaluation report, when there is one)."""
    from specserve.training.spt.model import TARGET_NAMES, TARGET_UNITS

    config = checkpoint.get("config", {})
    data = config.get("data", {})
    model_config = checkpoint["model_config"]
    recipe = data.get("preprocessing")
    if not recipe:
        raise ExportError("the checkpoint records no preprocessing recipe (train it with 'specserve train spt')")
    metrics: dict[str, Any] = {}
    if report:
        keep = ("mape_age", "mape_mass", "coverage_1sigma", "coverage_2sigma", "raw_coverage_1sigma", "vs_snr",
                "vs_snr_photon")
        metrics = {
            "split": report["set"]["split"], "n_test": report["set"]["n_test"],
            "path": "served" if "served" in report else "torch",
            "spt": {k: report.get("served", report["spt"])[k] for k in keep if k in report.get("served", report["spt"])},
            "torch_path": {k: report["spt"][k] for k in keep if k in report["spt"]},
            "baselines": {n: {k: r[k] for k in keep if k in r} for n, r in report["baselines"].items()},
            "target": {"met": report["target"]["met"], "oracle_ratio": report["target"]["oracle_ratio"]},
        }
    scale = checkpoint["state_dict"]["std_scale"].tolist()
    return ModelCard(
        kind="spt",
        preprocessing=Preprocessing.from_dict(recipe),
        label_names=TARGET_NAMES,
        label_units=TARGET_UNITS,
        normalisation={
            "mc_samples": {"default": int(model_config["mc_samples"]), "max": int(model_config["mc_samples_max"])},
            "dropout": float(model_config["dropout"]),
            "std_scale": [float(s) for s in scale],
            "outputs": "mean = exp(mean log sample); std = mean * std(log samples) * std_scale",
        },
        training_fingerprint=f"{data.get('benchmark', 'giants')}:sha256:{data.get('content_hash', 'unknown')}",
        metrics=metrics,
        description=DESCRIPTION,
    )


def _session(path: Path) -> ort.InferenceSession:
    """A session with ONNX Runtime's default optimisations, as the server creates it."""
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def check_mc(path: str | Path, model: torch.nn.Module, card: ModelCard,
             n_samples: int = MC_CHECK_SAMPLES, transform=np.log) -> MCCheck:
    """Statistical and randomness checks of an exported MC graph against torch (module docstring).

    ``model`` is called like the graph, with the contract's inputs in order, and returns the
    ``samples`` output last; ``transform`` maps samples (T, B, K) to the space where means and
    spreads are compared (log for positive quantities).
    """
    path = Path(path)
    graph = onnx.load(str(path))
    ops = op_types(graph)
    if "Dropout" in ops:
        raise ExportError(f"{path}: contains Dropout nodes, which ONNX Runtime's EliminateDropout removes")
    if "RandomUniformLike" not in ops:
        raise ExportError(f"{path}: the graph has no random operator: MC dropout did not survive the export")
    contract = card.contract
    feed = contract.dummy_inputs(card.dims, batch=MC_CHECK_INPUTS, seed=7)
    feed.update({"n_samples": np.array([n_samples], np.int64), "seed": np.array([0.5], np.float32)})
    session = _session(path)
    ort_samples = session.run(["samples"], feed)[0]
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        with torch.no_grad():
            torch_samples = model.eval()(*(torch.from_numpy(feed[n]) for n in contract.input_names))[-1].numpy()
    finally:
        torch.random.set_rng_state(state)

    def stats(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        values = transform(samples.astype(np.float64))
        return values.mean(axis=0), values.std(axis=0)

    m_ort, s_ort = stats(ort_samples)
    m_t, s_t = stats(torch_samples)
    se = np.sqrt((s_ort**2 + s_t**2) / n_samples)  # (B, K)
    if not np.all(s_t > 0):
        raise ExportError("the torch model's MC samples have no spread: is its dropout switched off?")
    single_z = np.abs(m_ort - m_t) / se
    mean_z = (m_ort - m_t).mean(axis=0) / (np.sqrt((se**2).sum(axis=0)) / MC_CHECK_INPUTS)
    ratio = s_ort.mean(axis=0) / s_t.mean(axis=0)
    again = session.run(["samples"], feed)[0]
    other = _session(path).run(["samples"], {**feed, "seed": np.array([0.75], np.float32)})[0]
    check = MCCheck([float(z) for z in mean_z], [float(z) for z in single_z.max(axis=0)],
                    [float(r) for r in ratio], bool(not np.array_equal(again, ort_samples)),
                    bool(not np.array_equal(other, ort_samples)), n_samples)
    problems = []
    if np.any(np.abs(mean_z) > MEAN_SE_LIMIT):
        problems.append(f"MC means differ from torch by {np.abs(mean_z).max():.2f} standard errors "
                        f"(limit {MEAN_SE_LIMIT})")
    if np.any(single_z > SINGLE_SE_LIMIT):
        problems.append(f"one input's MC mean differs by {single_z.max():.2f} standard errors (limit {SINGLE_SE_LIMIT})")
    if np.any(np.abs(ratio - 1.0) > STD_RATIO_TOLERANCE):
        problems.append(f"MC standard deviations differ from torch's by a factor {', '.join(f'{r:.3f}' for r in ratio)} "
                        f"(tolerance {STD_RATIO_TOLERANCE:.0%})")
    if not check.runs_differ:
        problems.append("two runs on the same input gave identical samples")
    if not check.sessions_differ:
        problems.append("two sessions with different seeds gave identical samples")
    if problems:
        raise ExportError(f"{path}: MC dropout check failed: " + "; ".join(problems))
    return check


def time_mc(mc_path: Path, deterministic_path: Path, flux: np.ndarray, n_samples: int = 64,
            repeats: int = 5) -> dict[str, float]:
    """Best-of-``repeats`` seconds of one MC run with T = ``n_samples`` and of one deterministic pass."""
    mc, det = _session(mc_path), _session(deterministic_path)
    feed = {"flux": flux, "n_samples": np.array([n_samples], np.int64), "seed": np.array([0.5], np.float32)}
    det_feed = {**feed, "n_samples": np.array([1], np.int64)}

    def best(session, f) -> float:
        session.run(None, f)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            session.run(None, f)
            times.append(time.perf_counter() - t0)
        return min(times)

    t_mc, t_det = best(mc, feed), best(det, det_feed)
    return {"batch": int(flux.shape[0]), "n_samples": n_samples, "mc_seconds": t_mc, "deterministic_seconds": t_det,
            "ratio": t_mc / t_det}


def export_spt_model(model: torch.nn.Module, card: ModelCard, out_dir: str | Path,
                     reference: torch.nn.Module | None = None) -> tuple[ExportReport, MCCheck]:
    """Export and validate ``model`` into ``out_dir/model.onnx`` (steps 1-4 of the module docstring).

    ``reference`` is the torch model the MC statistics are compared with (default ``model``).
    """
    from specserve.training.layers import deterministic

    out_dir = Path(out_dir)
    reference = model if reference is None else reference
    with tempfile.TemporaryDirectory() as tmp:
        det_path = Path(tmp) / "deterministic.onnx"
        with deterministic(model):
            parity = export_model(model, card, det_path, atol=ATOL, rtol=RTOL, allowed_ops=ALLOWED_OPS)
        report = export_model(model, card, out_dir / "model.onnx", atol=ATOL, rtol=RTOL, allowed_ops=ALLOWED_OPS,
                              check_parity=False)
        report.max_abs_diff = {f"{k} (dropout off)": v for k, v in parity.max_abs_diff.items()}
        check = check_mc(report.path, reference, card)
        flux = card.contract.dummy_inputs(card.dims, batch=64, seed=3)["flux"]
        check.timing = time_mc(report.path, det_path, flux)
    log.info("%s", check.summary())
    return report, check


def export_spt(run_dir: str | Path, repository: str | Path, *, name: str = "spt",
               version: int | None = None, served_check: bool = True) -> tuple[Path, ExportReport, MCCheck]:
    """Export ``run_dir``'s checkpoint into ``repository/name/version``; returns (folder, report, MC check).
    With an evaluated run and ``served_check``, the report's rows are measured again on the served
    path and the card carries them (:mod:`specserve.export.served`; a skew fails the export)."""
    from specserve.training.spt.model import SpectralTransformer

    run_dir = Path(run_dir)
    checkpoint, report = load_run(run_dir, "spt", "an SPT")
    model = SpectralTransformer.from_checkpoint(checkpoint)
    card = spt_card(checkpoint, report)
    if card.dims["n_pixels"] != model.config.n_pixels:
        raise ExportError(f"the checkpoint has {model.config.n_pixels} pixels, its grid {card.dims['n_pixels']}")
    result, check = export_spt_model(model, card, run_dir / "onnx")
    if report is not None and served_check:  # the report's rows again on the served path
        report = check_spt(result.path, run_dir, report)
        card = spt_card(checkpoint, report)
        rewrite_metadata(result.path, card)
    version = next_version(repository, name) if version is None else version
    return write_model(repository, name, version, result.path, card), result, check
