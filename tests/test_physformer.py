"""PhysFormer model pieces: parameters inside the physical box for any input, the physical
decoder's atmosphere (kappa >= 0, monotone temperatures), generation, the loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specserve.training.physformer.model import PhysFormer, PhysFormerConfig, reduced_chi2


def _tiny(decoder: str = "physics") -> PhysFormer:
    torch.manual_seed(0)
    return PhysFormer(PhysFormerConfig(n_pixels=300, patch_size=32, d_model=16, n_heads=2, depth=1, ffn=32,
                                       encoder_hidden=16, decoder_hidden=32, n_layers=8, n_components=4,
                                       n_nodes=4, decoder=decoder)).eval()


@pytest.mark.parametrize("decoder", ["physics", "plain"])
def test_parameters_stay_in_the_box_for_any_input(decoder):
    model = _tiny(decoder)
    with torch.no_grad():
        for layer in (model.enc_out,):  # push the raw outputs far outside any box
            layer.weight.mul_(1e4)
        inputs = [torch.randn(4, 300) * 100, torch.ones(4, 300), torch.zeros(4, 300), torch.randn(4, 300) * 1e6]
        for flux in inputs:
            params, latent, spectrum = model(flux, torch.zeros(1))
            c = model.config
            assert torch.all(params[:, 0] >= c.teff_min) and torch.all(params[:, 0] <= c.teff_max)
            assert torch.all(params[:, 1] >= c.logg_min) and torch.all(params[:, 1] <= c.logg_max)
            assert torch.all(params[:, 2] >= c.feh_min) and torch.all(params[:, 2] <= c.feh_max)
            assert torch.all(latent.abs() <= 1) and torch.all(torch.isfinite(spectrum)) and torch.all(spectrum > 0)


def test_atmosphere_is_physical():
    model = _tiny()
    params = torch.tensor([[3500.0, 4.8, -1.0], [5800.0, 4.4, 0.0], [20000.0, 3.5, 0.3]])
    with torch.no_grad():
        temperature, dtau_line, dtau_cont = model.atmosphere(params, torch.zeros(3, 4))
        spectrum = model.generate(params)
    assert temperature.shape == (3, 8) and dtau_line.shape == (3, 8, 300) and dtau_cont.shape == (3, 8, 1)
    assert torch.all(temperature[:, 1:] > temperature[:, :-1])  # monotone with depth
    assert torch.all(dtau_line >= 0) and torch.all(dtau_cont > 0)
    # the Eddington grey atmosphere: T(tau = 2/3) ~ Teff at the start of training (corrections small)
    assert torch.all((temperature.min(1).values < params[:, 0]) & (temperature.max(1).values > params[:, 0]))
    # line opacity only absorbs when T falls outwards: normalised flux <= 1 (broadening keeps it)
    assert torch.all(spectrum <= 1.0 + 1e-5) and torch.all(spectrum > 0)


def test_reduced_chi2_by_hand():
    model = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    flux = torch.tensor([[1.1, 0.8, 1.0, 5.0]])
    ivar = torch.tensor([[100.0, 25.0, 4.0, 0.0]])  # the last pixel is unusable
    # (1 + 1 + 0) / 3 usable pixels
    assert float(reduced_chi2(model, flux, ivar)[0]) == pytest.approx(2 / 3)


def test_loss_trains_both_paths_and_mc_dropout_moves_the_parameters():
    model = _tiny().train()
    flux = 1.0 + 0.01 * torch.randn(4, 300)
    ivar = torch.full((4, 300), 1e4)
    params = torch.tensor([[5000.0, 4.5, 0.0]] * 4)
    loss, metrics = model.loss(flux, ivar, params)
    loss.backward()
    assert set(metrics) == {"loss", "chi2_median", "chi2_true_params_median", "param"}
    assert model.phi.grad is not None and float(model.phi.grad.abs().sum()) > 0
    assert float(model.embed.weight.grad.abs().sum()) > 0
    with torch.no_grad():
        a = model(flux, torch.zeros(1))[0]
        b = model(flux, torch.zeros(1))[0]
    assert not torch.equal(a, b)


def test_quick_training_writes_a_report_with_every_row(tmp_path, capsys):
    import json

    from specserve.export.cli import main

    run = tmp_path / "run"
    assert main(["train", "physformer", "--quick", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "PhysFormer trained in" in out and "ablation plain_decoder trained in" in out
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "report.json", "report.png", "error_vs_snr.png"):
        assert (run / name).is_file(), name
    assert (run / "ablations" / "plain_decoder" / "checkpoint.pt").is_file()
    report = json.loads((run / "report.json").read_text())
    assert set(report["rows"]) == {"physformer", "ridge", "knn", "cannon_quadratic", "plain_decoder"}
    assert report["snr_levels"] == ["100", "50", "20", "10", "5"]
    for name, row in report["rows"].items():
        for key in ["native"] + [f"snr/{s}" for s in report["snr_levels"]]:
            metrics = row["native"] if key == "native" else row["snr"][key.split("/")[1]]
            assert metrics["fgk"]["n"] > 0 and all(v >= 0 for v in metrics["fgk"]["mae"].values()), name
    pf = report["rows"]["physformer"]
    # the squashing keeps every output inside the box, whatever the input
    assert pf["native"]["in_box_fraction"] == 1.0
    assert all(pf["snr"][s]["in_box_fraction"] == 1.0 for s in report["snr_levels"])
    assert set(report["in_box_non_stellar"]) == {"pure_noise", "wild_noise", "all_ones", "qso_template"}
    assert all(v == 1.0 for v in report["in_box_non_stellar"].values())
    assert report["rows"]["knn"]["k"] in (3, 5, 10, 20) and report["generation"]["median_residual_rms"] > 0
    assert pf["reduced_chi2"]["p10"] <= pf["reduced_chi2"]["p50"] <= pf["reduced_chi2"]["p90"]
    # the refinement diagnostic: one Gauss-Newton step at native S/N, and why it helps or not
    refinement = pf["refinement"]["native"]
    assert set(refinement["refined"]) == {"sigma_sys=0.05,steps=1"}
    assert refinement["n"] == pf["native"]["fgk"]["n"]
    assert np.isclose(refinement["encoder"]["teff"], pf["native"]["fgk"]["mae"]["teff"], rtol=1e-6)
    assert 0.0 <= refinement["catalogue_fits_better_fraction"] <= 1.0
    assert all(v > 0 for v in refinement["chi2_per_pixel_median"].values())
    target = report["target"]
    assert target["coverage_1sigma"] == [0.60, 0.76] and set(target["coverage_in_range"]) == {"native", *report["snr_levels"]}
    assert np.isclose(target["snr_lowest_teff_over_native"],
                      pf["snr"]["5"]["fgk"]["mae"]["teff"] / pf["native"]["fgk"]["mae"]["teff"])
    # the MC spread is calibrated on the validation split: one positive factor per parameter, kept
    # in the checkpoint; with it the test split's 1-sigma coverage is near 68 % (a tiny 2-epoch model)
    from specserve.training.trainer import load_checkpoint

    checkpoint = load_checkpoint(run / "checkpoint.pt")
    scale = checkpoint["calibration"]["std_scale"]
    assert len(scale) == 3 and all(np.isfinite(v) and v > 0 for v in scale)
    np.testing.assert_allclose(checkpoint["state_dict"]["std_scale"].numpy(), scale, rtol=1e-6)
    assert all(0.4 <= c <= 0.9 for c in pf["uncertainty"]["coverage_1sigma"].values()), pf["uncertainty"]
    # coverage and spread per S/N bin (constant raw noise); the native row matches the one above
    by_snr = pf["uncertainty_by_snr"]
    assert set(by_snr) == {"native", *report["snr_levels"]}
    assert by_snr["native"]["all"]["coverage_1sigma"] == pytest.approx(pf["uncertainty"]["coverage_1sigma"])
    for s in report["snr_levels"]:
        assert by_snr[s]["fgk"]["n"] > 0 and all(0 <= c <= 1 for c in by_snr[s]["fgk"]["coverage_1sigma"].values())
        assert all(v > 0 for v in by_snr[s]["fgk"]["median_std"].values())
    # re-evaluation from the run folder gives the same baseline numbers
    assert main(["eval", "physformer", "--run", str(run)]) == 0
    again = json.loads((run / "report.json").read_text())
    assert again["rows"]["knn"] == report["rows"]["knn"] and again["rows"]["ridge"] == report["rows"]["ridge"]


def test_training_augmentation_is_raw_level_through_the_pipeline():
    """The pool's augmented spectra are raw spectra perturbed, then normalised by the serving
    pipeline: on the model grid, continuum near 1, noisier than observed, reused in turn."""
    from specserve.training import common
    from specserve.training.inputs import training_pool
    from specserve.training.physformer.model import PhysFormerConfig

    bench = common.load_set("stars")
    idx = bench.split_indices("train")[:40]
    cfg = PhysFormerConfig(augment_fraction=1.0, augment_snr_min=5.0, augment_snr_max=10.0, augment_pool=2)
    pool = training_pool(cfg, bench, idx, np.random.default_rng(0))
    first, second, third = pool.epoch(0), pool.epoch(1), pool.epoch(2)
    assert third is first and second is not first
    observed = bench.arrays["flux"][idx]
    good = ~(first.mask | bench.arrays["mask"][idx])
    assert first.flux.shape == observed.shape
    assert 0.8 < np.median(first.flux[good]) < 1.1  # normalised after the noise, by the pipeline
    # S/N 5-10 on the raw flux: far more scatter around the observed spectra than they had
    scatter = np.median(np.abs(first.flux - observed)[good])
    assert scatter > 0.05
    assert not np.array_equal(first.flux, second.flux)


def test_training_window_generates_exactly_the_full_grid_pixels():
    torch.manual_seed(0)
    model = PhysFormer(PhysFormerConfig(n_pixels=600, train_window=128, n_layers=6, n_components=4, n_nodes=3,
                                        d_model=16, n_heads=2, ffn=32, encoder_hidden=32, decoder_hidden=32))
    params = torch.tensor([[5000.0, 4.0, 0.0], [9000.0, 3.0, -1.5]])
    with torch.no_grad():
        full = model.eval().generate(params)
        model.train()
        windows = [model.training_window() for _ in range(50)]
        for window, scored in windows[:5]:
            part = model.generate(params, None, window)
            inner = slice(scored.start - window.start, scored.stop - window.start)
            # the scored pixels are bit for bit the full grid's; only the broadening margins differ
            torch.testing.assert_close(part[:, inner], full[:, scored], rtol=0, atol=0)
    half = model.kernel.numel() // 2
    assert half >= 1
    assert all(w.stop - w.start == 128 and s.start == w.start + half and s.stop == w.stop - half and 0 <= w.start
               and w.stop <= 600 for w, s in windows)
    assert len({w.start for w, _ in windows}) > 10
    # evaluation always sees the whole grid
    assert model.eval().training_window() == (slice(None), slice(None))


def test_noise_aware_encoder_reads_the_ivar_and_is_trained_through_it():
    """noise_input='sigma': the same flux told a different noise gives other parameters, a masked
    pixel counts as the noisiest, the noise embedding gets gradients, and the encoder refuses to
    run without an ivar."""
    torch.manual_seed(0)
    model = PhysFormer(PhysFormerConfig(n_pixels=300, patch_size=32, d_model=16, n_heads=2, depth=1, ffn=32,
                                        encoder_hidden=16, decoder_hidden=32, n_layers=8, n_components=4, n_nodes=4,
                                        noise_input="sigma", dropout=0.0)).eval()
    flux = 1.0 + 0.01 * torch.randn(2, 300)
    quiet, noisy = torch.full((2, 300), 1e4), torch.full((2, 300), 25.0)  # S/N 100 and 5
    with torch.no_grad():
        a = model.encode(flux, torch.zeros(()), quiet)[0]
        b = model.encode(flux, torch.zeros(()), noisy)[0]
        assert not torch.allclose(a, b)
        masked = quiet.clone()
        masked[:, :64] = 0.0
        ceiling = quiet.clone()
        ceiling[:, :64] = 1e-6  # sigma far above the ceiling: the same feature as masked
        torch.testing.assert_close(model.noise_tokens(masked), model.noise_tokens(ceiling))
    with pytest.raises(ValueError, match="needs the ivar"):
        model.encode_features(flux)
    model.train()
    loss, _ = model.loss(flux, quiet, torch.tensor([[5000.0, 4.5, 0.0]] * 2), encoder_ivar=noisy)
    loss.backward()
    assert float(model.embed_noise.weight.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="noise_input"):
        PhysFormerConfig(noise_input="snr")


def test_std_factor_interpolates_the_calibration_table_in_log_snr():
    """The S/N calibration factor: the table's row at a knot, linear in log10 S/N between knots,
    constant beyond the end knots; the S/N comes from the ivar's usable pixels only."""
    from specserve.training.physformer.model import STD_KNOTS_SNR

    model = _tiny()
    table = torch.arange(len(STD_KNOTS_SNR) * 3, dtype=torch.float32).reshape(-1, 3) + 1.0
    model.std_table.copy_(table)

    def at(snr: float) -> torch.Tensor:
        ivar = torch.full((1, 300), snr ** 2)
        ivar[:, :50] = 0.0  # masked pixels do not count
        return model.std_factor(ivar)[0]

    for k, snr in enumerate(STD_KNOTS_SNR):
        torch.testing.assert_close(at(snr), table[k])
    mid = 10 ** ((np.log10(20.0) + np.log10(50.0)) / 2)
    torch.testing.assert_close(at(mid), (table[2] + table[3]) / 2)
    torch.testing.assert_close(at(1.0), table[0])
    torch.testing.assert_close(at(5000.0), table[-1])


