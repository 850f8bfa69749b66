"""torch -> ONNX export with validation against the model contract.

``export_model`` writes ``model.onnx`` for a torch module whose ``forward`` takes the contract's
inputs in order and returns its outputs in order. The file gets the runtime's
:class:`~specserve.runtime.contract.ModelCard` as ``metadata_props`` and an explicit IR version
that ONNX Runtime accepts. ``validate_export`` runs after every export and raises
:class:`~specserve.runtime.errors.ExportError` unless all of these hold, checked in this order:

1. ``onnx.checker`` full check (with shape inference);
2. only standard-domain operators, every one of them in the allowed set when one is given;
3. the session's input/output names, dtypes and dynamic axes match the contract;
4. the metadata parses back to the same model card;
5. torch and ONNX Runtime outputs agree within ``atol + rtol * |torch|`` at every batch size
   (1, 3 and 64 by default; ``check_parity=False`` skips it for graphs with random operators,
   which their exporter checks statistically, see :mod:`specserve.export.spt`).

The legacy TorchScript exporter is used (``dynamo=False``): the dynamo exporter needs onnxscript
and constant-folds random ops, which MC-dropout models must keep.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from specserve.runtime.contract import ModelCard
from specserve.runtime.errors import ContractError, ExportError

log = logging.getLogger(__name__)

OPSET = 17
"""Opset of exported graphs (<= 21: RandomUniformLike/Bernoulli lack CPU kernels beyond it)."""
IR_VERSION = 8
"""IR version written explicitly (onnx 1.23 would write 14, which onnxruntime 1.31 rejects)."""
BATCH_SIZES = (1, 3, 64)


@dataclass
class ExportReport:
    path: Path
    opset: int
    ir_version: int
    op_types: list[str]
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    atol: float = 0.0
    rtol: float = 0.0

    def summary(self) -> str:
        diffs = ", ".join(f"{k} {v:.2e}" for k, v in sorted(self.max_abs_diff.items()))
        return (f"{self.path}: opset {self.opset}, IR {self.ir_version}, {len(self.op_types)} op types; "
                f"torch vs ORT max |diff| {diffs} (tolerance {self.atol:g} + {self.rtol:g}*|x|)")


def load_run(run_dir: str | Path, kind: str, label: str) -> tuple[dict, dict | None]:
    """A training run's checkpoint (which must hold a ``kind`` model, ``label`` for messages) and
    its report.json (None, with a warning, when the run has none)."""
    import json

    from specserve.training.trainer import CHECKPOINT_NAME, load_checkpoint

    run_dir = Path(run_dir)
    path = run_dir / CHECKPOINT_NAME
    if not path.is_file():
        raise ExportError(f"no {CHECKPOINT_NAME} in {run_dir}")
    checkpoint = load_checkpoint(path)
    if checkpoint.get("model_kind") != kind:
        raise ExportError(f"{path} holds a {checkpoint.get('model_kind')!r} model, not {label}")
    report_path = run_dir / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    if report is None:
        log.warning("%s has no report.json: the model card will carry no metrics", run_dir)
    return checkpoint, report


def export_model(module: torch.nn.Module, card: ModelCard, path: str | Path, *, atol: float, rtol: float,
                 batch_sizes: Iterable[int] = BATCH_SIZES, allowed_ops: set[str] | None = None,
                 opset: int = OPSET, check_parity: bool = True) -> ExportReport:
    """Export ``module`` to ``path`` with ``card`` as metadata, then validate (see module doc)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    contract = card.contract
    dummy = contract.dummy_inputs(card.dims, batch=2)
    args = tuple(torch.from_numpy(dummy[name]) for name in contract.input_names)
    module = module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module, args, str(path), input_names=contract.input_names,
            output_names=contract.output_names, dynamic_axes=contract.dynamic_axes(),
            opset_version=opset, dynamo=False, do_constant_folding=True,
        )
    model = onnx.load(str(path))
    model.ir_version = IR_VERSION
    decompose_softmax(model)
    _name_dims(model, card)
    del model.metadata_props[:]
    for key, value in sorted(card.to_metadata_props().items()):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return validate_export(path, module, card, atol=atol, rtol=rtol,
                           batch_sizes=batch_sizes if check_parity else (), allowed_ops=allowed_ops)


