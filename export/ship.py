"""``specserve models ship``: copy a built repository into the package as its shipped models.

The shipped repository (:data:`specserve.runtime.defaults.SHIPPED`, ``runtime/models/`` in the
source tree) holds the newest version of every default model and variant as version 1, their
``config.pbtxt`` and README, and ``MANIFEST.json``: when and how they were built, the sha256 and
size of every file, the total against the 40 MiB budget, and each model's headline test metrics
(served path, from its card). Refreshing the shipped copy (``make ship-models``)::

    specserve models build --cache /tmp/ship-cache
    specserve models ship --from /tmp/ship-cache/models

then commit ``runtime/models``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from specserve.runtime.contract import ModelCard
from specserve.runtime.defaults import (
    DEFAULT_MODELS,
    MANIFEST,
    SHIPPED,
    SIZE_BUDGET,
    missing_models,
    repository_models,
    sha256,
)
from specserve.runtime.errors import SpecserveError
from specserve.runtime.kinds import VARIANTS, with_variant
from specserve.runtime.layout import model_folders, model_versions

BUILD_COMMAND = "specserve models build --cache <empty folder>; specserve models ship --from <cache>/models"


def card_headline(card: ModelCard) -> dict[str, Any]:
    """A model's headline test metrics from its card (the served path's numbers)."""
    metrics = card.metrics
    variant = metrics.get("variant")
    if variant:
        accuracy = variant.get("accuracy") or {}
        return {"variant_of": variant["of"], "precision": variant["precision"],
                "size_ratio": round(variant["size_ratio"], 4), **accuracy.get("variant", {}),
                "delta_vs_fp32": accuracy.get("delta", {}), "within_limits": accuracy.get("within_limits")}
    if card.kind == "rbm":
        rows = metrics["rbm"]
        return {"accuracy": rows["accuracy"], "fpr_real_non_cv": rows["fpr_real_non_cv"], "n_test": metrics["n_test"]}
    if card.kind == "spt":
        rows = metrics["spt"]
        return {"mape_age": rows["mape_age"], "mape_mass": rows["mape_mass"],
                "coverage_1sigma": rows["coverage_1sigma"], "n_test": metrics["n_test"]}
    return {"fgk_mae": metrics["fgk_mae"]["physformer"], "fgk_teff_mae_vs_snr": metrics["fgk_teff_mae_vs_snr"],
            "n_test": metrics["n_test"]}


def _card(onnx_file: Path) -> ModelCard:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    return ModelCard.from_metadata_props(session.get_modelmeta().custom_metadata_map)


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except OSError:
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def ship(source: Path, target: Path = SHIPPED, command: str = BUILD_COMMAND) -> dict:
    """Replace ``target`` by the default models and variants of ``source`` (newest versions,
    renumbered 1) and their manifest (``command``: how ``source`` was built); returns the manifest.
    :class:`SpecserveError` when a default model is missing or the copy is over :data:`SIZE_BUDGET`."""
    lacking = missing_models(source)
    if lacking:
        raise SpecserveError(f"{source} lacks {', '.join(lacking)} (`specserve models build` builds them)")
    names = [m for base in DEFAULT_MODELS for m in repository_models(base)]
    names += [with_variant(base, p) for base in DEFAULT_MODELS for p in VARIANTS
              if (source / with_variant(base, p)).is_dir()]
    staging = Path(tempfile.mkdtemp(prefix="specserve-ship-", dir=target.parent))
    models, files = {}, {}
    for name in names:
        folder = source / name
        newest = model_versions(folder)[0]
        onnx_file = folder / str(newest) / "model.onnx"
        card = _card(onnx_file)
        (staging / name / "1").mkdir(parents=True)
        shutil.copy2(onnx_file, staging / name / "1" / "model.onnx")
        shutil.copy2(folder / "config.pbtxt", staging / name / "config.pbtxt")
        readme = folder / "README.md"
        if readme.is_file():
            (staging / name / "README.md").write_text(readme.read_text().replace(f"(version {newest})", "(version 1)"))
        models[name] = {"kind": card.kind, "built_as_version": newest, "training_data": card.training_fingerprint,
                        "headline": card_headline(card)}
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        files[path.relative_to(staging).as_posix()] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
    total = sum(f["bytes"] for f in files.values())
    if total > SIZE_BUDGET:
        shutil.rmtree(staging)
        raise SpecserveError(f"{source}: {total / 2**20:.1f} MiB, over the shipped budget of {SIZE_BUDGET / 2**20:.0f} MiB")
    built = max((source / m / str(model_versions(source / m)[0]) / "model.onnx").stat().st_mtime for m in names)
    manifest = {
        "built": {"at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(built)), "unix": built,
                  "commit": _commit(), "from": str(source), "command": command},
        "models": models, "files": files, "total_bytes": total, "budget_bytes": SIZE_BUDGET,
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return manifest


def summary(manifest: dict) -> str:
    lines = [f"{len(manifest['models'])} models, {manifest['total_bytes'] / 2**20:.1f} MiB "
             f"(budget {manifest['budget_bytes'] / 2**20:.0f} MiB), built {manifest['built']['at']}"]
    for name, entry in manifest["models"].items():
        size = sum(f["bytes"] for rel, f in manifest["files"].items() if rel.startswith(f"{name}/"))
        flat = {f"{k}.{sub}" if isinstance(v, dict) else k: w for k, v in entry["headline"].items()
                for sub, w in (v.items() if isinstance(v, dict) else [(None, v)])}
        numbers = ", ".join(f"{k} {v:.4g}" for k, v in flat.items() if isinstance(v, float))
        lines.append(f"  {name:22s} {size / 2**20:5.2f} MiB  {numbers}")
    return "\n".join(lines)


def shipped_models() -> list[str]:
    """The model names of the shipped repository."""
    return [p.name for p in model_folders(SHIPPED)] if SHIPPED.is_dir() else []
