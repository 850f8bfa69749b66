"""Model repository writer in Triton's layout.

``<repo>/<model>/config.pbtxt`` (onnxruntime backend, inputs/outputs from the contract with the
batch axis left to ``max_batch_size`` when every tensor leads with it, else ``max_batch_size: 0``
and -1 for every dynamic axis), ``<repo>/<model>/<version>/model.onnx`` and
``<repo>/<model>/README.md`` (a model card for people). The same folder can be served by
``specserve serve`` or by Triton Inference Server.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from specserve.runtime import dtypes
from specserve.runtime.batching import DEFAULT_MAX_QUEUE_SIZE
from specserve.runtime.contract import BATCH, DYNAMIC_DIMS, ModelCard, TensorSpec

DEFAULT_MAX_BATCH_SIZE = 256
MAX_MC_BATCH_ROWS = 64


def _batched(tensors: tuple[TensorSpec, ...]) -> bool:
    """True when every tensor's first axis is the batch (Triton's max_batch_size > 0 convention)."""
    return all(t.shape[:1] == (BATCH,) for t in tensors)


def _tensor_block(tensors: tuple[TensorSpec, ...], dims: dict[str, int], batched: bool) -> str:
    entries = []
    for t in tensors:
        resolved = t.resolve(dims)[1:] if batched else t.resolve(dims)
        shape = [-1 if d in DYNAMIC_DIMS else d for d in resolved]
        entries.append(
            "  {\n"
            f'    name: "{t.name}"\n'
            f"    data_type: TYPE_{dtypes.from_name(t.dtype).kserve}\n"
            f"    dims: [ {', '.join(str(d) for d in shape)} ]\n"
            "  }"
        )
    return "[\n" + ",\n".join(entries) + "\n]"


def config_pbtxt(name: str, card: ModelCard, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 max_queue_delay_us: int = 0, max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE) -> str:
    """Triton's config for the model. The batching fields are what ``specserve serve`` reads
    (:class:`specserve.runtime.batching.BatchingConfig`). A model whose tensors do not all lead
    with the batch axis gets ``max_batch_size: 0`` (Triton's "no batch axis") and its row limit
    in the ``specserve_max_batch_rows`` parameter."""
    contract, dims = card.contract, card.dims
    batched = _batched(contract.inputs + contract.outputs)
    rows_parameter = "" if batched else (  # MC models tile every row n_samples times: fewer rows
        'parameters {\n  key: "specserve_max_batch_rows"\n'
        f'  value: {{ string_value: "{min(max_batch_size, MAX_MC_BATCH_ROWS)}" }}\n}}\n')
    return (
        f'name: "{name}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch_size if batched else 0}\n"
        f"input {_tensor_block(contract.inputs, dims, batched)}\n"
        f"output {_tensor_block(contract.outputs, dims, batched)}\n"
        "dynamic_batching {\n"
        f"  max_queue_delay_microseconds: {max_queue_delay_us}\n"
        f"  default_queue_policy {{ max_queue_size: {max_queue_size} }}\n"
        "}\n"
        + rows_parameter
    )


def model_readme(name: str, version: int, card: ModelCard) -> str:
    grid = card.preprocessing.grid
    lines = [
        f"# {name} (version {version})",
        "",
        card.description or f"A specserve `{card.kind}` model.",
        "",
        f"- kind: `{card.kind}`; contract version {card.contract_version}",
        f"- grid: log-linear, {grid.length} pixels from {grid.wavelength[0]:.1f} to {grid.wavelength[-1]:.1f} A"
        f" (vacuum), R {grid.resolution:g}",
    ]
    if card.class_names:
        lines.append(f"- classes: {', '.join(card.class_names)}")
    if card.label_names:
        units = card.label_units or ("",) * len(card.label_names)
        lines.append("- labels: " + ", ".join(f"{n} [{u}]" for n, u in zip(card.label_names, units)))
    if card.training_fingerprint:
        lines.append(f"- training data: `{card.training_fingerprint}`")
    if card.metrics:
        lines += ["", "## Metrics", "", "```json", json.dumps(card.metrics, indent=2, sort_keys=True), "```"]
    return "\n".join(lines) + "\n"


def write_model(repo: str | Path, name: str, version: int, onnx_file: str | Path, card: ModelCard,
                max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, max_queue_delay_us: int = 0,
                max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE) -> Path:
    """Copy a validated ``model.onnx`` into the repository; returns the version folder."""
    if version < 1:
        raise ValueError(f"model versions start at 1, got {version}")
    model_dir = Path(repo) / name
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    target = version_dir / "model.onnx"
    tmp = version_dir / ".model.onnx.tmp"
    shutil.copyfile(onnx_file, tmp)
    os.replace(tmp, target)  # a watcher never sees a half-written model
    (model_dir / "config.pbtxt").write_text(config_pbtxt(name, card, max_batch_size, max_queue_delay_us,
                                                         max_queue_size))
    (model_dir / "README.md").write_text(model_readme(name, version, card))
    return version_dir
