"""PhysFormer ensembles (issue 20, item 4): several runs' encoders as branches of one model, made by
``specserve train physformer-ensemble`` (:func:`build_ensemble`), loaded from its checkpoint,
calibrated on the validation split and exported to one ONNX graph that agrees with torch."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from specserve.runtime.contract import ModelCard
from specserve.runtime.errors import SpecserveError
from specserve.training import common
from specserve.training.layers import deterministic
from specserve.training.physformer.model import PhysFormer, PhysFormerConfig, PhysFormerEnsemble, PhysFormerInference
from specserve.training.trainer import CHECKPOINT_NAME, load_checkpoint


@pytest.fixture(scope="module")
def two_runs(physformer_run, tmp_path_factory):
    """The session's quick run and a second member: its weights with the encoder perturbed (a
    stand-in for another seed's run, without a second training)."""
    second = tmp_path_factory.mktemp("physformer-member") / "run"
    second.mkdir()
    checkpoint = load_checkpoint(physformer_run / CHECKPOINT_NAME)
    g = torch.Generator().manual_seed(7)
    state = dict(checkpoint["state_dict"])
    for key in ("enc_hidden.weight", "enc_out.weight", "embed.weight"):
        state[key] = state[key] + 0.2 * state[key].std() * torch.randn(state[key].shape, generator=g)
    torch.save({**checkpoint, "state_dict": state, "model_config": {**checkpoint["model_config"], "seed": 1}},
               second / CHECKPOINT_NAME)
    return physformer_run, second


def test_ensemble_mean_is_the_members_mean_and_round_trips(two_runs, tmp_path):
    from specserve.training.physformer.train import build_ensemble, inputs

    bench = common.load_set("stars")
    ensemble = build_ensemble(list(two_runs), tmp_path / "ens", bench)
    members = [PhysFormer.from_checkpoint(load_checkpoint(r / CHECKPOINT_NAME)) for r in two_runs]
    flux, ivar = (torch.from_numpy(a) for a in inputs(bench, bench.split_indices("test")[:8]))
    with torch.no_grad(), deterministic(ensemble), deterministic(members[0]), deterministic(members[1]):
        params, latent = ensemble.encode(flux, torch.zeros(()), ivar)
        single = [m.encode(flux, torch.zeros(()), ivar) for m in members]
    log_teff = torch.log10(torch.stack([p[:, 0] for p, _ in single])).mean(0)
    torch.testing.assert_close(torch.log10(params[:, 0]), log_teff, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(params[:, 1:], torch.stack([p[:, 1:] for p, _ in single]).mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(latent, single[0][1])  # the first member's decoder, so its latent
    assert not torch.allclose(single[0][0], single[1][0])  # the members differ
    # calibrated on the validation split, saved, and loaded back as an ensemble
    checkpoint = load_checkpoint(tmp_path / "ens" / CHECKPOINT_NAME)
    assert len(checkpoint["member_configs"]) == 2 and checkpoint["calibration"]["split"] == "validation"
    assert all(v > 0 for v in checkpoint["calibration"]["std_scale"])
    loaded = PhysFormer.from_checkpoint(checkpoint)
    assert isinstance(loaded, PhysFormerEnsemble)
    with torch.no_grad(), deterministic(loaded):
        again, _ = loaded.encode(flux, torch.zeros(()), ivar)
    torch.testing.assert_close(again, params)
    torch.testing.assert_close(loaded.std_scale, ensemble.std_scale)
    # members that do not fit together, and runs that are not single PhysFormers, are refused
    with pytest.raises(ValueError, match="n_pixels"):
        PhysFormerEnsemble([members[0], PhysFormer(PhysFormerConfig(n_pixels=300))])
    with pytest.raises(SpecserveError, match="not a single PhysFormer"):
        build_ensemble([tmp_path / "ens", two_runs[0]], tmp_path / "ens2", bench)


def test_ensemble_exports_to_one_graph_that_matches_torch(two_runs, tmp_path):
    from specserve.export.physformer import export_physformer

    run = tmp_path / "ens"
    from specserve.training.physformer.train import build_ensemble

    build_ensemble(list(two_runs), run, common.load_set("stars"))
    repo = tmp_path / "repo"
    # the export validates (parity with dropout off, the MC checks) and raises on a failure
    folders, report, check, generate = export_physformer(run, repo, served_check=False)
    assert report.max_abs_diff and check.runs_differ and check.sessions_differ
    session = ort.InferenceSession(str(folders[0] / "model.onnx"), providers=["CPUExecutionProvider"])
    card = ModelCard.from_metadata_props(session.get_modelmeta().custom_metadata_map)
    assert card.normalisation["ensemble"]["members"] == 2 and "Ensemble of 2 encoders" in card.description
    model = PhysFormer.from_checkpoint(load_checkpoint(run / CHECKPOINT_NAME))
    bench = common.load_set("stars")
    from specserve.training.physformer.train import inputs

    flux, ivar = inputs(bench, bench.split_indices("test")[:3])
    feeds = {"flux": flux, "ivar": ivar, "n_samples": np.array([64], np.int64), "seed": np.array([0.25], np.float32)}
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})))
    with torch.no_grad():
        mean, *_ = PhysFormerInference(model)(torch.from_numpy(flux), torch.from_numpy(ivar), torch.tensor([64]),
                                              torch.tensor([0.25]))
    # two MC means of 64 draws: within a few of their spreads
    np.testing.assert_allclose(np.log10(got["parameters"][:, 0]), np.log10(mean[:, 0].numpy()), atol=0.02)
    np.testing.assert_allclose(got["parameters"][:, 1:], mean[:, 1:].numpy(), atol=0.3)
