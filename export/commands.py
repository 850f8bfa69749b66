"""Command-line glue for export and for building the default model repository.

- ``specserve export rbm --run RUN_DIR [--repository DIR] [--name rbm] [--version N]``: export a
  trained run to ONNX, validate it (checker, operator set, contract, metadata, torch-vs-ORT
  parity at batch 1, 3 and 64) and copy it into the repository. Exit 1 when validation fails.
- ``specserve models build [--repository DIR] [--cache DIR] [--if-missing]``: the default model
  repository (``<cache>/models``): builds the ``cv`` set if it is missing, trains the RBM with the
  default configuration (progress on the terminal), evaluates it and exports it. With
  ``--if-missing`` a repository that already holds a model file for every default model is left
  as it is. ``make serve`` runs this before ``specserve serve``.

Importing this module imports neither torch nor onnx; the handlers do.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from specserve.runtime.datakit import cache_dir, models_dir

DEFAULT_MODELS = ("rbm",)


def register(subparsers: argparse._SubParsersAction) -> None:
    exp = subparsers.add_parser("export", help="export a trained run to ONNX (needs the 'train' extra)")
    exp_sub = exp.add_subparsers(dest="export_command", required=True)
    rbm = exp_sub.add_parser("rbm", help="export an RBM run into a model repository")
    rbm.add_argument("--run", type=Path, required=True, help="run folder holding checkpoint.pt")
    rbm.add_argument("--repository", type=Path, help="model repository (default <cache>/models)")
    rbm.add_argument("--name", default="rbm", help="model name in the repository (default rbm)")
    rbm.add_argument("--version", type=int, help="version number (default: one above the newest)")
    rbm.set_defaults(handler=cmd_export_rbm)

    models = subparsers.add_parser("models", help="the default model repository")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    build = models_sub.add_parser("build", help="train and export the default models")
    build.add_argument("--repository", type=Path, help="model repository (default <cache>/models)")
    build.add_argument("--cache", type=Path, help="cache folder (default: $SPECSERVE_CACHE or ~/.cache/specserve)")
    build.add_argument("--if-missing", action="store_true", help="do nothing if every default model is there")
    build.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    build.set_defaults(handler=cmd_models_build)


def _present(repository: Path, name: str) -> bool:
    return any(p.is_file() for p in (repository / name).glob("[0-9]*/model.onnx"))


def cmd_export_rbm(args: argparse.Namespace) -> int:
    from specserve.training.commands import require_training_extra

    require_training_extra(2)
    from .rbm import export_rbm

    repository = args.repository or models_dir()
    folder, report = export_rbm(args.run, repository, name=args.name, version=args.version)
    print(report.summary())
    print(f"exported to {folder}")
    return 0


def cmd_models_build(args: argparse.Namespace) -> int:
    repository = args.repository or models_dir(args.cache)
    missing = [name for name in DEFAULT_MODELS if not _present(repository, name)]
    if args.if_missing and not missing:
        print(f"model repository {repository} is ready ({', '.join(DEFAULT_MODELS)})")
        return 0
    from specserve.training.commands import require_training_extra, headline, load_cv, train_rbm

    require_training_extra(args.threads)
    from specserve.training.evaluate import evaluate_rbm
    from specserve.training.rbm import RBMConfig

    from .rbm import export_rbm

    print(f"building the default model repository in {repository} (first run: about a minute)", flush=True)
    t0 = time.perf_counter()
    bench = load_cv(args.cache)
    run_dir = cache_dir(args.cache) / "runs" / f"rbm-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"training the RBM on '{bench.name}' ({bench.split_indices('train').size} spectra) into {run_dir}",
          flush=True)
    model, trainer = train_rbm(RBMConfig(), run_dir, bench, run_info={"built_by": "specserve models build"})
    report = evaluate_rbm(model, bench, run_dir)
    print(headline(report), flush=True)
    folder, export = export_rbm(run_dir, repository)
    print(export.summary())
    print(f"model repository ready: {folder} ({time.perf_counter() - t0:.0f} s)")
    return 0
