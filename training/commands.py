"""Command-line glue for training and evaluation, and the RBM training recipe behind it.

- ``specserve train rbm [--out RUN_DIR] [--cache DIR] [--set KEY=VALUE ...] [--quick]``: train the
  RBM classifier on the ``cv`` set (:func:`train_rbm`), evaluate it (``report.json`` and
  ``report.png``, see :mod:`specserve.training.evaluate`), print the run folder and the headline
  numbers. ``--set`` overrides any :class:`~specserve.training.rbm.RBMConfig` field.
- ``specserve eval rbm --run RUN_DIR [--cache DIR]``: re-evaluate the run's ``checkpoint.pt``.

:func:`register` adds both to the main command line. Importing this module imports neither torch,
scikit-learn nor matplotlib (the ``train`` extra); the handlers do, and say which extra to
install when they are missing. Handlers return an exit code.
"""

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
    from .benchsets import BenchmarkSet
    from .rbm import RBMClassifier, RBMConfig
    from .trainer import Trainer

log = logging.getLogger(__name__)

DEFAULT_THREADS = 2
QUICK_OVERRIDES = {"cd_epochs": 2, "finetune_epochs": 3}
QUICK_TRAIN_SPECTRA = 300


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train rbm`` and ``eval rbm`` to an argparse subparsers object (handler in ``handler``)."""
    train = subparsers.add_parser("train", help="train a model (needs the 'train' extra)")
    train_sub = train.add_subparsers(dest="train_command", required=True)
    rbm = train_sub.add_parser("rbm", help="train and evaluate the RBM CV classifier on the 'cv' set")
    rbm.add_argument("--out", type=Path, help="run folder (default runs/rbm-<timestamp>)")
    rbm.add_argument("--cache", type=Path, help="benchmark cache (default: $SPECSERVE_CACHE or ~/.cache/specserve)")
    rbm.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     type=_key_value, help="override an RBMConfig field (repeatable), e.g. --set n_hidden=128")
    rbm.add_argument("--quick", action="store_true",
                     help=f"smoke run: {QUICK_TRAIN_SPECTRA} training spectra, "
                          + ", ".join(f"{k}={v}" for k, v in QUICK_OVERRIDES.items()))
    rbm.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch CPU threads (default 2)")
    rbm.set_defaults(handler=cmd_train_rbm)

    evaluate = subparsers.add_parser("eval", help="evaluate a trained model (needs the 'train' extra)")
    eval_sub = evaluate.add_subparsers(dest="eval_command", required=True)
    erbm = eval_sub.add_parser("rbm", help="re-evaluate an RBM run's checkpoint on the 'cv' set")
    erbm.add_argument("--run", type=Path, required=True, help="run folder holding checkpoint.pt")
    erbm.add_argument("--cache", type=Path, help="benchmark cache")
    erbm.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch CPU threads (default 2)")
    erbm.set_defaults(handler=cmd_eval_rbm)

    from . import physformer_commands, spt_commands

    spt_commands.register(train_sub, eval_sub)
    physformer_commands.register(train_sub, eval_sub)


def _key_value(text: str) -> tuple[str, str]:
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


def config_with_overrides(overrides: Mapping[str, str] | Sequence[tuple[str, str]], base: Any = None) -> Any:
    """``base`` (default RBMConfig(); any config dataclass) with string overrides converted to each
    field's type."""
    from .rbm import RBMConfig

    base = RBMConfig() if base is None else base
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
    from . import benchsets

    try:
        return benchsets.load(name, cache=cache)
    except DatasetError:
        log.warning("benchmark set %r is not built; building it from the data kit", name)
        bench, _ = benchsets.build(name, cache=cache)
        return bench


def load_cv(cache: Path | None = None) -> BenchmarkSet:
    """The ``cv`` set from the cache, built from the data kit first if it is not there."""
    return load_set("cv", cache)


# ---------------------------------------------------------------- the RBM training recipe


