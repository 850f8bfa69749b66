"""Command-line glue for export and for building the default model repository.

- ``specserve export rbm --run RUN_DIR [--repository DIR] [--name rbm] [--version N]``: export a
  trained run to ONNX, validate it (checker, operator set, contract, metadata, torch-vs-ORT
  parity at batch 1, 3 and 64), measure the run's report again on the served path
  (:mod:`specserve.export.served`; ``--no-served-check`` skips it) and copy it into the
  repository. Exit 1 when validation or the served check fails.
- ``specserve export spt --run RUN_DIR [--repository DIR] [--name spt] [--version N]``: the same
  for an SPT run, with the MC-dropout checks of :mod:`specserve.export.spt`.
- ``specserve models build [--repository DIR] [--cache DIR] [--if-missing] [--models rbm,spt,physformer]
  [--quick spt,physformer]``: the default model repository (``<cache>/models``): for each model,
  builds its benchmark set if it is missing (``cv``, ``giants``, ``stars``), trains it with the
  default configuration (progress on the terminal), evaluates it and exports it (PhysFormer as
  ``physformer`` and ``physformer-generate``). The SPT and PhysFormer are built without their
  ablations (``specserve train spt|physformer`` trains those). With ``--if-missing`` only the
  models without a model file are built. ``--quick spt,physformer`` builds those with their smoke
  configurations instead (seconds instead of about 6 and 16 minutes; for tests of the serving
  path, not for use). ``make serve`` runs this before ``specserve serve``.

Importing this module imports neither torch nor onnx; the handlers do.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from specserve.runtime.datakit import cache_dir, models_dir
from specserve.runtime.defaults import DEFAULT_MODELS, missing_models
from specserve.runtime.kinds import VARIANTS


def register(subparsers: argparse._SubParsersAction) -> None:
    exp = subparsers.add_parser("export", help="export a trained run to ONNX (needs the 'train' extra)")
    exp_sub = exp.add_subparsers(dest="export_command", required=True)
    for kind, handler, extra in (("rbm", cmd_export_rbm, ""), ("spt", cmd_export_spt, " (MC dropout in the graph)"),
                                 ("physformer", cmd_export_physformer, " (and its -generate graph)")):
        cmd = exp_sub.add_parser(kind, help=f"export a {kind} run{extra} into a model repository")
        cmd.add_argument("--run", type=Path, required=True, help="run folder holding checkpoint.pt")
        cmd.add_argument("--repository", type=Path, help="model repository (default <cache>/models)")
        cmd.add_argument("--name", default=kind, help=f"model name in the repository (default {kind})")
        cmd.add_argument("--version", type=int, help="version number (default: one above the newest)")
        cmd.add_argument("--no-served-check", dest="served_check", action="store_false",
                         help="skip measuring the report's rows again through the exported file and the runtime")
        cmd.set_defaults(handler=handler)

    models = subparsers.add_parser("models", help="the default model repository")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    build = models_sub.add_parser("build", help="train and export the default models")
    build.add_argument("--repository", type=Path, help="model repository (default <cache>/models)")
    build.add_argument("--cache", type=Path, help="cache folder (default: $SPECSERVE_CACHE or ~/.cache/specserve)")
    build.add_argument("--if-missing", action="store_true", help="build only the models that are not there")
    build.add_argument("--models", default="", help=f"comma-separated (default {','.join(DEFAULT_MODELS)})")
    build.add_argument("--quick", default="", metavar="MODELS",
                       help="comma-separated models to build with their smoke configuration (tests only; "
                            "supported: spt, physformer)")
    build.add_argument("--variants", default=",".join(VARIANTS), metavar="PRECISIONS",
                       help=f"reduced-precision variants to build beside each model (default {','.join(VARIANTS)}; "
                            "'' for none)")
    build.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    build.set_defaults(handler=cmd_models_build)
    ship = models_sub.add_parser("ship", help="copy a built repository into the package as its shipped models")
    ship.add_argument("--from", dest="source", type=Path, required=True,
                      help="a repository `specserve models build` wrote (every default model and variant)")
    ship.add_argument("--to", dest="target", type=Path,
                      help="where the shipped copy goes (default: the package's runtime/models)")
    ship.add_argument("--built-by", dest="built_by", default=None,
                      help="how the repository was built, for the manifest (default: 'specserve models build "
                           "--cache <empty folder>'); say so when models were exported from existing runs")
    ship.set_defaults(handler=cmd_models_ship)


def _present(repository: Path, name: str) -> bool:
    """Whether every repository model that building ``name`` makes has a model file."""
    return not missing_models(repository, (name,))


def cmd_export_rbm(args: argparse.Namespace) -> int:
    from specserve.training.common import require_training_extra

    require_training_extra(2)
    from specserve.export.rbm import export_rbm

    repository = args.repository or models_dir()
    folder, report = export_rbm(args.run, repository, name=args.name, version=args.version,
                                served_check=args.served_check)
    print(report.summary())
    print(f"exported to {folder}")
    return 0


def cmd_export_spt(args: argparse.Namespace) -> int:
    from specserve.training.common import require_training_extra

    require_training_extra(2)
    from specserve.export.spt import export_spt

    repository = args.repository or models_dir()
    folder, report, check = export_spt(args.run, repository, name=args.name, version=args.version,
                                       served_check=args.served_check)
    print(report.summary())
    print(check.summary())
    t = check.timing
    print(f"one MC run with T = {t['n_samples']} at batch {t['batch']}: {t['mc_seconds'] * 1e3:.1f} ms, "
          f"{t['ratio']:.2f}x one deterministic pass ({t['deterministic_seconds'] * 1e3:.1f} ms)")
    print(f"exported to {folder}")
    return 0


def cmd_export_physformer(args: argparse.Namespace) -> int:
    from specserve.training.common import require_training_extra

    require_training_extra(2)
    from specserve.export.physformer import export_physformer

    repository = args.repository or models_dir()
    folders, report, check, generate = export_physformer(args.run, repository, name=args.name, version=args.version,
                                                         served_check=args.served_check)
    print(report.summary())
    print(check.summary())
    print(generate.summary())
    print("exported to " + ", ".join(str(f) for f in folders))
    return 0


def _report(run_dir: Path) -> dict:
    import json

    return json.loads((run_dir / "report.json").read_text())


def served_summary(report: dict) -> str:
    from specserve.export.served import summary

    return summary(report)


def _build_rbm(repository: Path, cache: Path | None, quick: bool = False,
               variants: tuple[str, ...] = ()) -> None:
    from specserve.export.rbm import export_rbm
    from specserve.training.common import load_set
    from specserve.training.rbm.commands import headline
    from specserve.training.rbm.evaluate import evaluate_rbm
    from specserve.training.rbm.model import RBMConfig
    from specserve.training.rbm.train import train_rbm

    bench = load_set("cv", cache)
    run_dir = cache_dir(cache) / "runs" / f"rbm-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"training the RBM on '{bench.name}' ({bench.split_indices('train').size} spectra) into {run_dir}",
          flush=True)
    model, _ = train_rbm(RBMConfig(), run_dir, bench, run_info={"built_by": "specserve models build"})
    print(headline(evaluate_rbm(model, bench, run_dir)), flush=True)
    folder, export = export_rbm(run_dir, repository)
    print(export.summary())
    print(served_summary(_report(run_dir)))
    print(f"exported to {folder}", flush=True)
    _variants(folder, repository, "rbm", run_dir, variants, quick)


def _plan(title: str, kind: str, bench, cache: Path | None, config, quick_indices, note: str):
    """The run folder, config and training rows of one build (``quick_indices`` given: the smoke
    configuration's sample), announced on the terminal."""
    run_dir = cache_dir(cache) / "runs" / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    train_indices = quick_indices(bench, config.seed) if quick_indices is not None else None
    n_train = bench.split_indices("train").size if train_indices is None else train_indices.size
    print(f"training {title} on '{bench.name}' ({n_train} spectra, {config.epochs} epochs"
          f"{', smoke configuration' if train_indices is not None else ''}; {note}) into {run_dir}", flush=True)
    return run_dir, config, train_indices


def _build_spt(repository: Path, cache: Path | None, quick: bool = False,
               variants: tuple[str, ...] = ()) -> None:
    from specserve.export.spt import export_spt
    from specserve.training.common import load_set
    from specserve.training.spt.commands import headline, quick_config, quick_indices
    from specserve.training.spt.evaluate import SPTEvalConfig, evaluate_spt
    from specserve.training.spt.model import SPTConfig
    from specserve.training.spt.train import train_spt

    bench = load_set("giants", cache)
    run_dir, config, train_indices = _plan("the SPT", "spt", bench, cache, quick_config() if quick else SPTConfig(),
                                           quick_indices if quick else None, "the ablations are left to "
                                           "'specserve train spt'")
    model, _ = train_spt(config, run_dir, bench, train_indices=train_indices,
                         run_info={"built_by": "specserve models build", "quick": quick})
    print(headline(evaluate_spt(model, bench, run_dir, SPTEvalConfig(mc_samples=config.mc_samples),
                                train_indices=train_indices)), flush=True)
    folder, export, check = export_spt(run_dir, repository)
    print(export.summary())
    print(check.summary())
    print(served_summary(_report(run_dir)))
    print(f"exported to {folder}", flush=True)
    _variants(folder, repository, "spt", run_dir, variants, quick)


def _build_physformer(repository: Path, cache: Path | None, quick: bool = False,
                      variants: tuple[str, ...] = ()) -> None:
    from specserve.export.physformer import export_physformer
    from specserve.training.common import load_set
    from specserve.training.physformer.commands import (ENSEMBLE_SEEDS, eval_config, headline, qso_inputs,
                                                        quick_config, quick_indices)
    from specserve.training.physformer.evaluate import evaluate_physformer
    from specserve.training.physformer.model import PhysFormerConfig
    from specserve.training.physformer.train import build_ensemble, train_physformer

    bench = load_set("stars", cache)
    seeds = (0,) if quick else ENSEMBLE_SEEDS
    run_dir, config, train_indices = _plan("PhysFormer", "physformer", bench, cache,
                                           quick_config() if quick else PhysFormerConfig(),
                                           quick_indices if quick else None,
                                           "the ablation is left to 'specserve train physformer'"
                                           + (f"; an ensemble of seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else ""))
    info = {"built_by": "specserve models build", "quick": quick}
    if len(seeds) == 1:
        model, _ = train_physformer(config, run_dir, bench, train_indices=train_indices, run_info=info)
    else:  # each seed a default training, then their encoders as branches of one model
        members = [run_dir / "members" / f"seed-{seed}" for seed in seeds]
        for seed, member in zip(seeds, members):
            print(f"training ensemble member seed {seed} into {member}", flush=True)
            train_physformer(dataclasses.replace(config, seed=seed), member, bench, train_indices=train_indices,
                             run_info=info)
        model = build_ensemble(members, run_dir, bench, info)
    report = evaluate_physformer(model, bench, run_dir, eval_config(config.mc_samples, quick),
                                 train_indices=train_indices, others=qso_inputs(cache))
    print(headline(report), flush=True)
    folders, export, check, generate = export_physformer(run_dir, repository)
    print(export.summary())
    print(check.summary())
    print(generate.summary())
    print(served_summary(_report(run_dir)))
    print("exported to " + ", ".join(str(f) for f in folders), flush=True)
    _variants(folders[0], repository, "physformer", run_dir, variants, quick)


def _variants(folder: Path, repository: Path, name: str, run_dir: Path, precisions: tuple[str, ...],
              quick: bool = False) -> None:
    """The int8/fp16 variants of a model just exported (:mod:`specserve.export.variants`); a smoke
    model's accuracy is judged on 2 MC draws a side instead of 5."""
    if not precisions:
        return
    import onnxruntime as ort

    from specserve.export.variants import export_variants
    from specserve.runtime.contract import ModelCard

    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    card = ModelCard.from_metadata_props(session.get_modelmeta().custom_metadata_map)
    for result in export_variants(folder, repository, name, card, _report(run_dir), precisions,
                                  draws=2 if quick else None):
        print(result.summary(), flush=True)


def cmd_models_ship(args: argparse.Namespace) -> int:
    from specserve.export.ship import BUILD_COMMAND, ship, summary
    from specserve.runtime.defaults import SHIPPED

    target = args.target or SHIPPED
    command = f"{args.built_by}; specserve models ship --from {args.source}" if args.built_by else BUILD_COMMAND
    manifest = ship(args.source, target, command)
    print(summary(manifest))
    print(f"shipped into {target}")
    return 0


BUILDERS = {"rbm": _build_rbm, "spt": _build_spt, "physformer": _build_physformer}
QUICK_BUILDS = ("spt", "physformer")


def cmd_models_build(args: argparse.Namespace) -> int:
    from specserve.runtime.errors import SpecserveError

    repository = args.repository or models_dir(args.cache)
    names = [m for m in (args.models or ",".join(DEFAULT_MODELS)).split(",") if m]
    unknown = [m for m in names if m not in BUILDERS]
    if unknown:
        raise SpecserveError(f"unknown model {', '.join(unknown)} (buildable: {', '.join(BUILDERS)})")
    quick = [m for m in args.quick.split(",") if m]
    if [m for m in quick if m not in QUICK_BUILDS]:
        raise SpecserveError(f"--quick supports {', '.join(QUICK_BUILDS)}, got {args.quick}")
    variants = tuple(v for v in args.variants.split(",") if v)
    if [v for v in variants if v not in VARIANTS]:
        raise SpecserveError(f"--variants supports {', '.join(VARIANTS)}, got {args.variants}")
    todo = [name for name in names if not _present(repository, name)] if args.if_missing else names
    if not todo:
        print(f"model repository {repository} is ready ({', '.join(names)})")
        return 0
    from specserve.training.common import require_training_extra

    require_training_extra(args.threads)
    print(f"building {', '.join(todo)} into {repository} (all three: about 30 minutes on 2 cores)", flush=True)
    t0 = time.perf_counter()
    for name in todo:
        BUILDERS[name](repository, args.cache, quick=name in quick, variants=variants)
    print(f"model repository ready: {repository} ({time.perf_counter() - t0:.0f} s)")
    return 0
