"""Tests of specserve.runtime.preprocess: grids, resampling, broadening, normalisation, S/N, noise."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from specserve.runtime import preprocess as pp
from specserve.runtime.errors import GridError, InvalidSpectrumError

GRID = pp.LogLinearGrid.from_range(3700.0, 7400.0, 1e-4, 1800.0)
BALMER = (4102.9, 4341.7, 4862.7, 6564.6)


def _gauss(x: np.ndarray, centre: float, sigma: float) -> np.ndarray:
    return np.exp(-0.5 * ((x - centre) / sigma) ** 2)


def _line_moments(grid: pp.LogLinearGrid, flux: np.ndarray, centre: float, half: float
                  ) -> tuple[float, float, float]:
    """Centroid, equivalent width and rms width (Angstrom) of 1 - flux within centre +- half."""
    lam = grid.wavelength
    dlam = np.diff(10.0 ** grid.log_edges)
    win = np.abs(lam - centre) < half
    area = (1.0 - flux[win].astype(np.float64)) * dlam[win]
    c = (area * lam[win]).sum() / area.sum()
    rms = math.sqrt((area * (lam[win] - c) ** 2).sum() / area.sum())
    return c, area.sum(), rms


# --- grid -----------------------------------------------------------------------------------


def test_grid_dict_round_trip_is_json_serialisable():
    g = pp.LogLinearGrid(start=np.float64(3.5682), step=1e-4, length=np.int64(3005), resolution=1800)
    d = g.to_dict()
    assert d == {"kind": "log-linear", "start": 3.5682, "step": 1e-4, "length": 3005, "resolution": 1800.0}
    assert type(d["length"]) is int and type(d["start"]) is float
    again = pp.LogLinearGrid.from_dict(json.loads(json.dumps(d)))
    assert again == g
    np.testing.assert_array_equal(again.wavelength, g.wavelength)


@pytest.mark.parametrize("change", [
    {"step": None},  # missing
    {"extra": 1},
    {"kind": "linear"},
    {"step": -1e-4},
    {"step": 0.0},
    {"length": 1},
    {"length": 10.5},
    {"start": float("nan")},
    {"resolution": 0},
    {"resolution": "high"},
])
def test_grid_from_dict_rejects_bad_descriptions(change):
    d = GRID.to_dict()
    for key, value in change.items():
        if value is None:
            del d[key]
        else:
            d[key] = value
    with pytest.raises(GridError):
        pp.LogLinearGrid.from_dict(d)


def test_grid_from_dict_rejects_non_mapping():
    with pytest.raises(GridError):
        pp.LogLinearGrid.from_dict([("kind", "log-linear")])


def test_grid_wavelengths_edges_and_velocity_step():
    g = pp.LogLinearGrid(start=math.log10(4000.0), step=1e-4, length=11, resolution=2000.0)
    assert g.wavelength[0] == pytest.approx(4000.0, rel=1e-12)
    assert g.wavelength[-1] == pytest.approx(4000.0 * 10**1e-3, rel=1e-12)
    assert g.log_wavelength.dtype == np.float64 and g.log_wavelength.shape == (11,)
    assert g.log_edges.shape == (12,)
    centres = 0.5 * (g.log_edges[1:] + g.log_edges[:-1])
    np.testing.assert_allclose(centres, g.log_wavelength, rtol=0, atol=1e-12)
    assert g.log_edges[0] == pytest.approx(g.start - 0.5e-4, abs=1e-12)
    assert g.velocity_step == pytest.approx(299792.458 * math.log(10) * 1e-4)
    assert g.kind == "log-linear"


def test_grid_from_range():
    g = pp.LogLinearGrid.from_range(3700.0, 7400.0, 1e-4, 1800.0)
    assert g.wavelength[0] == pytest.approx(3700.0)
    assert g.wavelength[-1] <= 7400.0 < 10 ** (g.log_wavelength[-1] + g.step)
    exact = pp.LogLinearGrid.from_range(4000.0, 4000.0 * 10**1e-3, 1e-4, 2000.0)
    assert exact.length == 11
    with pytest.raises(GridError):
        pp.LogLinearGrid.from_range(5000.0, 4000.0, 1e-4, 2000.0)


# --- resample -------------------------------------------------------------------------------

LINE_CENTRES = [4101.37, 4861.93, 5500.123, 6563.41]


@pytest.mark.parametrize("centre", LINE_CENTRES)
@pytest.mark.parametrize("depth", [0.6, -2.0], ids=["absorption", "emission"])
@pytest.mark.parametrize(("pixel", "sigma"), [(0.3, 2.0), (1.4, 3.0)], ids=["fine", "coarse"])
def test_resample_keeps_line_centre_and_equivalent_width(centre, depth, pixel, sigma):
    wave = np.arange(3900.0, 6800.0, pixel)
    flux = 1.0 - depth * _gauss(wave, centre, sigma)
    out = pp.resample(wave, flux, None, GRID)
    c, ew, _ = _line_moments(GRID, out.flux, centre, 8 * sigma)
    out_pixel = centre * math.log(10) * GRID.step
    assert abs(c - centre) < 0.1 * out_pixel
    assert ew == pytest.approx(depth * sigma * math.sqrt(2 * math.pi), rel=0.01)


def test_resample_constant_flux_stays_constant():
    rng = np.random.default_rng(3)  # irregular sampling: pixels 0.3-1.3 A wide, no hole
    wave = 3650.0 + np.cumsum(rng.uniform(0.3, 1.3, 5000))
    out = pp.resample(wave, np.full(wave.size, 3.7), np.full(wave.size, 4.0), GRID)
    assert not out.mask.any()
    np.testing.assert_allclose(out.flux, 3.7, rtol=1e-6)
    assert out.flux.dtype == np.float32 and out.ivar.dtype == np.float32 and out.mask.dtype == bool


def test_resample_ivar_matches_empirical_variance():
    rng = np.random.default_rng(4)
    grid = pp.LogLinearGrid.from_range(5000.0, 5200.0, 1e-4, 2000.0)
    wave = np.arange(4990.0, 5210.0, 0.8)
    sigma = 0.05 * (1.0 + 0.5 * np.sin(wave / 7.0))
    n_real = 4000
    flux = 1.0 + rng.standard_normal((n_real, wave.size)) * sigma
    ivar = np.broadcast_to(1.0 / sigma**2, flux.shape)
    out = pp.resample(wave, flux, ivar, grid)
    assert not out.mask.any()
    np.testing.assert_array_equal(out.ivar, np.broadcast_to(out.ivar[0], out.ivar.shape))
    ratio = out.flux.astype(np.float64).var(axis=0) * out.ivar[0]
    assert ratio.mean() == pytest.approx(1.0, abs=0.02)
    assert np.mean(np.abs(ratio - 1.0) < 0.05) > 0.9


def _input_edges(wave: np.ndarray) -> np.ndarray:
    x = np.log10(wave)
    mid = 0.5 * (x[1:] + x[:-1])
    return np.concatenate([[1.5 * x[0] - 0.5 * x[1]], mid, [1.5 * x[-1] - 0.5 * x[-2]]])


@pytest.mark.parametrize("min_coverage", [0.3, 0.5, 0.9])
def test_resample_coverage_mask(min_coverage):
    grid = pp.LogLinearGrid.from_range(3950.0, 4150.0, 1e-4, 2000.0)
    wave = np.arange(4000.0, 4100.0, 0.7)
    flux = np.ones(wave.size)
    ivar = np.ones(wave.size)
    ivar[(wave > 4040.0) & (wave < 4050.0)] = 0.0
    flux[(wave > 4070.0) & (wave < 4072.0)] = np.nan
    mask = (wave > 4080.0) & (wave < 4083.0)
    out = pp.resample(wave, flux, ivar, grid, mask=mask, min_coverage=min_coverage)
    # Expected good coverage of each output pixel, by brute force over input pixels.
    e = _input_edges(wave)
    good = (ivar > 0) & np.isfinite(flux) & ~mask
    lo, hi = grid.log_edges[:-1, None], grid.log_edges[1:, None]
    overlap = np.clip(np.minimum(e[1:], hi) - np.maximum(e[:-1], lo), 0.0, None)
    coverage = (overlap * good).sum(axis=1) / grid.step
    clear = np.abs(coverage - min_coverage) > 1e-6
    np.testing.assert_array_equal(out.mask[clear], coverage[clear] < min_coverage)
    assert out.mask[grid.wavelength < 3999.0].all() and out.mask[grid.wavelength > 4100.0].all()
    assert out.mask[(grid.wavelength > 4041.0) & (grid.wavelength < 4049.0)].all()
    assert not out.mask[(grid.wavelength > 4010.0) & (grid.wavelength < 4030.0)].any()
    assert (out.ivar[out.mask] == 0).all() and (out.flux[out.mask] == 0).all()
    assert (out.ivar[~out.mask] > 0).all()


def test_resample_per_row_wavelengths_match_row_by_row():
    rng = np.random.default_rng(5)
    z = np.array([0.0, 0.01, 0.03, -0.002, 0.05])
    obs = np.arange(3800.0, 7600.0, 1.0)
    wave = obs[None, :] / (1.0 + z[:, None])
    flux = rng.normal(1.0, 0.1, wave.shape)
    ivar = rng.uniform(50.0, 100.0, wave.shape)
    ivar[2, 500:530] = 0.0
    out = pp.resample(wave, flux, ivar, GRID)
    for row in range(z.size):
        one = pp.resample(wave[row], flux[row], ivar[row], GRID)
        np.testing.assert_array_equal(out.mask[row], one.mask)
        np.testing.assert_allclose(out.flux[row], one.flux, rtol=0, atol=1e-6)
        np.testing.assert_allclose(out.ivar[row], one.ivar, rtol=1e-6)
    shared = pp.resample(obs, flux, ivar, GRID)
    same = pp.resample(np.broadcast_to(obs, flux.shape), flux, ivar, GRID)
    np.testing.assert_allclose(same.flux, shared.flux, rtol=0, atol=1e-6)


def test_resample_row_without_good_pixels_comes_back_masked():
    wave = np.arange(4000.0, 5000.0, 1.0)
    flux = np.ones((2, wave.size))
    flux[1] = np.nan
    out = pp.resample(wave, flux, None, GRID)
    assert out.mask[1].all() and (out.flux[1] == 0).all()
    assert not out.mask[0, (GRID.wavelength > 4010) & (GRID.wavelength < 4990)].any()


@pytest.mark.parametrize(("wave", "flux", "message"), [
    (np.arange(10.0) + 4000.0, np.ones(9), "pixels"),
    (np.array([4000.0, 4001.0, 4001.0, 4002.0]), np.ones(4), "increasing"),
    (np.array([4000.0, 4002.0, 4001.0, 4003.0]), np.ones(4), "increasing"),
    (np.array([4000.0, np.nan, 4002.0, 4003.0]), np.ones(4), "NaN"),
    (np.array([-4000.0, 4001.0, 4002.0]), np.ones(3), "non-positive"),
    (np.array([4000.0]), np.ones(1), "at least 2"),
    (np.ones((2, 5)) + np.arange(5.0), np.ones((3, 5)), "shape"),
])
def test_resample_rejects_bad_input(wave, flux, message):
    with pytest.raises(InvalidSpectrumError, match=message):
        pp.resample(wave, flux, None, GRID)


def test_resample_grid_by_keyword_and_required():
    wave = np.arange(4000.0, 4100.0)
    by_keyword = pp.resample(wave, np.ones(wave.size), grid=GRID)
    positional = pp.resample(wave, np.ones(wave.size), None, GRID)
    np.testing.assert_array_equal(by_keyword.flux, positional.flux)
    with pytest.raises(InvalidSpectrumError, match="LogLinearGrid"):
        pp.resample(wave, np.ones(wave.size))


def test_resample_rejects_mismatched_ivar_and_mask():
    wave = np.arange(4000.0, 4010.0)
    with pytest.raises(InvalidSpectrumError, match="ivar"):
        pp.resample(wave, np.ones(10), np.ones(9), GRID)
    with pytest.raises(InvalidSpectrumError, match="mask"):
        pp.resample(wave, np.ones(10), None, GRID, mask=np.zeros(11, bool))


# --- continuum normalisation ----------------------------------------------------------------


def _planck(lam: np.ndarray, temperature: float) -> np.ndarray:
    x = 1.4388e8 / (lam * temperature)
    return 1.0 / (lam**5 * np.expm1(x))


def _stellar_batch(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Continua x absorption lines + S/N 50 noise on GRID; returns flux, ivar, continuum pixels."""
    lam = GRID.wavelength
    continua = [_planck(lam, t) for t in (4000.0, 5500.0, 7000.0, 10000.0)]
    continua += [1.0 + 2.0 * (lam - 3700.0) / 3700.0, 3.0 - 2.0 * ((lam - 3700.0) / 3700.0) ** 2]
    continua = np.array([c / c.max() * 10.0 for c in continua])
    ratio = continua.max(axis=1) / continua.min(axis=1)
    assert ratio.max() > 2.5
    centres = rng.uniform(3720.0, 7380.0, 150)
    sigmas = rng.uniform(0.5, 1.5, 150)
    depths = rng.uniform(0.1, 0.6, 150)
    centres = np.concatenate([centres, BALMER])
    sigmas = np.concatenate([sigmas, [8.0] * 4])
    depths = np.concatenate([depths, [0.5] * 4])
    profile = np.prod(1.0 - depths[:, None] * _gauss(lam[None, :], centres[:, None], sigmas[:, None]), axis=0)
    far = (np.abs(lam[None, :] - centres[:, None]) > 5.0 * sigmas[:, None]).all(axis=0)
    clean = continua * profile
    sigma = continua / 50.0
    flux = clean + rng.standard_normal(clean.shape) * sigma
    return flux, 1.0 / sigma**2, far


