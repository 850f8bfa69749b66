"""One data path: every benchmark set is the serving pipeline's output for its raw spectra, and
noise is added to raw flux, where it happens.

The set-equivalence tests take a sample of each built set, regenerate its raw spectra
(:func:`~specserve.training.benchsets.raw_spectra`), send them through what a client and the
server do (the client's proto encoding, the server's decoding, :func:`checked` and
:func:`prepare` with the model card's recipe) and require the set's arrays back."""

from __future__ import annotations

import numpy as np
import pytest

from specserve.runtime.pipeline import checked, prepare, prepare_raw
from specserve.runtime.spectrum import SpectrumInput
from specserve.runtime.wire import spectrum_from_proto, to_proto
from specserve.training import common
from specserve.training.benchsets import raw_spectra
from specserve.training.inputs import PERTURBATIONS, RawInputs, evaluation_variants
from specserve.training.perturb import degrade, resample_native, shift

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["giants", "stars", "cv"])
def sample(request):
    bench = common.load_set(request.param)
    rng = np.random.default_rng(11)
    idx = np.sort(rng.choice(bench.size, 16, replace=False))
    return bench, idx, raw_spectra(bench, idx)


def test_raw_spectra_are_raw(sample):
    bench, idx, raws = sample
    grid = bench.preprocessing.grid
    for raw in raws:  # on the instrument's own pixels, not on the model grid
        assert raw.wavelength.size != grid.length or not np.allclose(raw.wavelength, grid.wavelength)
        assert raw.ivar is not None
    if bench.name in ("giants", "cv"):  # synthetic: noise at the set's S/N, per native pixel, in flux units
        a = bench.arrays
        for i, raw in zip(idx, raws):
            if np.isfinite(a["snr"][i]):
                good = ~raw.mask & (raw.ivar > 0)
                measured = np.median(raw.flux[good]) * np.sqrt(np.median(raw.ivar[good]))
                assert measured == pytest.approx(float(a["snr"][i]), rel=0.05)
    if bench.name == "giants":
        assert {r.wavelength.size for r in raws} == {7214}
        assert all(abs(np.median(r.flux[~r.mask]) - 1.0) > 0.5 for r in raws)  # The Payne's unnormalised flux


def test_set_equals_the_pipeline_on_its_raw_spectra(sample):
    bench, idx, raws = sample
    a = bench.arrays
    out = prepare_raw(bench.preprocessing, raws)
    np.testing.assert_array_equal(out.mask, a["mask"][idx])
    # same code, other batch composition: BLAS may change the last bit of float32
    np.testing.assert_allclose(out.flux, a["flux"][idx], rtol=0, atol=2e-6)
    np.testing.assert_allclose(out.ivar, a["ivar"][idx], rtol=2e-5, atol=0)


def test_set_equals_what_the_server_makes_of_the_raw_spectra_it_receives(sample):
    bench, idx, raws = sample
    a = bench.arrays
    received = [checked(spectrum_from_proto(to_proto(r))) for r in raws]
    out = prepare(bench.preprocessing, received)
    np.testing.assert_array_equal(out.mask, a["mask"][idx])
    np.testing.assert_allclose(out.flux, a["flux"][idx], rtol=0, atol=2e-5)
    np.testing.assert_allclose(out.ivar, a["ivar"][idx], rtol=1e-4, atol=0)


def test_evaluation_variants_are_deterministic_and_differ(sample):
    bench, idx, _ = sample
    first = evaluation_variants(bench, idx[:4], (20.0,), seed=5)
    again = evaluation_variants(bench, idx[:4], (20.0,), seed=5)
    assert set(first) == {"native", "snr_constant_20", "snr_photon_20"} | {f"perturb_{k}" for k in PERTURBATIONS}
    for key in first:
        for a, b in zip(first[key], again[key]):
            np.testing.assert_array_equal(a.flux, b.flux)
    assert not np.array_equal(first["snr_constant_20"][0].flux, first["snr_photon_20"][0].flux)


def _line_spectrum(n: int = 4000) -> SpectrumInput:
    wave = 4000.0 * 10 ** (1e-4 * np.arange(n))
    flux = 100.0 * (1.0 - 0.6 * np.exp(-0.5 * ((wave - 5000.0) / 2.0) ** 2)) * (wave / 5000.0) ** -1
    return SpectrumInput("line", wave, flux.astype(np.float32))