def test_snr_calibration_of_a_noise_aware_run(tmp_path, capsys):
    """A quick noise-aware, semi-supervised run calibrated per S/N: a positive factor per parameter
    and knot in the checkpoint, used by the report's per-S/N coverage; the unlabelled SDSS spectra
    reach every training step."""
    import json

    from specserve.export.cli import main
    from specserve.training.trainer import load_checkpoint

    run = tmp_path / "run"
    assert main(["train", "physformer", "--quick", "--no-ablation", "--out", str(run), "--set", "noise_input=sigma",
                 "--set", "calibration=snr", "--set", "blind_ivar_fraction=0.5",
                 "--set", "unlabelled_sources=sdss_dr12", "--set", "unlabelled_batch=4"]) == 0
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [s for s in steps if "train/loss" in s]
    assert trained and all(s["train/chi2_unlabelled_median"] > 0 for s in trained)
    checkpoint = load_checkpoint(run / "checkpoint.pt")
    table = np.asarray(checkpoint["calibration"]["std_table"])
    assert table.shape == (6, 3) and np.all(np.isfinite(table)) and np.all(table > 0)
    np.testing.assert_allclose(checkpoint["state_dict"]["std_table"].numpy(), table, rtol=1e-6)
    assert "FGK 1-sigma coverage" in capsys.readouterr().out
    report = json.loads((run / "report.json").read_text())
    assert set(report["rows"]["physformer"]["uncertainty_by_snr"]) == {"native", "100", "50", "20", "10", "5"}