def test_continuum_normalise_recovers_continuum():
    rng = np.random.default_rng(6)
    flux, ivar, far = _stellar_batch(rng)
    assert far.sum() > 500
    out = pp.continuum_normalise(flux, ivar, None, GRID.log_wavelength)
    assert out.flux.shape == flux.shape and out.continuum.dtype == np.float32
    assert not out.mask.any()
    for row in range(flux.shape[0]):
        assert np.median(out.flux[row, far]) == pytest.approx(1.0, abs=0.01)
        for part in np.array_split(np.flatnonzero(far), 4):  # each quarter of the range too
            assert np.median(out.flux[row, part]) == pytest.approx(1.0, abs=0.01)
    np.testing.assert_allclose(out.ivar, ivar * out.continuum.astype(np.float64) ** 2, rtol=1e-5)


def test_continuum_normalise_with_masked_gaps():
    rng = np.random.default_rng(7)
    flux, ivar, far = _stellar_batch(rng)
    lam = GRID.wavelength
    mask = np.zeros(flux.shape, bool)
    mask[:, (lam > 5000.0) & (lam < 5300.0)] = True
    mask[:, :100] = True
    mask[2, 1000:1200] = True
    flux[mask] = np.nan
    out = pp.continuum_normalise(flux, ivar, mask, GRID.log_wavelength)
    assert np.isfinite(out.flux).all() and np.isfinite(out.ivar).all()
    assert out.mask[mask].all() and (out.flux[mask] == 0).all() and (out.ivar[mask] == 0).all()
    for row in range(flux.shape[0]):
        keep = far & ~mask[row]
        assert np.median(out.flux[row, keep]) == pytest.approx(1.0, abs=0.01)


