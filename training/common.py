"""What the training commands of every model share: the ``train`` extra check, config
overrides from the command line, the benchmark sets from the cache, run folders, report names and
``--quick`` samples. Importing it imports neither torch, scikit-learn nor matplotlib."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from specserve.runtime.errors import DatasetError, SpecserveError

if TYPE_CHECKING:
    from specserve.training.benchsets import BenchmarkSet

log = logging.getLogger(__name__)

DEFAULT_THREADS = 2
"""torch CPU threads of a training or evaluation command."""
REPORT_JSON = "report.json"
REPORT_PNG = "report.png"
ONE_SIGMA = 0.6827
"""The fraction of a Gaussian within one standard deviation: the calibration target of MC spreads."""


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def require_training_extra(threads: int) -> None:
    missing = []
    for module in ("torch", "sklearn", "matplotlib", "tqdm"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise SpecserveError(f"training needs {', '.join(missing)}: pip install 'specserve[train]'")
    import torch

    torch.set_num_threads(max(1, threads))


def config_with_overrides(overrides: Mapping[str, str] | Sequence[tuple[str, str]], base: Any) -> Any:
    """``base`` (any config dataclass) with string overrides converted to each field's type."""
    kind_name = type(base).__name__.removesuffix("Config")
    fields = {f.name: f for f in dataclasses.fields(base)}
    values: dict[str, Any] = {}
    for key, text in dict(overrides).items():
        if key not in fields:
            raise SpecserveError(f"unknown {kind_name} setting {key!r}; known: {', '.join(fields)}")
        kind = type(getattr(base, key))
        try:
            if kind is bool:
                if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(text)
                values[key] = text.lower() in ("1", "true", "yes")
            else:
                values[key] = kind(text)
        except ValueError:
            raise SpecserveError(f"{kind_name} setting {key}: {text!r} is not a valid {kind.__name__}") from None
    try:
        return dataclasses.replace(base, **values)
    except ValueError as exc:
        raise SpecserveError(f"invalid {kind_name} settings: {exc}") from exc


def load_set(name: str, cache: Path | None = None) -> BenchmarkSet:
    """A benchmark set from the cache, built from the data kit first if it is not there."""
    from specserve.training import benchsets

    try:
        return benchsets.load(name, cache=cache)
    except DatasetError:
        log.warning("benchmark set %r is not built; building it from the data kit", name)
        bench, _ = benchsets.build(name, cache=cache)
        return bench


def load_cv(cache: Path | None = None) -> BenchmarkSet:
    """The ``cv`` set from the cache, built from the data kit first if it is not there."""
    return load_set("cv", cache)


def add_train_command(train_sub: argparse._SubParsersAction, kind: str, help: str, config_name: str,
                      quick_help: str, handler) -> argparse.ArgumentParser:
    """``train <kind>`` with the options every kind has: --out, --cache, --set, --quick, --threads
    (the caller adds its own, e.g. its ablations)."""
    cmd = train_sub.add_parser(kind, help=help)
    cmd.add_argument("--out", type=Path, help=f"run folder (default runs/{kind}-<timestamp>)")
    cmd.add_argument("--cache", type=Path, help="benchmark cache (default: $SPECSERVE_CACHE or ~/.cache/specserve)")
    cmd.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     type=key_value, help=f"override a {config_name} field (repeatable)")
    cmd.add_argument("--quick", action="store_true", help=f"smoke run: {quick_help}")
    cmd.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch CPU threads (default 2)")
    cmd.set_defaults(handler=handler)
    return cmd


def add_eval_command(eval_sub: argparse._SubParsersAction, kind: str, help: str, handler) -> argparse.ArgumentParser:
    """``eval <kind> --run RUN_DIR [--cache DIR] [--threads N]``."""
    cmd = eval_sub.add_parser(kind, help=help)
    cmd.add_argument("--run", type=Path, required=True, help="run folder holding checkpoint.pt")
    cmd.add_argument("--cache", type=Path, help="benchmark cache")
    cmd.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch CPU threads (default 2)")
    cmd.set_defaults(handler=handler)
    return cmd


def default_run_dir(kind: str) -> Path:
    return Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def quick_indices(bench, n: int, seed: int) -> np.ndarray:
    """The ``n`` training spectra of a ``--quick`` smoke run: a seeded sorted sample of the train split."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(bench.split_indices("train"), n, replace=False))