def test_refinement_pulls_a_wrong_estimate_to_the_generator_s_own_spectrum():
    """Where the generator is exact (the observed spectrum is its own output), Gauss-Newton steps
    from an estimate 400 K too hot with a wide prior land near the truth, inside the box; a tight
    prior keeps the estimate near where it was; a spectrum with no usable pixel is left alone."""
    from specserve.training.physformer.refine import refine

    model = _tiny()
    with torch.no_grad():
        model.phi.add_(3.0)  # deeper lines than at initialisation: Teff shows in the spectrum
        truth = torch.tensor([[5500.0, 4.0, -0.3], [4800.0, 2.5, -1.0]])
        latent = torch.zeros(2, 4)
        flux = model.generate(truth, latent).numpy()
    ivar = np.full_like(flux, 1e4)
    start = truth.numpy().astype(np.float64) + [400.0, 0.0, 0.0]
    wide = np.array([[800.0, 1.0, 1.0]] * 2)
    refined = refine(model, flux, ivar, start, wide, latent.numpy(), steps=4, sigma_sys=0.0)
    assert np.all(np.abs(refined[:, 0] - truth[:, 0].numpy()) < 40.0), refined
    lo, hi = model.box_min.numpy(), model.box_max.numpy()
    assert np.all((refined >= lo) & (refined <= hi))
    tight = refine(model, flux, ivar, start, wide * 1e-3, latent.numpy(), steps=4, sigma_sys=0.0)
    assert np.all(np.abs(tight[:, 0] - start[:, 0]) < 0.1 * np.abs(refined[:, 0] - start[:, 0])), tight
    blind = refine(model, flux, np.zeros_like(ivar), start, wide, latent.numpy(), steps=2, sigma_sys=0.0)
    np.testing.assert_allclose(blind, start, rtol=1e-4)