def test_continuum_normalise_one_spectrum_gives_1d_and_flat_noiseless_is_exact():
    flat = np.full(GRID.length, 4.0)
    out = pp.continuum_normalise(flat, None, None, GRID.log_wavelength)
    assert out.flux.shape == (GRID.length,)
    np.testing.assert_allclose(out.flux, 1.0, rtol=1e-5)
    np.testing.assert_allclose(out.continuum, 4.0, rtol=1e-5)
    assert not out.mask.any()


def test_continuum_normalise_masks_rows_without_data():
    flux = np.ones((2, GRID.length))
    flux[1] = np.nan
    out = pp.continuum_normalise(flux, None, None, GRID.log_wavelength)
    assert out.mask[1].all() and not out.mask[0].any()
    assert np.isfinite(out.flux).all()


# --- S/N and noise --------------------------------------------------------------------------


@pytest.mark.parametrize("snr", [10.0, 50.0, 200.0])
def test_estimate_snr_recovers_injected_snr(snr):
    rng = np.random.default_rng(8)
    level = np.array([10.0, 2.5, 400.0])
    sigma = level / snr
    flux = level[:, None] + rng.standard_normal((3, 3000)) * sigma[:, None]
    ivar = np.broadcast_to(1.0 / sigma[:, None] ** 2, flux.shape)
    np.testing.assert_allclose(pp.estimate_snr(flux), snr, rtol=0.1)
    np.testing.assert_allclose(pp.estimate_snr(flux, ivar, method="ivar"), snr, rtol=0.1)
    spoiled = flux.copy()
    mask = np.zeros(flux.shape, bool)
    spoiled[:, 100:400] = 0.0
    mask[:, 100:400] = True
    np.testing.assert_allclose(pp.estimate_snr(spoiled, mask=mask), snr, rtol=0.1)
    single = pp.estimate_snr(flux[0])
    assert isinstance(single, float) and single == pytest.approx(snr, rel=0.1)


