"""Train/serve skew: what a real server answers over gRPC for raw test spectra equals what the
evaluation path (raw spectrum -> the runtime's pipeline -> the torch model) computes, within MC
noise; and the export's served-metrics check finds a skew when there is one.

One server on port 0 serves the three tiny models of the session fixtures, each exported with
the served check (so their reports carry served numbers beside the torch ones)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import serving

from specserve.runtime.client import Client
from specserve.runtime.contract import ModelCard
from specserve.runtime.engine.repository import load_model_file
from specserve.runtime.errors import ExportError
from specserve.training import common
from specserve.training.benchsets import raw_spectra
from specserve.training.inputs import torch_inputs
from specserve.training.trainer import CHECKPOINT_NAME, load_checkpoint

pytestmark = pytest.mark.slow

N_SPECTRA = 24
MC_SAMPLES = 128


@pytest.fixture(scope="module")
def served(cv_run, spt_run, physformer_run, tmp_path_factory):
    from specserve.export.physformer import export_physformer
    from specserve.export.rbm import export_rbm
    from specserve.export.spt import export_spt

    repo = tmp_path_factory.mktemp("skew-repo")
    export_rbm(cv_run[1], repo)
    export_spt(spt_run[1], repo)
    export_physformer(physformer_run, repo)
    with serving(repo) as address:
        yield address, repo


def _sample(name: str):
    bench = common.load_set(name)
    idx = bench.split_indices("test")[:N_SPECTRA]
    return bench, raw_spectra(bench, idx)


def _served(address: str, model: str, raws, mc_samples: int = 0):
    with Client(address) as client:
        rows = client.analyze(raws, models=[model], mc_samples=mc_samples)
    assert [r.id for r in rows] == [s.id for s in raws]
    return rows


def _mc_agreement(served: np.ndarray, torch_mean: np.ndarray, spread: np.ndarray, n_samples: int) -> np.ndarray:
    """z-scores of served - torch MC means: two independent means of T draws of spread ``spread``."""
    return (served - torch_mean) / (spread * np.sqrt(2.0 / n_samples))


def test_rbm_served_equals_the_evaluation_path(served, cv_run):
    address, _ = served
    _, _, model, _ = cv_run
    bench, raws = _sample("cv")
    rows = _served(address, "rbm", raws)
    prepared, ok = torch_inputs(bench, raws)
    assert ok.all()
    with torch.no_grad():
        probs, free = model(torch.from_numpy(prepared.model_flux()))
    got = np.array([[r.values["p_non_cv"], r.values["p_cv"]] for r in rows])
    np.testing.assert_allclose(got, probs.numpy(), atol=1e-3)
    np.testing.assert_allclose([r.values["free_energy_cv"] for r in rows], free[:, 1].numpy(), rtol=1e-4, atol=1e-2)


def test_spt_served_equals_the_evaluation_path_within_mc_noise(served, spt_run):
    from specserve.training.spt.train import mc_predict

    address, _ = served
    _, _, model, _ = spt_run
    bench, raws = _sample("giants")
    rows = _served(address, "spt", raws, MC_SAMPLES)
    prepared, ok = torch_inputs(bench, raws)
    assert ok.all()
    mean, std = mc_predict(model, prepared.model_flux(), MC_SAMPLES, seed=3)
    spread = std / model.std_scale.numpy()
    got = np.array([[r.values["age"], r.values["mass"]] for r in rows])
    z = _mc_agreement(got, mean, spread, MC_SAMPLES)
    assert np.mean(z**2) < 4.0 and np.abs(z).max() < 6.0, z
    # the served uncertainty is the evaluation path's, too
    err = np.array([[r.values["age_err"], r.values["mass_err"]] for r in rows])
    np.testing.assert_allclose(np.median(err / std, axis=0), 1.0, atol=0.15)


def test_physformer_served_equals_the_evaluation_path_within_mc_noise(served, physformer_run):
    from specserve.training.physformer.model import PhysFormer
    from specserve.training.physformer.train import physformer_predict

    address, _ = served
    model = PhysFormer.from_checkpoint(load_checkpoint(physformer_run / CHECKPOINT_NAME))
    bench, raws = _sample("stars")
    rows = _served(address, "physformer", raws, MC_SAMPLES)
    prepared, ok = torch_inputs(bench, raws)
    assert ok.all()
    ivar = prepared.model_ivar()  # what a noise-aware encoder (the default) is told, as the server tells it
    mean, std, _, _ = physformer_predict(model, prepared.model_flux(), MC_SAMPLES, seed=3, ivar=ivar)
    with torch.no_grad():
        spread = std / (model.std_scale * model.std_factor(torch.from_numpy(ivar))).numpy()
    got = np.array([[r.values[k] for k in ("teff", "logg", "feh")] for r in rows])
    z = _mc_agreement(got, mean, np.maximum(spread, 1e-4 * np.abs(mean)), MC_SAMPLES)  # float32 floor
    assert np.mean(z**2) < 4.0 and np.abs(z).max() < 6.0, z


@pytest.mark.parametrize("name,label", [("rbm", "rbm"), ("spt", "spt"), ("physformer", "physformer")])
def test_reports_and_cards_carry_served_numbers_beside_the_torch_path(served, cv_run, spt_run, physformer_run,
                                                                       name, label):
    _, repo = served
    run_dir = {"rbm": cv_run[1], "spt": spt_run[1], "physformer": physformer_run}[name]
    report = json.loads((Path(run_dir) / "report.json").read_text())
    check = report["served_vs_torch"]
    assert check["failures"] == [] and check["n_compared"] >= 20
    assert all(r["ok"] for r in check["rows"].values())
    # every S/N row of both noise models and every perturbation was measured on the served path
    assert any(p.startswith(("accuracy_vs_snr_photon", "vs_snr_photon", "snr_photon")) for p in check["rows"])
    assert any("perturbations" in p for p in check["rows"])
    card = load_model_file(name, "1", repo / name / "1" / "model.onnx").card
    assert isinstance(card, ModelCard) and card.metrics["path"] == "served"
    if name == "rbm":
        assert card.metrics["rbm"]["accuracy"] == report["served"]["accuracy"]
    elif name == "spt":
        assert card.metrics["spt"]["mape_age"] == report["served"]["mape_age"]
    else:
        assert card.metrics["fgk_mae"]["physformer"] == report["served"]["native"]["fgk"]["mae"]


def test_a_skew_fails_the_served_check(served, cv_run, tmp_path):
    """The RBM's torch-path accuracy made 5 points better than it is: the served check refuses."""
    from specserve.export.served import check_rbm

    _, repo = served
    report = json.loads((Path(cv_run[1]) / "report.json").read_text())
    report["rbm"]["accuracy"] = report["served"]["accuracy"] + 0.05
    with pytest.raises(ExportError, match="accuracy"):
        check_rbm(repo / "rbm" / "1" / "model.onnx", tmp_path, report)
    assert json.loads((tmp_path / "report.json").read_text())["served_vs_torch"]["failures"] == ["accuracy"]