def test_unlabelled_spectra_join_the_loss_through_their_reconstruction_only():
    """Semi-supervised training: unlabelled spectra add ``unlabelled_weight`` times the mean
    log1p chi-square of their reconstruction from the encoder's estimate, whose gradient reaches
    the encoder; with weight 0 the loss is the labelled one."""
    import dataclasses

    model = _tiny().train()
    g = torch.Generator().manual_seed(1)
    flux = 1.0 - 0.1 * torch.rand(4, 300, generator=g)
    ivar = torch.full_like(flux, 400.0)
    params = torch.tensor([[5000.0, 4.0, 0.0]] * 4)
    u_flux, u_ivar = 1.0 - 0.2 * torch.rand(4, 300, generator=g), torch.full_like(flux, 100.0)
    torch.manual_seed(0)
    base, metrics = model.loss(flux, ivar, params)
    torch.manual_seed(0)
    total, metrics_u = model.loss(flux, ivar, params, flux, ivar, u_flux, u_ivar)
    assert "chi2_unlabelled_median" not in metrics and metrics_u["chi2_unlabelled_median"] > 0
    assert float(total) > float(base)
    model.zero_grad()
    (total - base).backward()
    assert model.embed.weight.grad.abs().sum() > 0  # the encoder learns from the unlabelled term
    assert model.dec[0].weight.grad.abs().sum() > 0  # and so does the generator
    off = PhysFormer(dataclasses.replace(model.config, unlabelled_weight=0.0))
    off.load_state_dict(model.state_dict())
    off.train()
    torch.manual_seed(0)
    zero, _ = off.loss(flux, ivar, params, flux, ivar, u_flux, u_ivar)
    torch.testing.assert_close(zero, base)
    with pytest.raises(ValueError, match="unlabelled_weight"):
        dataclasses.replace(model.config, unlabelled_weight=-1.0)