def test_estimate_snr_errors():
    with pytest.raises(InvalidSpectrumError, match="ivar"):
        pp.estimate_snr(np.ones(100), method="ivar")
    with pytest.raises(InvalidSpectrumError, match="unknown"):
        pp.estimate_snr(np.ones(100), method="magic")


def test_add_noise_reaches_target_snr_and_is_deterministic():
    targets = np.array([5.0, 20.0, 50.0, 100.0])
    flux = np.full((4, 3000), 2.0)
    noisy, ivar = pp.add_noise(flux, None, targets, np.random.default_rng(9))
    empirical = noisy.mean(axis=1) / noisy.std(axis=1)
    np.testing.assert_allclose(empirical, targets, rtol=0.05)
    np.testing.assert_allclose(ivar, (targets[:, None] / 2.0) ** 2 * np.ones((1, 3000)), rtol=1e-6)
    again, ivar_again = pp.add_noise(flux, None, targets, np.random.default_rng(9))
    np.testing.assert_array_equal(noisy, again)
    np.testing.assert_array_equal(ivar, ivar_again)
    other, _ = pp.add_noise(flux, None, targets, np.random.default_rng(10))
    assert not np.array_equal(noisy, other)


def test_add_noise_tops_up_existing_noise():
    rng = np.random.default_rng(11)
    sigma_in = 0.01
    flux = 1.0 + rng.standard_normal((2, 4000)) * sigma_in
    ivar = np.full(flux.shape, 1.0 / sigma_in**2)
    noisy, out_ivar = pp.add_noise(flux, ivar, 20.0, rng)
    expected = 20.0**2 / np.median(flux, axis=1)[:, None] ** 2
    np.testing.assert_allclose(out_ivar, np.broadcast_to(expected, flux.shape), rtol=1e-5)
    np.testing.assert_allclose(noisy.mean(axis=1) / noisy.std(axis=1), 20.0, rtol=0.05)
    quieter, same_ivar = pp.add_noise(flux, ivar, 500.0, rng)  # already noisier than S/N 500
    np.testing.assert_allclose(quieter, flux, rtol=1e-6)
    np.testing.assert_allclose(same_ivar, ivar, rtol=1e-6)
    bad = np.zeros(flux.shape, bool)
    bad[:, :10] = True
    masked, masked_ivar = pp.add_noise(flux, ivar, 20.0, rng, mask=bad)
    assert (masked_ivar[bad] == 0).all() and np.array_equal(masked[bad], flux[bad].astype(np.float32))
    with pytest.raises(InvalidSpectrumError):
        pp.add_noise(flux, ivar, -1.0, rng)


