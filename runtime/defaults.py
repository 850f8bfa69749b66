"""The default model repository: the models shipped in the package, or the cache's own build.

The package ships ready models (``runtime/models/``, package data): rbm, spt, physformer,
physformer-generate and the int8/fp16 variants, built by ``specserve models build`` with the
default configurations and fixed seeds, then copied in by ``specserve models ship``. Beside them,
``MANIFEST.json`` records when and how they were built, the sha256 and size of every file, and
each model's headline test metrics.

``specserve models build`` (``make models``) writes ``<cache>/models``. When both repositories
hold the default models, the newer build is served (:func:`default_repository` says which and
why); ``--repository`` always overrides.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from specserve.runtime.datakit import models_dir
from specserve.runtime.errors import DatasetError

SHIPPED = Path(__file__).resolve().parent / "models"
MANIFEST = "MANIFEST.json"
DEFAULT_MODELS = ("rbm", "spt", "physformer")
"""What ``specserve models build`` builds by default; physformer comes with physformer-generate."""
SIZE_BUDGET = 40 * 2**20
"""The shipped repository, every file together, at most (bytes)."""


def repository_models(name: str) -> tuple[str, ...]:
    """The repository models that building ``name`` makes (without variants)."""
    return (name, f"{name}-generate") if name == "physformer" else (name,)


def missing_models(repository: Path, names: tuple[str, ...] = DEFAULT_MODELS) -> list[str]:
    """The repository models of ``names`` without a model file in ``repository``."""
    return [m for name in names for m in repository_models(name)
            if not any(p.is_file() for p in (repository / m).glob("[0-9]*/model.onnx"))]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: Path = SHIPPED) -> dict:
    """The manifest of a shipped repository; :class:`DatasetError` if there is none or it is unreadable."""
    path = folder / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{path}: no manifest (the shipped models are written by `specserve models ship`)") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON: {exc}") from None


def verify_manifest(folder: Path = SHIPPED) -> list[str]:
    """What is wrong with a shipped repository against its manifest (empty: nothing): files
    missing, changed or unlisted, sizes, and the total against :data:`SIZE_BUDGET`."""
    manifest = read_manifest(folder)
    problems = []
    listed = manifest.get("files", {})
    for rel, entry in sorted(listed.items()):
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel}: listed but missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{rel}: {path.stat().st_size} bytes, the manifest says {entry['bytes']}")
        elif sha256(path) != entry["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest")
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}
    problems += [f"{rel}: not in the manifest" for rel in sorted(present - set(listed))]
    total = sum(entry["bytes"] for entry in listed.values())
    if total != manifest.get("total_bytes"):
        problems.append(f"total_bytes {manifest.get('total_bytes')} but the files add up to {total}")
    if total > SIZE_BUDGET:
        problems.append(f"{total / 2**20:.1f} MiB, over the budget of {SIZE_BUDGET / 2**20:.0f} MiB")
    return problems


def _stamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(seconds))


def _built(repository: Path) -> float:
    """When a repository's newest model file was written (seconds since the epoch)."""
    return max(p.stat().st_mtime for p in repository.glob("*/[0-9]*/model.onnx"))


@dataclass(frozen=True)
class RepositoryChoice:
    path: Path
    reason: str
    shipped: bool


def default_repository(cache: str | os.PathLike | None = None, shipped: Path = SHIPPED) -> RepositoryChoice:
    """The repository to serve when none is named: the cache's (``<cache>/models``) when it holds
    every default model and was built after the shipped models, else the shipped models. With
    neither, the cache's path (loading it then says what is missing)."""
    own = models_dir(cache)
    has_shipped = (shipped / MANIFEST).is_file()
    lacking = missing_models(own) if own.is_dir() else None
    if not has_shipped:
        reason = "no shipped models in this installation"
        if lacking:
            reason += f"; {own} lacks {', '.join(lacking)} (`specserve models build` builds them)"
        elif lacking is None:
            reason += f" and no {own} (`specserve models build` builds it)"
        return RepositoryChoice(own, reason, shipped=False)
    manifest = read_manifest(shipped)
    built = manifest["built"]
    label = f"the shipped models (built {built['at']}, commit {built.get('commit', '?')[:10]})"
    if lacking is None:
        return RepositoryChoice(shipped, f"{label}: there is no {own}", shipped=True)
    if lacking:
        return RepositoryChoice(shipped, f"{label}: {own} lacks {', '.join(lacking)}", shipped=True)
    own_built = _built(own)
    if own_built > built["unix"]:
        return RepositoryChoice(own, f"{own} (built {_stamp(own_built)}) is newer than {label}", shipped=False)
    return RepositoryChoice(shipped, f"{label} are newer than {own} (built {_stamp(own_built)})", shipped=True)
