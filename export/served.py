"""Served metrics: every evaluation row measured again on the path a user takes.

The exported ``model.onnx`` is loaded by the runtime (:func:`~specserve.runtime.engine.repository.load_model_file`)
and run behind its in-process :class:`~specserve.runtime.embedded.analysis.Analyzer` on the very raw test
spectra of the torch-path report (:func:`specserve.training.inputs.evaluation_variants`, same
seeds): raw spectrum -> the server's checks and preprocessing -> the ONNX graph -> the values a
client reads. The rows are summarised by the same function as the torch path's, written beside
them into ``report.json`` (``served``), compared (``served_vs_torch``), and the model card then
carries the served numbers as its headline.

An export fails (:class:`~specserve.runtime.errors.ExportError`, nothing written into the
repository) when a served number differs from its torch-path twin by more than :data:`TOLERANCE`:

- classification rates (accuracy, recall, false-positive rate): 0.01 absolute (4 of the RBM's 399
  test spectra). The RBM is deterministic and torch and ONNX Runtime agree to 1e-3 in
  probability, so only spectra on the decision boundary may flip;
- MC regression errors (MAPE, MAE): 3 % relative plus an absolute floor (0.2 percentage points of
  MAPE, 5 K / 0.01 dex of MAE), for the Monte Carlo noise of two independent sets of dropout masks
  (T = 64 or 32 samples) on 127-288 test spectra;
- 1-sigma coverage: 0.3 / sqrt(T) absolute for T MC samples (0.075 at T = 16, 0.0375 at T = 64):
  measured on the quick SPT (T = 16, 288 spectra, 28 coverage numbers), served minus torch had a
  standard deviation of 0.018, so the bound is about 4 standard deviations.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from specserve.runtime.contract import ModelCard
from specserve.runtime.embedded.analysis import Analyzer
from specserve.runtime.engine.repository import LoadedModel, load_model_file
from specserve.runtime.errors import ExportError
from specserve.runtime.spectrum import SpectrumInput

log = logging.getLogger(__name__)

REPORT_JSON = "report.json"
CHUNK = 64
"""Spectra per Analyzer call (a server's typical batch)."""
TOLERANCE = {
    "rate": (0.01, 0.0),
    "mape": (0.2, 0.03),
    "mae_teff": (5.0, 0.03),
    "mae_dex": (0.01, 0.03),
}
COVERAGE_K = 0.3
"""1-sigma coverage tolerance: COVERAGE_K / sqrt(T) absolute."""
MC_REL_K = 0.12
"""Relative tolerance of MC errors at least MC_REL_K / sqrt(T): 3 % from T = 16 on, 6 % for the
T = 4 of the PhysFormer smoke configuration (measured there: up to 2.6 % apart)."""
"""Metric family -> (absolute, relative) tolerance of served against torch: |s - t| <= abs + rel |t|."""


def _family(path: str) -> str | None:
    leaf = path.rsplit(".", 1)[-1]
    if any(k in path for k in ("accuracy", "cv_recall", "fpr_real_non_cv", "in_box_fraction")):
        return "rate"
    if "mape" in path:
        return "mape"
    if ".mae." in path:
        return "mae_teff" if leaf == "teff" else "mae_dex"
    if "coverage_1sigma" in path:
        return "coverage"
    return None


def _leaves(tree: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    if isinstance(tree, Mapping):
        for key in sorted(tree):
            yield from _leaves(tree[key], f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield prefix, float(tree)


def compare(torch_rows: Mapping[str, Any], served_rows: Mapping[str, Any], mc_samples: int = 0) -> dict[str, Any]:
    """Side by side every metric both summaries have: {path: {torch, served, diff, ok}}, plus the
    failures (paths outside :data:`TOLERANCE`; coverage with ``mc_samples`` T)."""
    tolerance = dict(TOLERANCE)
    if mc_samples:
        tolerance["coverage"] = (COVERAGE_K / np.sqrt(mc_samples), 0.0)
        for family in ("mape", "mae_teff", "mae_dex"):  # smoke models draw few samples
            atol, rtol = tolerance[family]
            tolerance[family] = (atol, max(rtol, MC_REL_K / np.sqrt(mc_samples)))
    served = dict(_leaves(served_rows))
    table, failures = {}, []
    for path, t in _leaves(torch_rows):
        family = _family(path)
        if family is None or path not in served or family not in tolerance:
            continue
        s = served[path]
        atol, rtol = tolerance[family]
        ok = bool(np.isfinite(s) and np.isfinite(t) and abs(s - t) <= atol + rtol * abs(t)) or (s == t)
        table[path] = {"torch": t, "served": s, "diff": s - t, "ok": ok}
        if not ok:
            failures.append(path)
    return {"rows": table, "failures": failures, "tolerance": {k: [float(x) for x in v] for k, v in tolerance.items()},
            "n_compared": len(table)}


# ---------------------------------------------------------------- served predictions


def _analyzer(model_path: Path, name: str) -> tuple[Analyzer, LoadedModel]:
    model = load_model_file(name, "0", model_path)
    if not model.ready:
        raise ExportError(f"{model_path}: the runtime cannot load the exported model: {model.reason}")
    return Analyzer({name: model}), model


def served_values(analyzer: Analyzer, name: str, raws: Sequence[SpectrumInput], keys: Sequence[str],
                  mc_samples: int = 0) -> np.ndarray:
    """(n, len(keys)) of the values a client reads for each raw spectrum; NaN where the model did
    not apply (or the spectrum was rejected)."""
    out = np.full((len(raws), len(keys)), np.nan)
    for lo in range(0, len(raws), CHUNK):
        for i, outcome in enumerate(analyzer.analyze(list(raws[lo:lo + CHUNK]), [name], mc_samples), start=lo):
            for result in outcome.results:
                if result.applicable:
                    out[i] = [result.values[k] for k in keys]
    return out


def _config(cls, stored: Mapping[str, Any]):
    names = {f.name for f in fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items() if k in names})


def _load_set(name: str):
    from specserve.training.common import load_set

    return load_set(name)


def _write(run_dir: Path, report: dict[str, Any]) -> None:
    (run_dir / REPORT_JSON).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


def _finish(run_dir: Path, report: dict[str, Any], torch_rows: Mapping[str, Any], served_rows: dict[str, Any],
            label: str, mc_samples: int = 0) -> dict[str, Any]:
    report["served"] = served_rows
    report["served_vs_torch"] = compare(torch_rows, served_rows, mc_samples)
    _write(run_dir, report)
    failures = report["served_vs_torch"]["failures"]
    if failures:
        rows = report["served_vs_torch"]["rows"]
        shown = "; ".join(f"{p}: torch {rows[p]['torch']:.4g}, served {rows[p]['served']:.4g}" for p in failures[:6])
        raise ExportError(f"{label}: served metrics differ from the torch path beyond tolerance "
                          f"({len(failures)} of {len(rows)}): {shown}")
    log.info("%s: %d served metrics within tolerance of the torch path", label, len(report["served_vs_torch"]["rows"]))
    return report


@dataclass
class _Setup:
    """What every served check starts from: the report's eval config, its set and test rows, the
    exported model behind an Analyzer, and the raw spectra of every report row."""

    config: Any
    bench: Any
    test: np.ndarray
    analyzer: Analyzer
    model: LoadedModel
    variants: dict[str, list[SpectrumInput]]

    def values(self, keys: Sequence[str], mc_samples: int = 0) -> dict[str, np.ndarray]:
        """(n, len(keys)) served values per report row (NaN: not applicable)."""
        return {k: served_values(self.analyzer, self.model.name, raws, keys, mc_samples)
                for k, raws in self.variants.items()}


def _setup(model_path: Path, name: str, report: Mapping[str, Any], config_cls, set_name: str) -> _Setup:
    from specserve.training.inputs import evaluation_variants

    config = _config(config_cls, report["eval_config"])
    bench = _load_set(set_name)
    test = bench.split_indices("test")
    analyzer, model = _analyzer(model_path, name)
    variants = evaluation_variants(bench, test, config.snr_levels, config.noise_seed)
    return _Setup(config, bench, test, analyzer, model, variants)


def served_rbm(model_path: Path, report: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The RBM report's rows measured through ``model_path`` behind the runtime: (rows, target)."""
    from specserve.training.rbm.evaluate import TEMPLATE_SOURCES, EvalConfig, check_target, summarise

    run = _setup(model_path, "rbm", report, EvalConfig, report["benchmark"]["name"])
    a = run.bench.arrays
    y = a["label"][run.test].astype(int)
    real = (y == 0) & ~np.isin(a["source"][run.test], sorted(TEMPLATE_SOURCES))
    probs = run.values([f"p_{c}" for c in run.model.card.class_names])
    served = summarise(y, real, probs, run.config.snr_levels)
    return served, check_target(served, run.config.snr_levels)


def served_spt(model_path: Path, report: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The SPT report's rows (MC with the report's ``mc_samples``) through ``model_path``."""
    from specserve.training.spt.evaluate import SPTEvalConfig, check_target, summarise

    run = _setup(model_path, "spt", report, SPTEvalConfig, report["set"]["name"])
    names = list(run.model.card.label_names)
    values = run.values(names + [f"{n}_err" for n in names], run.config.mc_samples)
    predictions = {k: (v[:, :len(names)], v[:, len(names):]) for k, v in values.items()}
    served = summarise(run.bench.arrays["targets"][run.test], predictions, run.config.snr_levels)
    return served, check_target(served, report["baselines"])


def served_physformer(model_path: Path, report: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The PhysFormer report's rows (MC with the report's ``mc_samples``) through ``model_path``."""
    from specserve.training.physformer.evaluate import PhysFormerEvalConfig, check_target, summarise

    run = _setup(model_path, "physformer", report, PhysFormerEvalConfig, report["set"]["name"])
    predictions = run.values(list(run.model.card.label_names), run.config.mc_samples)
    served = summarise(run.bench.arrays["labels"][run.test], predictions, report["bounds"], run.config.snr_levels)
    rows = {**report["rows"], "physformer": {**report["rows"]["physformer"], **served}}
    return served, check_target(rows, report["snr_levels"], report["in_box_non_stellar"])


SERVED_ROWS = {"rbm": served_rbm, "spt": served_spt, "physformer": served_physformer}


def check_rbm(model_path: Path, run_dir: Path, report: dict[str, Any]) -> dict[str, Any]:
    """Served RBM rows (see the module docstring); returns the updated report."""
    served, report["target_served"] = served_rbm(model_path, report)
    return _finish(run_dir, report, report["rbm"], served, "rbm")


def check_spt(model_path: Path, run_dir: Path, report: dict[str, Any]) -> dict[str, Any]:
    """Served SPT rows (MC with the report's ``mc_samples``); returns the updated report."""
    served, report["target_served"] = served_spt(model_path, report)
    torch_rows = {k: v for k, v in report["spt"].items() if k != "raw_coverage_1sigma"}
    return _finish(run_dir, report, torch_rows, served, "spt", report["eval_config"]["mc_samples"])


def check_physformer(model_path: Path, run_dir: Path, report: dict[str, Any]) -> dict[str, Any]:
    """Served PhysFormer rows (MC with the report's ``mc_samples``); returns the updated report."""
    from specserve.training.physformer.evaluate import ERROR_VS_SNR_PNG, plot_error_vs_snr

    served, report["target_served"] = served_physformer(model_path, report)
    plot_error_vs_snr(report["rows"], report["snr_levels"], run_dir / ERROR_VS_SNR_PNG, served)
    return _finish(run_dir, report, report["rows"]["physformer"], served, "physformer",
                   report["eval_config"]["mc_samples"])


def rewrite_metadata(path: Path, card: ModelCard) -> None:
    """Replace the model file's metadata with ``card`` (the graph is untouched)."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in sorted(card.to_metadata_props().items()):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def summary(report: Mapping[str, Any]) -> str:
    """One line on the served check of a report: how many numbers, and the worst difference."""
    check = report.get("served_vs_torch")
    if not check:
        return "served path: not measured"
    rows = check["rows"]
    worst = max(rows, key=lambda p: abs(rows[p]["diff"]) / (abs(rows[p]["torch"]) + 1e-12), default=None)
    text = (f"served path (the exported graph behind the runtime, raw test spectra): {len(rows)} numbers, "
            f"{len(check['failures'])} outside tolerance")
    if worst is not None:
        w = rows[worst]
        text += f"; largest relative difference {worst}: torch {w['torch']:.4g}, served {w['served']:.4g}"
    return text