# --- wavelength conversions -----------------------------------------------------------------


def test_air_vacuum_conversions():
    assert pp.air_to_vacuum(6562.80) == pytest.approx(6564.61, abs=0.01)
    assert pp.vacuum_to_air(6564.61) == pytest.approx(6562.80, abs=0.01)
    vac = np.linspace(3000.0, 10000.0, 5001)
    np.testing.assert_allclose(pp.air_to_vacuum(pp.vacuum_to_air(vac)), vac, rtol=0, atol=1e-4)
    uv = np.array([1200.0, 1999.0])
    np.testing.assert_array_equal(pp.air_to_vacuum(uv), uv)
    np.testing.assert_array_equal(pp.vacuum_to_air(uv), uv)


def test_to_rest_frame_z_and_rv_agree():
    wave = np.linspace(3800.0, 9000.0, 100)
    z = 0.0123
    rv = 299792.458 * ((1 + z) ** 2 - 1) / ((1 + z) ** 2 + 1)
    assert pp.redshift_from_rv(rv) == pytest.approx(z, rel=1e-10)
    np.testing.assert_allclose(pp.to_rest_frame(wave, rv=rv), pp.to_rest_frame(wave, z=z), rtol=1e-12)
    np.testing.assert_allclose(pp.to_rest_frame(wave, z=z), wave / (1 + z))
    zs = np.array([0.0, 0.1, 1.5])
    rest = pp.to_rest_frame(wave, z=zs)
    assert rest.shape == (3, 100)
    np.testing.assert_allclose(rest[2], wave / 2.5)
    rest2 = pp.to_rest_frame(np.stack([wave] * 3), z=zs)
    np.testing.assert_allclose(rest2, rest)
    with pytest.raises(InvalidSpectrumError):
        pp.to_rest_frame(wave, z=0.1, rv=100.0)
    with pytest.raises(InvalidSpectrumError):
        pp.to_rest_frame(wave)
    with pytest.raises(InvalidSpectrumError):
        pp.to_rest_frame(wave, z=-1.0)
    with pytest.raises(InvalidSpectrumError):
        pp.redshift_from_rv(3.0e5)