def train_rbm(config: RBMConfig, run_dir: str | Path, bench: BenchmarkSet, *,
              train_indices: np.ndarray | None = None, progress: bool | None = None,
              run_info: Mapping[str, Any] | None = None) -> tuple[RBMClassifier, Trainer]:
    """Train an RBM classifier on ``bench`` (the ``cv`` set) into ``run_dir``.

    Contrastive divergence on each class's RBM (``cd_epochs``), then cross-entropy fine-tuning
    of every parameter (``finetune_epochs``), keeping the epoch with the lowest validation loss.
    Training spectra are augmented at the raw level through the serving pipeline (``augment_*``,
    :func:`specserve.training.inputs.training_pool`); the validation set is the validation split
    as observed plus one augmented copy drawn with a fixed seed.
    ``train_indices`` restricts training to some spectra of the train split.
    """
    import torch

    from .inputs import model_inputs, training_pool
    from .rbm import RBMClassifier
    from .trainer import Phase, Trainer, run_config, seed_everything

    cfg = config
    a = bench.arrays
    if bench.arrays["flux"].shape[1] != cfg.n_pixels:
        raise SpecserveError(f"set {bench.name!r} has {a['flux'].shape[1]} pixels, the config {cfg.n_pixels}")
    train = bench.split_indices("train") if train_indices is None else np.asarray(train_indices)
    val = bench.split_indices("validation")
    y_train = torch.from_numpy(a["label"][train].astype(np.int64))  # (N,)
    val_rng = np.random.default_rng([cfg.seed, 1])
    x_val = model_inputs(bench, val)  # (Nv, P)
    y_val = a["label"][val].astype(np.int64)
    if cfg.augment_snr_max:
        x_val = np.concatenate([x_val, training_pool(cfg, bench, val, val_rng, 1.0).epoch(0).model_flux()])
        y_val = np.concatenate([y_val, y_val])
    pool = training_pool(cfg, bench, train, np.random.default_rng([cfg.seed, 3]))
    x_val_t, y_val_t = torch.from_numpy(x_val), torch.from_numpy(y_val)

    config_json = run_config("rbm", cfg.to_dict(), bench, train, val.size, train_indices is not None, run_info)
    seed_everything(cfg.seed)  # the initial weights depend on the seed only, not on what ran before
    model = RBMClassifier(cfg)
    trainer = Trainer(model, run_dir, config_json, model_kind="rbm", model_config=cfg.to_dict(), seed=cfg.seed,
                      log_every=5, progress=progress)
    data_rng = np.random.default_rng([cfg.seed, 2])

    def batches(epoch: int):
        x = torch.from_numpy(pool.epoch(epoch).model_flux())  # (N, P)
        order = torch.from_numpy(data_rng.permutation(train.size))
        for lo in range(0, train.size, cfg.batch_size):
            j = order[lo:lo + cfg.batch_size]
            yield x[j], y_train[j]

    def validate(m: RBMClassifier) -> dict[str, float]:
        _, metrics = m.classification_loss(x_val_t, y_val_t)
        return metrics

    with torch.no_grad():
        model.init_visible_bias(model.binarise(torch.from_numpy(model_inputs(bench, train))), y_train)
    cd_params = [model.W, model.a, model.b]
    trainer.fit(Phase(
        "cd", cfg.cd_epochs,
        torch.optim.SGD(cd_params, lr=cfg.cd_lr, momentum=cfg.cd_momentum, weight_decay=cfg.weight_decay),
        batches, lambda m, batch: m.cd_loss(m.binarise(batch[0]), batch[1]), validate=validate))
    trainer.fit(Phase(
        "finetune", cfg.finetune_epochs,
        torch.optim.AdamW(model.parameters(), lr=cfg.finetune_lr, weight_decay=cfg.weight_decay),
        batches, lambda m, batch: m.classification_loss(*batch), validate=validate, monitor="loss"))
    return model, trainer


# ---------------------------------------------------------------- handlers


def _default_run_dir() -> Path:
    return Path("runs") / f"rbm-{time.strftime('%Y%m%d-%H%M%S')}"