@pytest.mark.parametrize("noise", ["constant", "photon"])
def test_degrade_reaches_the_target_snr_in_raw_flux_units(noise):
    raw = _line_spectrum()
    out = degrade(raw, 20.0, np.random.default_rng(0), noise)
    sigma = 1.0 / np.sqrt(out.ivar)
    snr = raw.flux / sigma
    assert np.median(snr) == pytest.approx(20.0, rel=0.02)
    resid = (out.flux - raw.flux) / sigma
    assert abs(resid.mean()) < 0.05 and resid.std() == pytest.approx(1.0, rel=0.05)
    if noise == "photon":  # sigma ~ sqrt(flux): S/N lower in the line core than on the continuum
        core = int(np.argmin(np.abs(raw.wavelength - 5000.0)))
        expected = 20.0 * np.sqrt(raw.flux[core] / np.median(raw.flux))
        assert snr[core] == pytest.approx(expected, rel=1e-3) and snr[core] < 0.8 * 20.0
        np.testing.assert_allclose(sigma**2 / raw.flux, np.median(sigma**2 / raw.flux), rtol=1e-4)
    else:
        np.testing.assert_allclose(sigma, sigma[0], rtol=1e-5)


def test_degrade_keeps_noise_that_is_already_larger():
    raw = _line_spectrum()
    noisy = raw.with_arrays(ivar=np.full(raw.flux.size, 1 / 25.0, np.float32))  # sigma 5: S/N ~ 20
    out = degrade(noisy, 100.0, np.random.default_rng(0))
    np.testing.assert_array_equal(out.flux, noisy.flux)
    np.testing.assert_array_equal(out.ivar, noisy.ivar)


def test_noise_before_normalisation_differs_from_noise_after():
    """The upper-envelope continuum fit moves with raw noise: the noisy normalised spectrum is
    biased against the noiseless one, which noise added after normalisation would not show."""
    bench = common.load_set("stars")
    recipe = bench.preprocessing
    raw = RawInputs(bench, bench.split_indices("test")[:24])
    clean = raw.prepare(raw.raws)
    noisy = raw.at_snr(5.0, np.random.default_rng(1))
    good = ~(clean.mask | noisy.mask)
    ratio = np.median(noisy.flux[good]) / np.median(clean.flux[good])
    assert ratio < 0.99, "raw-level noise at S/N 5 should pull the normalised flux below the noiseless one"
    assert recipe.clip_lower == 1.0


def test_perturbations_act_on_raw_spectra():
    raw = _line_spectrum()
    moved = shift(raw, 30.0)
    assert moved.wavelength[0] == pytest.approx(raw.wavelength[0] * (1 + 30.0 / 299792.458))
    np.testing.assert_array_equal(moved.flux, raw.flux)
    coarse = resample_native(raw, 1.5)
    assert coarse.wavelength.size < raw.wavelength.size / 1.4
    core = coarse.wavelength[np.argmin(coarse.flux[500:2000]) + 500]
    assert core == pytest.approx(5000.0, abs=1.0)
    linear = resample_native(raw, 1.0, linear=True)
    assert np.allclose(np.diff(linear.wavelength), np.diff(linear.wavelength)[0])


def test_a_spectrum_sent_without_ivar_gets_an_estimated_noise_level():
    """No ivar from the client: the model input's ivar is a constant estimated from the normalised
    flux (DER_SNR), near the true 1/sigma^2, and 0 at masked pixels; has_ivar stays False (no
    chi-square is reported for it); a spectrum with its own ivar keeps it."""
    from specserve.runtime.preprocess import LogLinearGrid, Preprocessing

    grid = LogLinearGrid.from_range(4000, 6000, step=1e-4, resolution=1800)
    recipe = Preprocessing(grid)
    wave = np.geomspace(3900, 6100, 5000)
    rng = np.random.default_rng(0)
    snr = 50.0
    flux = 100.0 * (1 + 0.1 * np.sin(wave / 300)) + rng.normal(0, 100.0 / snr, wave.size)
    mask = np.zeros(wave.size, bool)
    mask[1000:1100] = True
    blind = SpectrumInput("blind", wave, flux, mask=mask)
    told = SpectrumInput("told", wave, flux, ivar=np.full(wave.size, (snr / 100.0) ** 2), mask=mask)
    prepared = prepare(recipe, [checked(blind), checked(told)])
    assert list(prepared.has_ivar) == [False, True]
    ivar = prepared.model_ivar()
    usable = ~prepared.mask[0]
    assert np.all(ivar[0][~usable] == 0) and (~usable).any()
    values = np.unique(ivar[0][usable])
    assert values.size == 1  # one constant per spectrum
    # the normalised flux is ~1, so the estimate is ~snr^2 (resampling onto the grid changes the
    # per-pixel noise a little; the told spectrum's own ivar shows by how much)
    told_level = np.median(ivar[1][usable])
    assert 0.6 < values[0] / told_level < 1.6, (values[0], told_level)
    assert 0.3 * snr**2 < values[0] < 3 * snr**2