# --- broadening -----------------------------------------------------------------------------

FINE = pp.LogLinearGrid(start=math.log10(4950.0), step=2e-5, length=2000, resolution=1800.0)


@pytest.mark.parametrize("source", [{"source_resolution": 5000.0}, {"source_fwhm": 2.5}])
def test_broaden_to_grid_resolution(source):
    centre = 5200.3
    fwhm_source = source.get("source_fwhm", centre / source.get("source_resolution", 1.0))
    flux = 1.0 - 0.5 * _gauss(FINE.wavelength, centre, fwhm_source / pp.FWHM_PER_SIGMA)
    _, ew_in, rms_in = _line_moments(FINE, flux, centre, 15.0)
    assert rms_in * pp.FWHM_PER_SIGMA == pytest.approx(fwhm_source, rel=0.01)
    out = pp.broaden(flux, None, None, FINE, **source)
    _, ew_out, rms_out = _line_moments(FINE, out.flux, centre, 15.0)
    assert rms_out * pp.FWHM_PER_SIGMA == pytest.approx(centre / FINE.resolution, rel=0.05)
    assert ew_out == pytest.approx(ew_in, rel=0.01)
    assert not out.mask.any()


def test_broaden_leaves_data_alone_when_source_is_coarser():
    rng = np.random.default_rng(12)
    flux = rng.normal(1.0, 0.1, (3, FINE.length))
    ivar = rng.uniform(10.0, 20.0, flux.shape)
    out = pp.broaden(flux, ivar, None, FINE, source_resolution=1000.0)
    np.testing.assert_array_equal(out.flux, flux.astype(np.float32))
    np.testing.assert_allclose(out.ivar, ivar, rtol=1e-6)