def headline(report: Mapping[str, Any]) -> str:
    """A few lines with the report's main numbers."""
    levels = report["snr_levels"]

    def fmt(v: float | None) -> str:
        return "  n/a " if v is None else f"{v:.4f}"

    lines = [f"{'model':22s} {'accuracy':>8s} {'recall':>7s} {'precis.':>7s} {'FPR real':>8s}  "
             f"accuracy at S/N {'/'.join(levels)}"]
    for name, m in [("rbm", report["rbm"])] + list(report["baselines"].items()):
        accs = " ".join(fmt(m["accuracy_vs_snr"][s]) for s in levels)
        lines.append(f"{name:22s} {fmt(m['accuracy']):>8s} {fmt(m['cv_recall']):>7s} {fmt(m['cv_precision']):>7s} "
                     f"{fmt(m['fpr_real_non_cv']):>8s}  {accs}")
    t = report["target"]
    lines.append(f"target (accuracy >= {t['min_accuracy_at_snr_ge_20']:.0%} at S/N >= 20, FPR real non-CV <= "
                 f"{t['max_fpr_real_non_cv']:.0%}): {'met' if t['met'] else 'NOT met'} "
                 f"(min accuracy {t['measured_min_accuracy']:.4f}, max FPR {t['measured_max_fpr_real_non_cv']:.4f} "
                 f"over {', '.join(t['checked_at'])})")
    return "\n".join(lines)


def quick_indices(bench, n: int, seed: int) -> np.ndarray:
    """The ``n`` training spectra of a ``--quick`` smoke run: a seeded sorted sample of the train split."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(bench.split_indices("train"), n, replace=False))


def cmd_train_rbm(args: argparse.Namespace) -> int:
    require_training_extra(getattr(args, "threads", DEFAULT_THREADS))
    from .evaluate import REPORT_JSON, EvalConfig, evaluate_rbm

    overrides = {k: str(v) for k, v in QUICK_OVERRIDES.items()} if args.quick else {}
    overrides.update(dict(args.overrides))
    config = config_with_overrides(overrides)
    run_dir = args.out if args.out is not None else _default_run_dir()
    bench = load_cv(args.cache)
    train_indices = None
    if args.quick:
        train_indices = quick_indices(bench, QUICK_TRAIN_SPECTRA, config.seed)
    t0 = time.perf_counter()
    model, trainer = train_rbm(config, run_dir, bench, train_indices=train_indices,
                               run_info={"quick": bool(args.quick), "cache": str(args.cache) if args.cache else None})
    train_s = time.perf_counter() - t0
    eval_config = EvalConfig(bernoulli_iter=5) if args.quick else EvalConfig()
    report = evaluate_rbm(model, bench, run_dir, eval_config, train_indices=train_indices,
                          extra={"training": {"wall_s": round(train_s, 2), "steps": trainer.step,
                                              "checkpoint": trainer.checkpoint_path.name}})
    print(f"run folder: {run_dir}")
    print(f"trained in {train_s:.1f} s ({trainer.step} steps); evaluated in {report['timing_s']['evaluation']:.1f} s; "
          f"report: {Path(run_dir) / REPORT_JSON}")
    print(headline(report))
    return 0


def cmd_eval_rbm(args: argparse.Namespace) -> int:
    require_training_extra(getattr(args, "threads", DEFAULT_THREADS))
    from .evaluate import REPORT_JSON, EvalConfig, evaluate_rbm
    from .rbm import RBMClassifier
    from .trainer import CHECKPOINT_NAME, load_checkpoint

    path = Path(args.run) / CHECKPOINT_NAME
    if not path.is_file():
        raise SpecserveError(f"no {CHECKPOINT_NAME} in {args.run}")
    checkpoint = load_checkpoint(path)
    if checkpoint.get("model_kind") != "rbm":
        raise SpecserveError(f"{path} holds a {checkpoint.get('model_kind')!r} model, not an RBM")
    model = RBMClassifier.from_checkpoint(checkpoint)
    bench = load_cv(args.cache)
    data = checkpoint.get("config", {}).get("data", {})
    if data.get("content_hash") and data["content_hash"] != bench.meta.get("content_hash"):
        log.warning("the cached 'cv' set differs from the one this run was trained on")
    indices = data.get("train_indices")
    quick = bool(checkpoint.get("config", {}).get("quick"))
    report = evaluate_rbm(model, bench, args.run, EvalConfig(bernoulli_iter=5) if quick else EvalConfig(),
                          train_indices=None if indices is None else np.asarray(indices),
                          extra={"checkpoint": {"step": checkpoint.get("step"), "phase": checkpoint.get("phase"),
                                                "epoch": checkpoint.get("epoch"), "best": checkpoint.get("best")}})
    print(f"run folder: {args.run}; report: {Path(args.run) / REPORT_JSON}")
    print(headline(report))
    return 0

