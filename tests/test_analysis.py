"""The domain data plane on real spectra: preprocessing per model, applicability, per-spectrum errors."""

from __future__ import annotations

import numpy as np
import pytest
from test_contract_export import ToyFreeEnergy

from specserve.export.onnx_export import export_model
from specserve.export.repository import write_model
from specserve.runtime.contract import ModelCard, fill_masked
from specserve.runtime.embedded.analysis import Analyzer, SpectrumInput
from specserve.runtime.engine.repository import load_repository
from specserve.runtime.errors import InvalidSpectrumError, ModelNotFoundError, ModelNotReadyError
from specserve.runtime.io import read_spectra
from specserve.runtime.preprocess import OPTICAL_PREPROCESSING


@pytest.fixture(scope="module")
def analyzer(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("repo")
    card = ModelCard(kind="rbm", preprocessing=OPTICAL_PREPROCESSING, class_names=("non_cv", "cv"))
    module = ToyFreeEnergy(card.dims["n_pixels"])
    report = export_model(module, card, tmp / "build" / "model.onnx", atol=1e-5, rtol=1e-4)
    write_model(tmp / "repo", "rbm", 1, report.path, card)
    (tmp / "repo" / "broken" / "1").mkdir(parents=True)
    (tmp / "repo" / "broken" / "1" / "model.onnx").write_bytes(b"junk")
    return Analyzer(load_repository(tmp / "repo")), module


def test_real_spectra_match_direct_preprocessing_and_session(kit, analyzer):
    az, module = analyzer
    files = sorted((kit / "lamost_dr1/fits").glob("*.fits"))[:5] + [kit / "sdss_dr12/spec-3764-55514-0972.fits"]
    spectra = [read_spectra(f)[0] for f in files]
    outcomes = az.analyze([SpectrumInput.from_spectrum(s) for s in spectra])
    import torch
    n_applicable = 0
    for s, outcome in zip(spectra, outcomes):
        assert outcome.error is None and outcome.id == s.meta.object_id
        (result,) = outcome.results
        assert result.model == "rbm" and result.version == "1"
        # a spectrum sharper than the grid (SDSS, R 2000) is broadened to it, as the sets' spectra are
        sharper = s.meta.resolution is not None and s.meta.resolution > OPTICAL_PREPROCESSING.grid.resolution
        prepared = OPTICAL_PREPROCESSING.apply(s.wavelength, s.flux, s.ivar, s.mask, z=s.meta.extra["z"],
                                               source_resolution=s.meta.resolution if sharper else None)
        coverage = 1 - prepared.mask.mean()
        assert result.applicable == (coverage >= 0.75)
        if not result.applicable:
            assert f"covers {coverage:.0%}" in result.reason
            continue
        n_applicable += 1
        with torch.no_grad():
            probs, free = module(torch.from_numpy(fill_masked(prepared.flux, prepared.mask)[None]))
        assert result.values["p_cv"] == pytest.approx(float(probs[0, 1]), rel=1e-4, abs=1e-6)
        assert result.values["free_energy_non_cv"] == pytest.approx(float(free[0, 0]), rel=1e-4, abs=1e-4)
        assert result.values["p_cv"] + result.values["p_non_cv"] == pytest.approx(1.0, abs=1e-6)
    assert n_applicable >= 4 and any(s.meta.source_format == "sdss_spec" for s in spectra)


def test_bad_spectra_fail_alone(analyzer):
    az, _ = analyzer
    wave = np.linspace(3600, 7500, 3000)
    good = SpectrumInput("good", wave, np.ones(3000))
    bad = [
        SpectrumInput("nan", wave, np.full(3000, np.nan)),
        SpectrumInput("empty", np.array([]), np.array([])),
        SpectrumInput("mismatch", wave, np.ones(2999)),
        SpectrumInput("unsorted", wave[::-1], np.ones(3000)),
        SpectrumInput("bad-z", wave, np.ones(3000), redshift=float("nan")),
    ]
    outcomes = az.analyze([bad[0], good] + bad[1:])
    by_id = {o.id: o for o in outcomes}
    assert by_id["good"].error is None and by_id["good"].results[0].applicable
    for s in bad:
        assert isinstance(by_id[s.id].error, InvalidSpectrumError), s.id
        assert by_id[s.id].results == []


def test_not_applicable_when_grid_not_covered(analyzer, monkeypatch):
    from specserve.runtime.embedded import analysis

    az, _ = analyzer
    prepared = []
    real_prepare = analysis.prepare

    def counting(recipe, spectra):
        prepared.extend(s.id for s in spectra)
        return real_prepare(recipe, spectra)

    monkeypatch.setattr(analysis, "prepare", counting)
    half = np.linspace(3600, 5200, 2000)  # a blue arm alone: about a third of the grid
    outcomes = az.analyze([SpectrumInput("ir", np.linspace(15100, 16900, 4000), np.ones(4000)),  # APOGEE
                           SpectrumInput("blue", half, np.ones(2000)),
                           SpectrumInput("full", np.linspace(3600, 7500, 3000), np.ones(3000))])
    ir, blue, full = (o.results[0] for o in outcomes)
    assert not ir.applicable and "covers 0% of the model grid" in ir.reason
    assert not blue.applicable and "of the model grid" in blue.reason and full.applicable
    # the two that cannot cover the grid were turned away before their preprocessing
    assert prepared == ["full"]


def test_span_coverage_bounds_the_coverage_from_above(kit):
    from specserve.runtime.pipeline import prepare_raw, span_coverage

    files = sorted((kit / "lamost_dr1/fits").glob("*.fits"))[:8] + [kit / "sdss_dr12/spec-3764-55514-0972.fits"]
    spectra = [SpectrumInput.from_spectrum(read_spectra(f)[0]) for f in files]
    cut = [s.with_arrays(wavelength=s.wavelength[: len(s.flux) // 3], flux=s.flux[: len(s.flux) // 3],
                         ivar=None if s.ivar is None else s.ivar[: len(s.flux) // 3],
                         mask=None if s.mask is None else s.mask[: len(s.flux) // 3]) for s in spectra]
    for s in spectra + cut:
        exact = float(prepare_raw(OPTICAL_PREPROCESSING, [s]).coverage[0])
        assert exact <= span_coverage(OPTICAL_PREPROCESSING, s) + 1e-12, s.id
    assert min(span_coverage(OPTICAL_PREPROCESSING, s) for s in cut) < 0.75


def test_unknown_and_unready_models(analyzer):
    az, _ = analyzer
    spectrum = SpectrumInput("x", np.linspace(3600, 7500, 100), np.ones(100))
    with pytest.raises(ModelNotFoundError, match="unknown model 'nope'"):
        az.analyze([spectrum], ["nope"])
    with pytest.raises(ModelNotReadyError, match="broken"):
        az.analyze([spectrum], ["broken"])
    assert [m.name for m in az.resolve(None)] == ["rbm"]


def test_several_models_run_side_by_side_and_merge_in_model_order(tmp_path, kit):
    card = ModelCard(kind="rbm", preprocessing=OPTICAL_PREPROCESSING, class_names=("non_cv", "cv"))
    modules = {}
    for i, name in enumerate(("a_first", "b_second", "c_third")):
        import torch

        torch.manual_seed(i)
        modules[name] = ToyFreeEnergy(card.dims["n_pixels"])
        report = export_model(modules[name], card, tmp_path / name / "model.onnx", atol=1e-5, rtol=1e-4)
        write_model(tmp_path / "repo", name, 1, report.path, card)
    az = Analyzer(load_repository(tmp_path / "repo"))
    files = sorted((kit / "lamost_dr1/fits").glob("*.fits"))[:6]
    spectra = [SpectrumInput.from_spectrum(read_spectra(f)[0]) for f in files]
    alone = {name: az.analyze(spectra, [name]) for name in modules}
    for _ in range(5):
        outcomes = az.analyze(spectra)  # every model, run concurrently
        for k, outcome in enumerate(outcomes):
            assert [r.model for r in outcome.results] == ["a_first", "b_second", "c_third"]
            for result in outcome.results:  # each model's answer is the one it gives alone
                assert result.values == alone[result.model][k].results[0].values


def test_models_on_one_grid_share_one_preprocessing(tmp_path, kit, monkeypatch):
    """Three models with the same recipe: each message is resampled and normalised once, not once
    per model, and each model still answers as it does alone."""
    import specserve.runtime.embedded.analysis as analysis

    card = ModelCard(kind="rbm", preprocessing=OPTICAL_PREPROCESSING, class_names=("non_cv", "cv"))
    for i, name in enumerate(("a", "b", "c")):
        import torch

        torch.manual_seed(10 + i)
        report = export_model(ToyFreeEnergy(card.dims["n_pixels"]), card, tmp_path / name / "model.onnx",
                              atol=1e-5, rtol=1e-4)
        write_model(tmp_path / "repo", name, 1, report.path, card)
    az = Analyzer(load_repository(tmp_path / "repo"))
    files = sorted((kit / "lamost_dr1/fits").glob("*.fits"))[:4]
    spectra = [SpectrumInput.from_spectrum(read_spectra(f)[0]) for f in files]
    alone = {name: az.analyze(spectra, [name]) for name in "abc"}
    calls = []
    real = analysis.prepare
    monkeypatch.setattr(analysis, "prepare", lambda recipe, batch: calls.append(len(batch)) or real(recipe, batch))
    outcomes = az.analyze(spectra)
    assert len(calls) == 1 and calls[0] <= len(spectra)
    for k, outcome in enumerate(outcomes):
        assert [r.model for r in outcome.results] == ["a", "b", "c"]
        for result in outcome.results:
            assert result.applicable == alone[result.model][k].results[0].applicable
            assert result.values == alone[result.model][k].results[0].values