def test_broaden_propagates_variance_and_keeps_bad_pixels_masked():
    rng = np.random.default_rng(13)
    flux = 1.0 + rng.standard_normal((800, FINE.length)) * 0.1
    ivar = np.full(flux.shape, 100.0)
    mask = np.zeros(flux.shape, bool)
    mask[:, 1000:1005] = True
    out = pp.broaden(flux, ivar, mask, FINE, source_resolution=5000.0)
    assert (out.mask == mask).all() and (out.flux[mask] == 0).all() and (out.ivar[mask] == 0).all()
    ratio = out.flux[:, :900].astype(np.float64).var(axis=0) * out.ivar[0, :900]
    assert ratio.mean() == pytest.approx(1.0, abs=0.03)
    assert out.ivar[0, 500] > 100.0 * 2  # smoothing averages noise down


def test_broaden_needs_exactly_one_source():
    flux = np.ones(FINE.length)
    with pytest.raises(InvalidSpectrumError, match="exactly one"):
        pp.broaden(flux, None, None, FINE)
    with pytest.raises(InvalidSpectrumError, match="exactly one"):
        pp.broaden(flux, None, None, FINE, source_fwhm=2.5, source_resolution=5000.0)
    with pytest.raises(InvalidSpectrumError, match="grid"):
        pp.broaden(flux[:-1], None, None, FINE, source_fwhm=2.5)


# --- the recipe -----------------------------------------------------------------------------


def test_preprocessing_dict_round_trip():
    recipe = pp.Preprocessing(GRID, normalise=False, knot_spacing=0.02, min_coverage=0.7)
    d = json.loads(json.dumps(recipe.to_dict()))
    assert pp.Preprocessing.from_dict(d) == recipe
    with pytest.raises(GridError):
        pp.Preprocessing.from_dict({**d, "colour": "blue"})
    with pytest.raises(GridError):
        pp.Preprocessing.from_dict({**d, "grid": {**d["grid"], "step": -1.0}})
    with pytest.raises(GridError):
        pp.Preprocessing(GRID, min_coverage=0.0)


@pytest.mark.parametrize("normalise", [True, False])
def test_preprocessing_apply_equals_steps_by_hand(normalise):
    rng = np.random.default_rng(14)
    obs = np.arange(3800.0, 9000.0, 1.2)
    z = np.array([0.0, 0.05, 0.2, 0.01])
    lam = obs / 1.05
    flux = np.tile((1.0 + 0.3 * np.sin(obs / 300.0)) * (1.0 - 0.4 * _gauss(lam, 5000.0, 3.0)), (4, 1))
    flux += rng.normal(0.0, 0.01, flux.shape)
    ivar = np.full(flux.shape, 1e4)
    mask = np.zeros(flux.shape, bool)
    mask[1, 2000:2100] = True
    recipe = pp.Preprocessing(GRID, normalise=normalise)
    out = recipe.apply(obs, flux, ivar, mask, z=z, source_fwhm=2.5)
    rest = pp.to_rest_frame(obs, z=z)
    res = pp.resample(rest, flux, ivar, GRID, mask=mask)
    res = pp.broaden(res.flux, res.ivar, res.mask, GRID, source_fwhm=2.5 / (1.0 + z))
    if normalise:
        expected = pp.continuum_normalise(res.flux, res.ivar, res.mask, GRID.log_wavelength)
        np.testing.assert_array_equal(out.continuum, expected.continuum)
    else:
        expected = res
        np.testing.assert_array_equal(out.continuum, np.ones_like(res.flux))
    np.testing.assert_array_equal(out.flux, expected.flux)
    np.testing.assert_array_equal(out.ivar, expected.ivar)
    np.testing.assert_array_equal(out.mask, expected.mask)
    assert out.flux.shape == (4, GRID.length) and out.flux.dtype == np.float32