def decompose_softmax(model: onnx.ModelProto) -> int:
    """Rewrite every Softmax over a negative axis other than the last as ``exp(x - max) / sum(exp(x - max))``
    with ReduceMax and ReduceSum over that axis; returns how many were rewritten.

    The Hadamard attention normalises over the tokens, axis -2 of (B, H, N, d). ONNX Runtime's
    CPU Softmax works on the last axis and transposes the tensor there and back for any other,
    while its reductions run along any axis in place: on the SPT at batch 64 (one thread) the
    rewritten graph runs in 24 ms instead of 31 ms, with the same values (the subtraction of the
    maximum is what Softmax itself does)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), OPSET)
    taken = {i.name for i in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
    nodes, rewritten = [], 0
    for node in model.graph.node:
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        if node.op_type != "Softmax" or axis >= -1:  # the last axis (or a positive one, rank unknown here)
            nodes.append(node)
            continue
        rewritten += 1
        x, y, name = node.input[0], node.output[0], node.name or f"softmax_{rewritten}"
        while f"{name}/axes" in taken or f"{name}/exp" in taken:  # names new to the graph
            name += "_"
        taken |= {f"{name}/axes", f"{name}/exp"}
        axes = f"{name}/axes"
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([axis], np.int64), axes))
        reduce_max = (onnx.helper.make_node("ReduceMax", [x, axes], [f"{name}/max"], name=f"{name}/ReduceMax", keepdims=1)
                      if opset >= 18 else
                      onnx.helper.make_node("ReduceMax", [x], [f"{name}/max"], name=f"{name}/ReduceMax", axes=[axis], keepdims=1))
        nodes += [
            reduce_max,
            onnx.helper.make_node("Sub", [x, f"{name}/max"], [f"{name}/shifted"], name=f"{name}/Sub"),
            onnx.helper.make_node("Exp", [f"{name}/shifted"], [f"{name}/exp"], name=f"{name}/Exp"),
            onnx.helper.make_node("ReduceSum", [f"{name}/exp", axes], [f"{name}/sum"], name=f"{name}/ReduceSum", keepdims=1),
            onnx.helper.make_node("Div", [f"{name}/exp", f"{name}/sum"], [y], name=f"{name}/Div"),
        ]
    if rewritten:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return rewritten


def without_randomness(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose RandomUniformLike draws are all 0.5 (MC dropout keeps every unit): two graphs
    of one MC model can then be compared value for value."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    half = "without_randomness/half"
    copy.graph.initializer.append(onnx.numpy_helper.from_array(np.array(0.5, np.float32), half))
    nodes = []
    for node in copy.graph.node:
        if node.op_type != "RandomUniformLike":
            nodes.append(node)
            continue
        zero = f"{node.output[0]}/zero"
        nodes += [onnx.helper.make_node("Sub", [node.input[0], node.input[0]], [zero]),
                  onnx.helper.make_node("Add", [zero, half], [node.output[0]])]
    del copy.graph.node[:]
    copy.graph.node.extend(nodes)
    return copy


def rewrite_exported(src: str | Path, dst: str | Path, atol: float = 1e-4, rtol: float = 1e-3,
                     batch_sizes: Iterable[int] = (1, 16)) -> int:
    """Apply the export's graph rewrites (:func:`decompose_softmax`) to an already exported file,
    for a model whose training run is gone; the rewritten graph must give the original's outputs
    (randomness off on both sides, :func:`without_randomness`) within ``atol + rtol |x|`` at each
    batch size, else ExportError. Returns how many nodes were rewritten (0: nothing written)."""
    model = onnx.load(str(src))
    rewritten = decompose_softmax(model)
    if not rewritten:
        return 0
    onnx.checker.check_model(model, full_check=True)
    card = ModelCard.from_metadata_props({p.key: p.value for p in model.metadata_props})
    sessions = [ort.InferenceSession(without_randomness(m).SerializeToString(), providers=["CPUExecutionProvider"])
                for m in (onnx.load(str(src)), model)]
    names = card.contract.output_names
    for batch in batch_sizes:
        feed = card.contract.dummy_inputs(card.dims, batch=batch)
        for name, a, b in zip(names, *(s.run(names, feed) for s in sessions)):
            worst = float(np.max(np.abs(a - b) / (atol + rtol * np.abs(a)))) if a.size else 0.0
            if worst > 1.0:
                raise ExportError(f"{src}: the rewritten graph's {name!r} differs at batch {batch} "
                                  f"({worst:.2f} of the allowance)")
    onnx.save(model, str(dst))
    return rewritten


def _name_dims(model: onnx.ModelProto, card: ModelCard) -> None:
    """Write the contract's shapes onto the graph's inputs and outputs: fixed sizes as numbers,
    dynamic axes under their contract names (the exporter invents names like ``Expmean_dim_1``)."""
    specs = {t.name: t for t in card.contract.inputs + card.contract.outputs}
    for value in list(model.graph.input) + list(model.graph.output):
        spec = specs.get(value.name)
        if spec is None:
            continue
        dims = value.type.tensor_type.shape.dim
        for dim, want in zip(dims, spec.resolve(card.dims)):
            if isinstance(want, int):
                dim.dim_value = want
            else:
                dim.dim_param = want


def op_types(model: onnx.ModelProto) -> list[str]:
    return sorted({node.op_type for node in model.graph.node})


def validate_export(path: str | Path, module: torch.nn.Module, card: ModelCard, *, atol: float, rtol: float,
                    batch_sizes: Iterable[int] = BATCH_SIZES,
                    allowed_ops: set[str] | None = None) -> ExportReport:
    path = Path(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"{path}: onnx.checker rejected the model: {exc}") from exc
    model = onnx.load(str(path))
    custom = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if custom:
        raise ExportError(f"{path}: non-standard operators {custom}")
    ops = op_types(model)
    if allowed_ops is not None and set(ops) - allowed_ops:
        raise ExportError(f"{path}: operators outside the allowed set: {sorted(set(ops) - allowed_ops)}")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    contract = card.contract
    try:
        contract.validate_session(session, card.dims)
        parsed = ModelCard.from_metadata_props(session.get_modelmeta().custom_metadata_map)
    except ContractError as exc:
        raise ExportError(f"{path}: {exc}") from exc
    if parsed != card:
        raise ExportError(f"{path}: metadata does not parse back to the exported model card")
    report = ExportReport(path, model.opset_import[0].version, model.ir_version, ops, atol=atol, rtol=rtol)
    module = module.eval()
    for batch in batch_sizes:
        inputs = contract.dummy_inputs(card.dims, batch=batch, seed=batch)
        with torch.no_grad():
            expected = module(*(torch.from_numpy(inputs[n]) for n in contract.input_names))
        if isinstance(expected, torch.Tensor):
            expected = (expected,)
        got = session.run(contract.output_names, inputs)
        for name, want, have in zip(contract.output_names, expected, got):
            want = want.numpy()
            if want.shape != have.shape:
                raise ExportError(f"{path}: output {name!r} at batch {batch} has shape {have.shape}, torch gives {want.shape}")
            diff = np.abs(want.astype(np.float64) - have)
            bad = diff > atol + rtol * np.abs(want)
            report.max_abs_diff[name] = max(report.max_abs_diff.get(name, 0.0), float(diff.max()))
            if bad.any():
                raise ExportError(
                    f"{path}: output {name!r} at batch {batch}: {int(bad.sum())} values differ from torch by more "
                    f"than {atol:g} + {rtol:g}*|x| (max |diff| {diff.max():.3g})"
                )
    log.info("%s", report.summary())
    return report
