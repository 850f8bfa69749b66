"""Reduced-precision variants of an exported model: ``<model>-int8`` and ``<model>-fp16``, each its
own model in the repository, with its ``config.pbtxt`` and a card that says what it is and what it
costs in accuracy, measured at export.

- ``int8``: ONNX Runtime's dynamic quantization (``quantize_dynamic``: int8 weights of every
  MatMul and Gemm, activations quantized per run), chosen over static QDQ because it needs no
  calibration set to go stale and keeps the graph's random ops and the flux layer untouched;
  the large float matrices it leaves (PhysFormer's line basis, position embeddings) are stored as
  int8 with a scale per row and dequantized to float32 in the graph, large vectors as float16.
- ``fp16``: every large float32 weight stored as float16 and cast back to float32 in the graph,
  so all arithmetic stays float32: the flux layer's exponentials and optical depths, the RBM's
  free-energy sums and the MC statistics keep their precision (onnxruntime's float16 converter,
  tried on these graphs, left duplicate node names in the RBM and SPT and NaN in PhysFormer's
  chi-square). The file is half the size; on a GPU the weights load as fp16.

Each variant is validated against fp32 (:func:`parity`): the same inputs through both sessions,
outputs within :data:`PARITY` of the fp32 outputs' scale (MC estimates also within their MC
error, since the two sessions draw their own dropout masks);
then the model's report rows are measured again through the variant behind the runtime on the raw
test spectra (:data:`specserve.export.served.SERVED_ROWS`; for the MC models the means of
:data:`MC_DRAWS` draws on each side), and the headline differences go into its card
(``metrics.variant``), with their MC standard errors, next to the limits of :data:`ACCURACY_LIMITS`.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from specserve.runtime.contract import ModelCard
from specserve.runtime.errors import ExportError
from specserve.runtime.kinds import VARIANTS, with_variant

log = logging.getLogger(__name__)

MIN_WEIGHT = 1024
"""Float initializers with at least this many values are stored in reduced precision."""
PARITY = {"int8": 0.05, "fp16": 0.01}
"""Largest |variant - fp32| of any output, relative to the largest |fp32| of that output."""
ACCURACY_LIMITS = {
    "rbm": {"accuracy_drop": 0.005, "max_fpr_real_non_cv": 0.01},
    "spt": {"mape_rise_points": 0.5},
    "physformer": {"fgk_teff_mae_rise_k": 5.0, "min_in_box_fraction": 1.0},
}
"""Issue 17's accuracy targets of a variant against its fp32 model (served path, test split)."""


def _store_weights(model, skip: set[str] = frozenset(), int8_matrices: bool = False) -> int:
    """Store each large float32 initializer (not in ``skip``) in reduced precision, restored to
    float32 in the graph under its original name, so every consumer still computes in float32:
    as float16 and a Cast, or (``int8_matrices``) a matrix as int8 with one scale per row (its
    largest magnitude / 127) and a DequantizeLinear. Vectors (wavelengths, biases) stay float16
    either way. Returns the number stored."""
    from onnx import TensorProto, helper, numpy_helper

    replaced, nodes = [], []
    for init in model.graph.initializer:
        if init.data_type != TensorProto.FLOAT or init.name in skip:
            continue
        array = numpy_helper.to_array(init)
        if array.size < MIN_WEIGHT:
            continue
        if int8_matrices and array.ndim >= 2:
            rows = array.reshape(array.shape[0], -1)
            scale = (np.maximum(np.abs(rows).max(axis=1), np.finfo(np.float32).tiny) / 127.0).astype(np.float32)
            values = np.clip(np.rint(rows / scale[:, None]), -127, 127).astype(np.int8).reshape(array.shape)
            stored = [numpy_helper.from_array(values, f"{init.name}__int8"),
                      numpy_helper.from_array(scale, f"{init.name}__scale"),
                      numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{init.name}__zero")]
            nodes.append(helper.make_node("DequantizeLinear", [t.name for t in stored], [init.name], axis=0,
                                          name=f"{init.name}__to_fp32"))
        else:
            stored = [numpy_helper.from_array(array.astype(np.float16), f"{init.name}__fp16")]
            nodes.append(helper.make_node("Cast", [stored[0].name], [init.name], to=TensorProto.FLOAT,
                                          name=f"{init.name}__to_fp32"))
        replaced.append((init, stored))
    for init, stored in replaced:
        model.graph.initializer.remove(init)
        model.graph.initializer.extend(stored)
    for node in reversed(nodes):
        model.graph.node.insert(0, node)
    return len(replaced)


def _finish_graph(model, src) -> None:
    """The fp32 file's metadata, IR version and opsets on a variant graph."""
    del model.metadata_props[:]
    model.metadata_props.extend(src.metadata_props)
    model.ir_version = src.ir_version


def build_variant(fp32_path: Path, precision: str, out_path: Path) -> Path:
    """Write the ``precision`` variant of ``fp32_path`` to ``out_path``."""
    import onnx

    out_path.parent.mkdir(parents=True, exist_ok=True)
    src = onnx.load(str(fp32_path))
    if precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(fp32_path), str(out_path), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm"])
        model = onnx.load(str(out_path))
        quantized = {i.name for i in model.graph.initializer if i.data_type != onnx.TensorProto.FLOAT}
        _store_weights(model, quantized, int8_matrices=True)
        del model.graph.value_info[:]  # the quantizer's shape annotations: ONNX Runtime infers its own
    elif precision == "fp16":
        model = src
        src = onnx.load(str(fp32_path))
        _store_weights(model)
    else:
        raise ExportError(f"unknown variant {precision!r} (known: {', '.join(VARIANTS)})")
    _finish_graph(model, src)
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))
    return out_path


