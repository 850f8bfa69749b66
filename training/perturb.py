"""What nature and instruments do to a raw spectrum, applied where it happens: to the raw flux on
the spectrum's own wavelengths, before the runtime's preprocessing.

Every function takes a :class:`~specserve.runtime.spectrum.SpectrumInput` and returns a new one;
nothing here sees a normalised spectrum. Used by the benchmark-set builders (noise at the survey's
S/N), by training (augmentation over the S/N range a model claims) and by every evaluation (S/N
curves and the perturbation table).

- :func:`degrade`: Gaussian noise so the spectrum reaches S/N ``snr`` at its median flux, with a
  ``constant`` sigma (read-noise or sky-dominated) or a ``photon`` sigma proportional to
  sqrt(flux) (source-dominated). Noise already there (ivar > 0) is kept and only the missing
  variance is added, so a spectrum noisier than the target keeps its own noise. The returned ivar
  is the total.
- :func:`shift`: a radial-velocity residual (km/s): wavelengths times (1 + v/c), flux unchanged.
- :func:`tilt`: a flux-calibration error, a smooth factor exp(a x + b x^2) in log wavelength.
- :func:`mask_runs`: bad-pixel patterns: runs of pixels flagged unusable (cosmic rays, bad
  columns, sky-line residues).
- :func:`resample_native`: the same spectrum on another instrument's sampling (log-linear with a
  coarser or finer step, or linear in wavelength), by the runtime's flux-conserving resampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from specserve.runtime.preprocess import C_KMS, LogLinearGrid, add_noise, resample
from specserve.runtime.spectrum import SpectrumInput

NOISE_MODELS = ("constant", "photon")


def _good(spectrum: SpectrumInput) -> np.ndarray:
    flux = np.asarray(spectrum.flux)
    good = np.isfinite(flux)
    if spectrum.mask is not None:
        good &= ~np.asarray(spectrum.mask, dtype=bool)
    if spectrum.ivar is not None:
        good &= np.asarray(spectrum.ivar) > 0
    return good


def degrade(spectrum: SpectrumInput, snr: float, rng: np.random.Generator,
            model: str = "constant") -> SpectrumInput:
    """The spectrum observed at S/N ``snr`` (per native pixel, at the median good flux)."""
    if model not in NOISE_MODELS:
        raise ValueError(f"unknown noise model {model!r}; use one of {', '.join(NOISE_MODELS)}")
    if model == "constant":
        flux, ivar = add_noise(spectrum.flux, spectrum.ivar, snr, rng, mask=spectrum.mask)
        return spectrum.with_arrays(flux=flux, ivar=ivar)
    f = np.asarray(spectrum.flux, dtype=np.float64)
    good = _good(spectrum)
    median = float(np.median(np.abs(f[good]))) if good.any() else 0.0
    sigma2 = np.maximum(f, 0.0) * median / snr**2  # S/N = snr at the median flux, sqrt(f) elsewhere
    var_in = np.zeros_like(f) if spectrum.ivar is None else np.divide(
        1.0, spectrum.ivar, out=np.zeros_like(f), where=good)
    var_add = np.where(good, np.maximum(sigma2 - var_in, 0.0), 0.0)
    noisy = np.where(good, f + rng.standard_normal(f.shape) * np.sqrt(var_add), f)
    total = var_in + var_add
    ivar = np.divide(1.0, total, out=np.zeros_like(f), where=good & (total > 0))
    return spectrum.with_arrays(flux=noisy.astype(np.float32), ivar=ivar.astype(np.float32))


def shift(spectrum: SpectrumInput, velocity: float) -> SpectrumInput:
    """Wavelengths moved by a radial velocity ``velocity`` km/s (positive: redder)."""
    return spectrum.with_arrays(wavelength=np.asarray(spectrum.wavelength) * (1.0 + velocity / C_KMS))


def tilt(spectrum: SpectrumInput, a: float, b: float = 0.0, pivot: float = 5500.0,
         scale: float = 0.15) -> SpectrumInput:
    """Flux (and its sigma) times exp(a x + b x^2), x = log10(lambda / pivot) / scale."""
    x = np.log10(np.asarray(spectrum.wavelength) / pivot) / scale
    factor = np.exp(a * x + b * x * x)
    ivar = None if spectrum.ivar is None else (np.asarray(spectrum.ivar) / factor**2).astype(np.float32)
    return spectrum.with_arrays(flux=(np.asarray(spectrum.flux) * factor).astype(np.float32), ivar=ivar)


def mask_runs(spectrum: SpectrumInput, fraction: float, rng: np.random.Generator,
              mean_run: int = 8) -> SpectrumInput:
    """About ``fraction`` of the pixels flagged unusable, in runs of mean length ``mean_run``."""
    n = np.size(spectrum.flux)
    mask = np.zeros(n, bool) if spectrum.mask is None else np.asarray(spectrum.mask, dtype=bool).copy()
    n_runs = rng.poisson(fraction * n / mean_run)
    starts = rng.integers(0, n, size=n_runs)
    lengths = 1 + rng.geometric(1.0 / mean_run, size=n_runs)
    for s, length in zip(starts, lengths):
        mask[s:s + length] = True
    return spectrum.with_arrays(mask=mask)


def resample_native(spectrum: SpectrumInput, factor: float, linear: bool = False) -> SpectrumInput:
    """The spectrum on another sampling over the same range: ``factor`` times its own mean pixel
    size, log-linear (``linear=False``) or uniform in wavelength."""
    wave = np.asarray(spectrum.wavelength, dtype=np.float64)
    lo, hi = math.log10(wave[0]), math.log10(wave[-1])
    step = factor * (hi - lo) / (wave.size - 1)
    grid = LogLinearGrid(start=lo + step, step=step, length=int((hi - lo) / step) - 1, resolution=1.0)
    target = grid.wavelength
    if linear:
        target = np.linspace(target[0], target[-1], target.size)
        # flux-conserving onto a linear sampling: resample on a fine log grid, then average blocks
        fine = LogLinearGrid(start=lo, step=step / 8, length=int((hi - lo) / (step / 8)), resolution=1.0)
        out = resample(wave, spectrum.flux, spectrum.ivar, fine, mask=spectrum.mask)
        centre = np.interp(target, fine.wavelength, np.arange(fine.length))
        idx = np.clip(np.rint(centre).astype(int), 0, fine.length - 1)
        good = ~out.mask[idx]
        return spectrum.with_arrays(
            wavelength=target, flux=np.where(good, out.flux[idx], 0.0).astype(np.float32),
            ivar=None if spectrum.ivar is None else np.where(good, out.ivar[idx] / 8.0, 0.0).astype(np.float32),
            mask=~good)
    out = resample(wave, spectrum.flux, spectrum.ivar, grid, mask=spectrum.mask)
    return spectrum.with_arrays(wavelength=target, flux=out.flux,
                                ivar=None if spectrum.ivar is None else out.ivar, mask=out.mask)


@dataclass(frozen=True)
class Augmentation:
    """Random raw-level perturbations for training: each spectrum drawn for augmentation gets
    noise at an S/N log-uniform in [snr_min, snr_max] (constant or photon noise, half each), and
    with the given probabilities a radial-velocity residual N(0, rv_sigma) km/s, a calibration
    tilt (a ~ U(-tilt, tilt)), masked runs over up to ``mask_fraction`` of the pixels, and a
    different native sampling (log-linear, 1-1.5 times coarser: another instrument's pixels,
    resampled by the runtime). ``snr_max = 0`` turns the noise off."""

    snr_min: float = 10.0
    snr_max: float = 200.0
    rv_sigma: float = 3.0
    p_shift: float = 0.5
    tilt: float = 0.1
    p_tilt: float = 0.5
    mask_fraction: float = 0.03
    p_mask: float = 0.3
    p_resample: float = 0.2

    def __call__(self, spectrum: SpectrumInput, rng: np.random.Generator) -> SpectrumInput:
        out = spectrum
        if self.p_shift and rng.uniform() < self.p_shift:
            out = shift(out, rng.normal(0.0, self.rv_sigma))
        if self.p_tilt and rng.uniform() < self.p_tilt:
            out = tilt(out, rng.uniform(-self.tilt, self.tilt))
        if self.p_mask and rng.uniform() < self.p_mask:
            out = mask_runs(out, rng.uniform(0.0, self.mask_fraction), rng)
        if self.p_resample and rng.uniform() < self.p_resample:
            out = resample_native(out, rng.uniform(1.0, 1.5))
        if self.snr_max:
            snr = math.exp(rng.uniform(math.log(self.snr_min), math.log(self.snr_max)))
            out = degrade(out, snr, rng, NOISE_MODELS[int(rng.integers(2))])
        return out
