"""Export a trained PhysFormer run as two ONNX graphs: ``physformer`` (MC inversion, reconstruction,
chi-square) and ``physformer-generate`` (parameters -> spectrum). The flux layer is in both, as
standard operators.

Validation (any failure raises :class:`~specserve.runtime.errors.ExportError`, nothing is written
into the repository):

- ``physformer``: deterministic parity with dropout off (a second export of the same weights) at
  batch 1, 3, 64 within ``ATOL + RTOL * |torch|`` on every output; the checker, operator set,
  contract and metadata checks; the MC checks of :func:`specserve.export.spt.check_mc` (log Teff,
  logg and [Fe/H] compared; spreads within 10 %, runs and sessions differ);
- ``physformer-generate``: parity at batch 1, 3, 64 within the same tolerance, with parameters
  spread around a solar-type star.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from specserve.export.onnx_export import ExportReport, export_model, load_run
from specserve.export.rbm import next_version
from specserve.export.repository import write_model
from specserve.export.served import check_physformer, rewrite_metadata
from specserve.export.spt import ALLOWED_OPS as SPT_OPS
from specserve.export.spt import MCCheck, check_mc
from specserve.runtime.contract import ModelCard
from specserve.runtime.errors import ExportError
from specserve.runtime.preprocess import Preprocessing

ATOL = 1e-4
RTOL = 1e-3
"""Parity tolerance: the flux layer sums exponentials over depth and angle in float32, and the
normalised spectrum is a ratio of two such sums; torch and ONNX Runtime differ by ~1e-6 relative.
Temperatures (~5,000 K) get 1e-3 relative (a few K) for the 10 ** log10 round trip."""
ALLOWED_OPS = SPT_OPS | {"Sigmoid", "Tanh", "CumSum", "Min", "Max", "Clip", "Log", "Softplus", "Conv", "Neg",
                         "Relu", "ReduceSum", "ReduceMax", "MatMul", "Div", "Expand", "ScatterND", "Range", "Less", "Not",
                         "Identity", "Squeeze", "Greater", "And", "Or", "Abs", "Reciprocal", "Split"}
"""Standard operators only: no control flow, nothing custom."""
GENERATE_SUFFIX = "-generate"
DESCRIPTION = ("Stellar parameters after Wang, Zhang, Bu & Mou 2026 (arXiv:2603.01459): transformer encoder into the "
               "physical box (MC dropout), decoder to per-layer opacities and temperatures, radiative flux layer "
               "(formal solution, Gauss-Legendre flux, continuum normalisation, broadening).")


def _log10_first(samples: np.ndarray) -> np.ndarray:
    out = samples.copy()
    out[..., 0] = np.log10(out[..., 0])
    return out


def physformer_cards(checkpoint: dict[str, Any], report: dict[str, Any] | None) -> tuple[ModelCard, ModelCard]:
    from specserve.training.physformer.model import (LEGACY_DEFAULTS, PARAMETER_NAMES, PARAMETER_UNITS, STD_KNOTS_SNR,
                                                     PhysFormerConfig)

    config = checkpoint.get("config", {})
    data = config.get("data", {})
    recipe = data.get("preprocessing")
    if not recipe:
        raise ExportError("the checkpoint records no preprocessing recipe (train it with 'specserve train physformer')")
    mc = PhysFormerConfig(**{**LEGACY_DEFAULTS, **checkpoint["model_config"]})
    metrics: dict[str, Any] = {}
    if report:
        served = report.get("served")
        metrics = {"split": report["set"]["split"], "n_test": report["set"]["n_test"],
                   "path": "served" if served else "torch",
                   "fgk_mae": {k: r["native"]["fgk"]["mae"] for k, r in report["rows"].items()},
                   "target_met": report["target"]["met"]}
        if served:
            metrics["fgk_mae"]["physformer"] = served["native"]["fgk"]["mae"]
            metrics["fgk_teff_mae_vs_snr"] = {s: r["fgk"]["mae"]["teff"] for s, r in served["snr"].items()}
            metrics["torch_path_fgk_mae"] = report["rows"]["physformer"]["native"]["fgk"]["mae"]
    common = dict(preprocessing=Preprocessing.from_dict(recipe), label_names=PARAMETER_NAMES,
                  label_units=PARAMETER_UNITS, bounds=mc.bounds,
                  training_fingerprint=f"{data.get('benchmark', 'stars')}:sha256:{data.get('content_hash', 'unknown')}",
                  metrics=metrics, description=DESCRIPTION)
    std_scale = checkpoint["state_dict"].get("std_scale")
    std_table = checkpoint["state_dict"].get("std_table")
    normalisation = {"mc_samples": {"default": mc.mc_samples, "max": mc.mc_samples_max},
                     "dropout": mc.dropout,
                     "std_scale": [1.0, 1.0, 1.0] if std_scale is None else [float(v) for v in std_scale],
                     **({"std_table": std_table.tolist(), "std_knots_snr": list(STD_KNOTS_SNR)}
                        if std_table is not None and mc.calibration == "snr" else {}),
                     "calibration": mc.calibration, "noise_input": mc.noise_input,
                     "outputs": "parameters_std = MC spread * std_scale * the factor at the spectrum's S/N "
                                "(calibration 'snr': std_table at std_knots_snr, interpolated in log S/N; all "
                                "fitted on the validation split); samples are the raw MC draws", "flux_layer": {"layers": mc.n_layers, "nodes": mc.n_nodes,
                                                           "components": mc.n_components, "decoder": mc.decoder}}
    members = checkpoint.get("member_configs")
    if members:  # an ensemble (PhysFormerEnsemble): its encoders are branches of the graph
        normalisation["ensemble"] = {"members": len(members), "seeds": [c.get("seed") for c in members],
                                     "generator": "the first member's decoder"}
        common["description"] = (DESCRIPTION + f" Ensemble of {len(members)} encoders (seeds "
                                  f"{', '.join(str(c.get('seed')) for c in members)}); the MC draws average them.")
    return (ModelCard(kind="physformer", normalisation=normalisation, **common),
            ModelCard(kind="physformer-generate", normalisation={"flux_layer": normalisation["flux_layer"]}, **common))


def export_physformer_models(model: torch.nn.Module, cards: tuple[ModelCard, ModelCard], out_dir: str | Path
                             ) -> tuple[ExportReport, MCCheck, ExportReport]:
    from specserve.training.layers import deterministic
    from specserve.training.physformer.model import PhysFormerGenerator, PhysFormerInference

    out_dir = Path(out_dir)
    inference = PhysFormerInference(model).eval()
    with tempfile.TemporaryDirectory() as tmp:
        with deterministic(inference):
            parity = export_model(inference, cards[0], Path(tmp) / "deterministic.onnx", atol=ATOL, rtol=RTOL,
                                  allowed_ops=ALLOWED_OPS)
    report = export_model(inference, cards[0], out_dir / "physformer" / "model.onnx", atol=ATOL, rtol=RTOL,
                          allowed_ops=ALLOWED_OPS, check_parity=False)
    report.max_abs_diff = {f"{k} (dropout off)": v for k, v in parity.max_abs_diff.items()}
    check = check_mc(report.path, inference, cards[0], transform=_log10_first)
    generate = export_model(PhysFormerGenerator(model).eval(), cards[1], out_dir / "generate" / "model.onnx",
                            atol=ATOL, rtol=RTOL, allowed_ops=ALLOWED_OPS)
    return report, check, generate


def export_physformer(run_dir: str | Path, repository: str | Path, *, name: str = "physformer",
                      version: int | None = None, served_check: bool = True
                      ) -> tuple[list[Path], ExportReport, MCCheck, ExportReport]:
    """Export ``run_dir`` into ``repository/name`` and ``repository/name-generate``. With an
    evaluated run and ``served_check``, the report's rows are measured again on the served path and
    the cards carry them (:mod:`specserve.export.served`; a skew fails the export)."""
    from specserve.training.physformer.model import PhysFormer

    run_dir = Path(run_dir)
    checkpoint, report = load_run(run_dir, "physformer", "a PhysFormer")
    model = PhysFormer.from_checkpoint(checkpoint)
    cards = physformer_cards(checkpoint, report)
    inference, check, generate = export_physformer_models(model, cards, run_dir / "onnx")
    if report is not None and served_check:  # the report's rows again on the served path
        report = check_physformer(inference.path, run_dir, report)
        cards = physformer_cards(checkpoint, report)
        rewrite_metadata(inference.path, cards[0])
        rewrite_metadata(generate.path, cards[1])
    folders = []
    for model_name, result, card in ((name, inference, cards[0]), (name + GENERATE_SUFFIX, generate, cards[1])):
        v = next_version(repository, model_name) if version is None else version
        folders.append(write_model(repository, model_name, v, result.path, card))
    return folders, inference, check, generate