def test_preprocessing_apply_single_spectrum_with_rv():
    obs = np.arange(3800.0, 9000.0, 1.2)
    flux = np.ones(obs.size)
    out = pp.Preprocessing(GRID).apply(obs, flux, rv=300.0, source_resolution=3000.0)
    assert out.flux.shape == (GRID.length,)
    np.testing.assert_allclose(out.flux[~out.mask], 1.0, rtol=1e-5)


def test_detector_gaps_stay_masked_and_the_rest_is_untouched():
    """Native pixels with gaps (The Payne's 7,214 APOGEE pixels): the pixels beside a gap must
    not be stretched over it; pixels on the grid away from the gaps come through unchanged."""
    grid = pp.LogLinearGrid(start=4.180932, step=6e-6, length=2000, resolution=22500.0)
    keep = np.ones(grid.length, bool)
    keep[500:800] = False  # a 300-pixel detector gap
    keep[1500:1503] = False  # three dropped pixels: too narrow to be a gap
    wave = grid.wavelength[keep]
    flux = 1.0 + 0.1 * np.sin(np.arange(wave.size) / 7.0)
    out = pp.resample(wave, flux, np.full(wave.size, 100.0), grid)
    assert out.mask[500:800].all()
    assert not out.mask[:500].any() and not out.mask[800:].any()
    np.testing.assert_allclose(out.flux[keep][:495], flux[:495], rtol=1e-5)
    batch = pp.resample(np.stack([wave, wave * (1 + 1e-7)]), np.stack([flux, flux]), None, grid)
    assert batch.mask[:, 500:800].all() and not batch.mask[:, 810:].any()


def test_resample_in_the_rest_frame_of_each_row_keeps_a_shared_wavelength():
    """``z`` per row on a shared wavelength gives what resampling the rest-frame wavelengths
    gives, without building them; one redshift for all rows too; a wrong count is named."""
    grid = pp.LogLinearGrid.from_range(4000.0, 6000.0, 1e-4, 2000.0)
    rng = np.random.default_rng(3)
    wave = np.linspace(3900.0, 6300.0, 2500)
    wave = np.concatenate([wave[:1000], wave[1100:]])  # a detector gap
    flux = (1.0 + 0.2 * rng.standard_normal((6, wave.size))).astype(np.float32)
    ivar = rng.uniform(1.0, 4.0, (6, wave.size)).astype(np.float32)
    z = np.array([0.0, 1e-4, -3e-4, 0.01, 0.02, -0.02])
    shifted = pp.resample(wave, flux, ivar, grid, z=z)
    direct = pp.resample(wave[None, :] / (1.0 + z[:, None]), flux, ivar, grid)
    np.testing.assert_allclose(shifted.flux, direct.flux, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(shifted.ivar, direct.ivar, rtol=1e-4)
    assert np.array_equal(shifted.mask, direct.mask) and shifted.mask.any(axis=1).all()
    one = pp.resample(wave, flux, ivar, grid, z=0.01)
    np.testing.assert_allclose(one.flux, pp.resample(wave / 1.01, flux, ivar, grid).flux, rtol=1e-5, atol=1e-6)
    with pytest.raises(InvalidSpectrumError, match="3 redshifts for 6 spectra"):
        pp.resample(wave, flux, ivar, grid, z=z[:3])
