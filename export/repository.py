"""Writing an exported model into a repository: the version folder and ``config.pbtxt`` in
Triton's layout (their format has one home, :mod:`specserve.runtime.layout`) and
``<repo>/<model>/README.md``, a model card for people. The same folder can be served by
``specserve serve`` or by Triton Inference Server.
"""

from __future__ import annotations

import json
from pathlib import Path

from specserve.runtime.contract import ModelCard
from specserve.runtime.layout import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_QUEUE_SIZE,
    config_text,
    model_config,
    write_version,
)


def config_pbtxt(name: str, card: ModelCard, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 max_queue_delay_us: int = 0, max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE) -> str:
    """The text of the model's ``config.pbtxt`` (:func:`specserve.runtime.layout.model_config`)."""
    return config_text(model_config(name, card, max_batch_size, max_queue_delay_us, max_queue_size))


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
    version_dir = write_version(repo, name, version, onnx_file,
                                model_config(name, card, max_batch_size, max_queue_delay_us, max_queue_size))
    (Path(repo) / name / "README.md").write_text(model_readme(name, version, card))
    return version_dir