def _example_inputs(card: ModelCard, rng: np.random.Generator, batch: int = 16) -> dict[str, np.ndarray]:
    """Inputs like real ones: normalised flux around 1 with noise, the MC defaults, a fixed seed."""
    inputs = {}
    for spec in card.contract.inputs:
        shape = [batch if d == "batch" else d for d in spec.resolve(card.dims)]
        if spec.name == "n_samples":
            inputs[spec.name] = np.array([int(card.normalisation.get("mc_samples", {}).get("default", 8))], np.int64)
        elif spec.name == "seed":
            inputs[spec.name] = np.array([0.375], np.float32)
        elif spec.name == "ivar":
            inputs[spec.name] = np.full(shape, 1e4, np.float32)
        elif spec.name == "flux":
            inputs[spec.name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:  # parameters of the generator: the middle of the box
            lo = np.array([card.bounds[n][0] for n in card.label_names], np.float32)
            hi = np.array([card.bounds[n][1] for n in card.label_names], np.float32)
            inputs[spec.name] = np.broadcast_to(lo + (hi - lo) * rng.uniform(0.3, 0.7, (shape[0], lo.size)),
                                                shape).astype(np.float32)
    return inputs


MC_ESTIMATES = {"spt": ("mean", "std"), "physformer": ("parameters", "parameters_std")}
"""The MC outputs compared for the MC models: their dropout masks differ from session to session,
so the variant's estimates are compared with fp32's within the MC error of T samples."""
MC_K = 5.0
MC_DRAWS = 5
"""The MC models' served rows are measured this many times for fp32 and for each variant (fresh
dropout masks each time) and judged on the means: one draw of PhysFormer's FGK Teff MAE moves by
1-6 K between draws (164-167 K for fp32, 161-173 K for int8 in three draws each), as much as its
5 K limit."""


def parity(fp32_path: Path, variant_path: Path, card: ModelCard, precision: str) -> dict[str, float]:
    """Per output, the largest |variant - fp32| over its allowance: :data:`PARITY` times the fp32
    output's largest magnitude, plus for MC estimates ``MC_K * std * sqrt(2 / T)`` at the model's
    largest T (the two sides draw independent masks). ExportError above 1."""
    import onnxruntime as ort

    inputs = _example_inputs(card, np.random.default_rng(0))
    mc = MC_ESTIMATES.get(card.kind)
    if mc is not None:
        inputs["n_samples"] = np.array([int(card.normalisation["mc_samples"]["max"])], np.int64)
    outputs = {}
    for key, path in (("fp32", fp32_path), ("variant", variant_path)):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs[key] = dict(zip(card.contract.output_names, session.run(None, inputs)))
    compared = mc if mc is not None else card.contract.output_names
    ratio = {}
    for name in compared:
        ref, got = outputs["fp32"][name], outputs["variant"][name]
        if not np.array_equal(np.isfinite(ref), np.isfinite(got)):
            raise ExportError(f"{precision} variant: output {name!r} is not finite where fp32 is")
        finite = np.isfinite(ref)
        allowance = PARITY[precision] * (float(np.max(np.abs(ref[finite]))) if finite.any() else 0.0)
        if mc is not None:
            t = float(inputs["n_samples"][0])
            allowance = allowance + MC_K * outputs["fp32"][mc[1]][finite] * np.sqrt(2.0 / t)
        diff = np.abs(got[finite] - ref[finite])
        ratio[name] = float(np.max(diff / np.maximum(allowance, 1e-12))) if diff.size else 0.0
    worst = max(ratio, key=ratio.get)
    if ratio[worst] > 1.0:
        raise ExportError(f"{precision} variant: output {worst!r} differs from fp32 by {ratio[worst]:.3g} times "
                          "its allowance")
    return ratio


def headline(kind: str, rows: Mapping[str, Any]) -> dict[str, float]:
    """The numbers a variant is judged by, from a report's served rows."""
    if kind == "rbm":
        return {"accuracy": rows["accuracy"], "fpr_real_non_cv": rows["fpr_real_non_cv"]}
    if kind == "spt":
        return {"mape_age": rows["mape_age"], "mape_mass": rows["mape_mass"],
                "coverage_age": rows["coverage_1sigma"]["age"], "coverage_mass": rows["coverage_1sigma"]["mass"]}
    native = rows["native"]
    return {"fgk_teff_mae": native["fgk"]["mae"]["teff"], "in_box_fraction": native["in_box_fraction"]}


def _mean(draws: Sequence[Mapping[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """The mean of each headline number over ``draws`` and its standard error (0 for one draw)."""
    values = {k: np.array([d[k] for d in draws], dtype=float) for k in draws[0]}
    n = len(draws)
    return ({k: float(v.mean()) for k, v in values.items()},
            {k: float(v.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0 for k, v in values.items()})


def judge(kind: str, fp32: Mapping[str, float], variant: Mapping[str, float]) -> dict[str, Any]:
    """The variant's headline against fp32's and against :data:`ACCURACY_LIMITS`."""
    limits = ACCURACY_LIMITS[kind]
    if kind == "rbm":
        checks = {"accuracy_drop": fp32["accuracy"] - variant["accuracy"] <= limits["accuracy_drop"],
                  "max_fpr_real_non_cv": variant["fpr_real_non_cv"] <= limits["max_fpr_real_non_cv"]}
    elif kind == "spt":
        rise = max(variant["mape_age"] - fp32["mape_age"], variant["mape_mass"] - fp32["mape_mass"])
        checks = {"mape_rise_points": rise <= limits["mape_rise_points"]}
    else:
        checks = {"fgk_teff_mae_rise_k": variant["fgk_teff_mae"] - fp32["fgk_teff_mae"] <= limits["fgk_teff_mae_rise_k"],
                  "min_in_box_fraction": variant["in_box_fraction"] >= limits["min_in_box_fraction"]}
    return {"fp32": dict(fp32), "variant": dict(variant),
            "delta": {k: variant[k] - fp32[k] for k in fp32}, "limits": limits, "checks": checks,
            "within_limits": all(checks.values())}


@dataclass
class VariantReport:
    name: str
    precision: str
    folder: Path
    size_ratio: float
    parity: dict[str, float]
    accuracy: dict[str, Any] | None

    def summary(self) -> str:
        text = (f"{self.name}: {self.size_ratio:.0%} of the fp32 file, outputs at "
                f"{max(self.parity.values()):.2g} of their allowance against fp32")
        if self.accuracy is not None:
            errors = self.accuracy.get("delta_error", {})
            delta = ", ".join(f"{k} {v:+.4g}" + (f" +- {errors[k]:.2g}" if errors.get(k) else "")
                              for k, v in self.accuracy["delta"].items())
            draws = self.accuracy.get("draws", 1)
            text += (f"; served test split vs fp32{f' (means of {draws} MC draws)' if draws > 1 else ''}: {delta} "
                     f"({'within' if self.accuracy['within_limits'] else 'OUTSIDE'} the limits)")
        return text


def export_variants(version_dir: Path, repository: Path, name: str, card: ModelCard, report: Mapping[str, Any] | None,
                    precisions: Sequence[str] = VARIANTS, draws: int | None = None) -> list[VariantReport]:
    """Build, validate, measure and write the variants of the exported ``<version_dir>/model.onnx``
    (model ``name`` of kind ``card.kind``) as ``<name>-<precision>`` models, same version number.
    ``report`` (the run's report with its served rows): measure the accuracy on the test split
    (MC models: ``draws`` draws a side, default :data:`MC_DRAWS`)."""
    from specserve.export.repository import write_model
    from specserve.export.served import SERVED_ROWS, rewrite_metadata

    fp32_path = version_dir / "model.onnx"
    version = int(version_dir.name)
    measured = report is not None and "served" in report and card.kind in SERVED_ROWS
    draws = (draws or MC_DRAWS) if card.kind in MC_ESTIMATES else 1

    def measure(path: Path) -> dict[str, float]:
        return headline(card.kind, SERVED_ROWS[card.kind](path, report)[0])

    if measured:  # the export's own served rows are fp32's first draw
        fp32_mean, fp32_error = _mean([headline(card.kind, report["served"])]
                                      + [measure(fp32_path) for _ in range(draws - 1)])
    reports = []
    for precision in precisions:
        build = Path(tempfile.mkdtemp(prefix="specserve-variant-")) / f"{name}-{precision}.onnx"
        build_variant(fp32_path, precision, build)
        rel = parity(fp32_path, build, card, precision)
        accuracy = None
        if measured:
            variant_mean, variant_error = _mean([measure(build) for _ in range(draws)])
            accuracy = judge(card.kind, fp32_mean, variant_mean)
            accuracy["draws"] = draws
            accuracy["delta_error"] = {k: float(np.hypot(fp32_error[k], variant_error[k])) for k in fp32_mean}
        size_ratio = build.stat().st_size / fp32_path.stat().st_size
        metrics = {**card.metrics, "variant": {"of": name, "precision": precision, "size_ratio": size_ratio,
                                               "parity": rel, "accuracy": accuracy}}
        variant_card = dataclasses.replace(card, metrics=metrics,
                                           description=f"{card.description} ({precision} variant of {name})".strip())
        rewrite_metadata(build, variant_card)
        variant_name = with_variant(name, precision)
        folder = write_model(repository, variant_name, version, build, variant_card)
        shutil.rmtree(build.parent, ignore_errors=True)
        result = VariantReport(variant_name, precision, folder, size_ratio, rel, accuracy)
        log.info("%s", result.summary())
        reports.append(result)
    return reports
