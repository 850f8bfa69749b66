"""Export a trained RBM run to ONNX and into a model repository.

``export_rbm(run_dir, repository)`` loads ``checkpoint.pt`` (and ``report.json`` when the run was
evaluated), builds the model card (kind ``rbm``, the ``cv`` set's preprocessing recipe, class
names, the test-split metrics with the baselines, the training set's content hash), exports
``forward`` (binarisation, class free energies, softmax: all graph ops) and validates the file
with :func:`~specserve.export.onnx_export.export_model`: a failed check raises
:class:`~specserve.runtime.errors.ExportError` and nothing is written into the repository.

Parity tolerance: free energies are sums over ~6,000 visible units and reach ~1e3 in magnitude,
so float32 accumulation order differs between torch and ONNX Runtime by up to ~1e-3 absolute.
Outputs must agree within ``1e-3 + 1e-5 * |torch|``, which for probabilities (in [0, 1]) means
three decimals at worst and for free energies a relative 1e-5 on top.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from specserve.export.onnx_export import ExportReport, export_model, load_run
from specserve.export.repository import write_model
from specserve.export.served import check_rbm, rewrite_metadata
from specserve.runtime.contract import ModelCard
from specserve.runtime.errors import ExportError
from specserve.runtime.preprocess import OPTICAL_PREPROCESSING, Preprocessing

ATOL = 1e-3
RTOL = 1e-5
ALLOWED_OPS = {"Greater", "Less", "Cast", "Concat", "MatMul", "Gemm", "Transpose", "Reshape", "Add", "Sub",
               "Neg", "Mul", "Softplus", "ReduceSum", "Softmax", "Constant", "Shape", "Gather", "Unsqueeze"}
"""Operators an RBM graph may contain: no control flow, no random ops, nothing custom."""
DESCRIPTION = ("Cataclysmic-variable classifier after Chen, Wu, Bu & Zhao 2014 (PASA, arXiv:1305.0665): "
               "continuum-normalised flux binarised into above/below-continuum bits, one binary RBM per class "
               "trained by contrastive divergence and fine-tuned discriminatively, p(class) = softmax(-F_class).")


def rbm_card(checkpoint: dict[str, Any], report: dict[str, Any] | None) -> ModelCard:
    """The model card for an RBM checkpoint (and its evaluation report, when there is one)."""
    config = checkpoint.get("config", {})
    data = config.get("data", {})
    recipe = data.get("preprocessing")  # the benchmark set's recipe, recorded at training time
    metrics: dict[str, Any] = {}
    if report:
        keep = ("accuracy", "cv_recall", "cv_precision", "fpr_real_non_cv", "accuracy_vs_snr",
                "accuracy_vs_snr_photon", "fpr_real_non_cv_vs_snr")
        headline = report.get("served", report["rbm"])
        metrics = {
            "split": report["benchmark"]["split"],
            "n_test": report["benchmark"]["n_test"],
            "path": "served" if "served" in report else "torch",
            "rbm": {k: headline[k] for k in keep if k in headline},
            "torch_path": {k: report["rbm"][k] for k in keep if k in report["rbm"]},
            "baselines": {name: {k: m[k] for k in keep if k in m} for name, m in report["baselines"].items()},
            "target": report["target"],
        }
    return ModelCard(
        kind="rbm",
        preprocessing=Preprocessing.from_dict(recipe) if recipe else OPTICAL_PREPROCESSING,
        class_names=tuple(report["class_names"]) if report else ("non_cv", "cv"),
        training_fingerprint=f"{data.get('benchmark', 'cv')}:sha256:{data.get('content_hash', 'unknown')}",
        metrics=metrics,
        description=DESCRIPTION,
    )


def next_version(repository: str | Path, name: str) -> int:
    model_dir = Path(repository) / name
    existing = [int(p.name) for p in model_dir.glob("*") if p.is_dir() and p.name.isdigit()]
    return max(existing, default=0) + 1


def export_rbm(run_dir: str | Path, repository: str | Path, *, name: str = "rbm",
               version: int | None = None, served_check: bool = True) -> tuple[Path, ExportReport]:
    """Export ``run_dir``'s checkpoint into ``repository/name/version``; returns (version folder, report).

    With an evaluated run (``report.json``) and ``served_check``, the report's rows are measured
    again through the exported graph and the runtime (:mod:`specserve.export.served`); the card
    carries the served numbers, and a skew beyond tolerance fails the export."""
    from specserve.training.rbm.model import RBMClassifier

    run_dir = Path(run_dir)
    checkpoint, report = load_run(run_dir, "rbm", "an RBM")
    model = RBMClassifier.from_checkpoint(checkpoint).eval()
    card = rbm_card(checkpoint, report)
    if card.dims["n_pixels"] != model.config.n_pixels:
        raise ExportError(f"the checkpoint has {model.config.n_pixels} pixels, its grid {card.dims['n_pixels']}")
    result = export_model(model, card, run_dir / "onnx" / "model.onnx", atol=ATOL, rtol=RTOL,
                          allowed_ops=ALLOWED_OPS)
    if report is not None and served_check:  # the report's rows again on the served path
        report = check_rbm(result.path, run_dir, report)
        card = rbm_card(checkpoint, report)
        rewrite_metadata(result.path, card)
    version = next_version(repository, name) if version is None else version
    return write_model(repository, name, version, result.path, card), result
