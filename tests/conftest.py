"""Shared fixtures: the real data kit (required: tests fail, never skip, without it) and a tiny
RBM run trained on the real ``cv`` set (shared by the training and export tests)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from specserve.runtime.datakit import data_dir


@pytest.fixture(scope="session")
def kit() -> Path:
    return data_dir()


@pytest.fixture(scope="session")
def cv_run(tmp_path_factory):
    """A tiny RBM trained on 200 spectra of the cv train split: (bench, run_dir, model, report)."""
    import numpy as np
    import torch

    from specserve.training import common
    from specserve.training.rbm.evaluate import EvalConfig, evaluate_rbm
    from specserve.training.rbm.model import RBMConfig
    from specserve.training.rbm.train import train_rbm

    torch.set_num_threads(2)
    bench = common.load_cv()
    rng = np.random.default_rng(0)
    train = np.sort(rng.choice(bench.split_indices("train"), 200, replace=False))
    cfg = RBMConfig(n_hidden=16, cd_epochs=2, finetune_epochs=4, batch_size=32, seed=0)
    run_dir = tmp_path_factory.mktemp("rbm-run")
    model, trainer = train_rbm(cfg, run_dir, bench, train_indices=train, progress=False)
    eval_cfg = EvalConfig(bernoulli_components=16, bernoulli_iter=3)
    report = evaluate_rbm(model, bench, run_dir, eval_cfg, train_indices=train)
    return bench, run_dir, model, report


@pytest.fixture(scope="session")
def spt_run(tmp_path_factory):
    """A tiny SPT trained (quick config) on 200 spectra of the giants train split and evaluated
    without ablations: (bench, run_dir, model, report)."""
    import torch

    from specserve.training import common
    from specserve.training.spt import commands as spt_commands
    from specserve.training.spt.evaluate import SPTEvalConfig, evaluate_spt
    from specserve.training.spt.train import train_spt

    torch.set_num_threads(2)
    bench = common.load_set("giants")
    cfg = spt_commands.quick_config()
    train = spt_commands.quick_indices(bench, cfg.seed)
    run_dir = tmp_path_factory.mktemp("spt-run")
    model, _ = train_spt(cfg, run_dir, bench, train_indices=train, progress=False)
    report = evaluate_spt(model, bench, run_dir, SPTEvalConfig(mc_samples=cfg.mc_samples, boosting_iter=50),
                          train_indices=train)
    return bench, run_dir, model, report


@pytest.fixture(scope="session")
def physformer_run(tmp_path_factory):
    """A tiny PhysFormer (quick config, no ablation) trained and evaluated on the stars set: run_dir."""
    from specserve.export.cli import main

    run_dir = tmp_path_factory.mktemp("physformer-run") / "run"
    assert main(["train", "physformer", "--quick", "--no-ablation", "--out", str(run_dir)]) == 0
    return run_dir


def toy_rbm_repository(root: Path) -> tuple[Path, Path]:
    """``root/repo`` holding a toy RBM-kind model (free energies of a fixed linear map) as ``rbm``
    version 1, exported and validated like a real one: (repository, the ONNX file)."""
    from test_contract_export import ToyFreeEnergy

    from specserve.export.onnx_export import export_model
    from specserve.export.repository import write_model
    from specserve.runtime.contract import ModelCard
    from specserve.runtime.preprocess import OPTICAL_PREPROCESSING

    card = ModelCard(kind="rbm", preprocessing=OPTICAL_PREPROCESSING, class_names=("non_cv", "cv"))
    report = export_model(ToyFreeEnergy(card.dims["n_pixels"]), card, root / "build" / "model.onnx",
                          atol=1e-5, rtol=1e-4)
    write_model(root / "repo", "rbm", 1, report.path, card)
    return root / "repo", report.path


@contextlib.contextmanager
def serving(repo: Path) -> Iterator[str]:
    """A real ``specserve serve`` process on port 0 over ``repo``: yields its address; on exit
    SIGTERM, and the server must stop cleanly."""
    specserve = str(Path(sys.executable).with_name("specserve"))
    proc = subprocess.Popen([specserve, "serve", "--repository", str(repo), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "ORT_DISABLE_TELEMETRY": "1"})
    line = proc.stdout.readline()
    assert "serving" in line, proc.stderr.read()
    try:
        yield line.strip().rsplit(" on ", 1)[1]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
