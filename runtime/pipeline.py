"""The one data path from a raw spectrum to a model's input, shared by serving and training.

The server, the in-process :class:`~specserve.runtime.embedded.analysis.Analyzer`, every benchmark set
builder and every evaluation call these two functions, so a spectrum sent to the server is
treated exactly as the training and test spectra were (train as you serve):

1. :func:`checked`: a client's :class:`SpectrumInput` validated and normalised into the
   invariants of :class:`~specserve.runtime.spectrum.Spectrum` (float64 wavelengths, float32
   flux and ivar, unusable pixels flux 0 / ivar 0 / masked). Raises ``InvalidSpectrumError``
   naming the problem.
2. :func:`prepare`: a batch of checked spectra through a model card's
   :class:`~specserve.runtime.preprocess.Preprocessing` recipe (rest frame from the redshift ->
   flux-conserving resampling -> broadening from the source resolution where it is known and
   sharper than the grid -> continuum normalisation). Spectra with the same number of pixels and
   the same kind of resolution go through the recipe together as one 2-D batch.

:class:`Prepared` holds the batch on the model grid, (N, P) arrays, and gives the model inputs:
``flux`` with unusable pixels at ``MASKED_PIXEL_FILL`` and ``ivar`` with unusable pixels (and
every pixel of a spectrum sent without ivar) at 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from specserve.runtime.contract import fill_masked
from specserve.runtime.errors import InvalidSpectrumError
from specserve.runtime.preprocess import Preprocessing, estimated_ivar
from specserve.runtime.spectrum import Spectrum, SpectrumInput, SpectrumMeta

MIN_COVERAGE = 0.75
"""Fraction of a model's grid that a spectrum must cover (usable pixels) for the model to apply."""


def checked(spectrum: SpectrumInput) -> SpectrumInput:
    """Validate a raw spectrum (raises InvalidSpectrumError naming the problem); the returned copy
    obeys the Spectrum invariants and keeps ``ivar`` None when none was given."""
    flux = np.asarray(spectrum.flux)
    if flux.size == 0:
        raise InvalidSpectrumError("empty flux")
    mask = spectrum.mask
    usable = flux[~np.asarray(mask, dtype=bool)] if mask is not None and np.shape(mask) == flux.shape else flux
    if not np.all(np.isfinite(usable)):
        raise InvalidSpectrumError("flux contains NaN or infinite values at unmasked pixels")
    if spectrum.redshift is not None and not (np.isfinite(spectrum.redshift) and spectrum.redshift > -1):
        raise InvalidSpectrumError(f"redshift must be finite and > -1, got {spectrum.redshift}")
    for name in ("source_fwhm", "source_resolution"):
        value = getattr(spectrum, name)
        if value is not None and not (np.isfinite(value) and value > 0):
            raise InvalidSpectrumError(f"{name} must be finite and > 0, got {value}")
    meta = SpectrumMeta(object_id=spectrum.id, source_format="request")
    s = Spectrum.build(spectrum.wavelength, flux, meta, ivar=spectrum.ivar, mask=mask)
    return spectrum.with_arrays(wavelength=s.wavelength, flux=s.flux,
                                ivar=None if spectrum.ivar is None else s.ivar, mask=s.mask)


@dataclass(frozen=True)
class Prepared:
    """A batch on a model grid: normalised ``flux``, ``ivar`` and ``mask`` (N, P); ``has_ivar``
    (N,) says which spectra came with their own inverse variance."""

    flux: np.ndarray
    ivar: np.ndarray
    mask: np.ndarray
    has_ivar: np.ndarray

    def __len__(self) -> int:
        return int(self.flux.shape[0])

    @property
    def coverage(self) -> np.ndarray:
        """(N,) fraction of the grid each spectrum covers with usable pixels."""
        return 1.0 - self.mask.mean(axis=1)

    def model_flux(self) -> np.ndarray:
        """(N, P) float32: the ``flux`` input of a model, unusable pixels filled."""
        return fill_masked(self.flux, self.mask)

    def model_ivar(self) -> np.ndarray:
        """(N, P) float32: the ``ivar`` input, 0 at unusable pixels. A spectrum sent without ivar
        gets a constant one estimated from its normalised flux (DER_SNR,
        :func:`~specserve.runtime.preprocess.estimated_ivar`), as the readers do for files without
        errors: a noise-aware model needs a noise level, and the ivar of 1 in the client's flux
        units is none. :attr:`has_ivar` still says which spectra brought their own (a reduced
        chi-square is reported only for those)."""
        ivar = np.where(self.mask, 0.0, self.ivar)
        unknown = np.flatnonzero(~self.has_ivar)
        if unknown.size:
            ivar[unknown] = estimated_ivar(self.flux[unknown], self.mask[unknown])
        return ivar.astype(np.float32)

    def rows(self, index: np.ndarray | Sequence[int]) -> "Prepared":
        idx = np.asarray(index, dtype=np.intp)
        return Prepared(self.flux[idx], self.ivar[idx], self.mask[idx], self.has_ivar[idx])


def _broadening(recipe: Preprocessing, spectrum: SpectrumInput) -> tuple[str, float] | None:
    """How a spectrum is broadened to the grid's resolution: by its FWHM (Angstrom) where known,
    else by its resolving power where that is sharper than the grid's; None leaves it as it is."""
    if spectrum.source_fwhm is not None:
        return "source_fwhm", float(spectrum.source_fwhm)
    if spectrum.source_resolution is not None and spectrum.source_resolution > recipe.grid.resolution:
        return "source_resolution", float(spectrum.source_resolution)
    return None


def prepare(recipe: Preprocessing, spectra: Sequence[SpectrumInput]) -> Prepared:
    """Checked spectra through ``recipe``, in order: (N, P) arrays on the recipe's grid."""
    n, p = len(spectra), recipe.grid.length
    flux, ivar = np.zeros((n, p), np.float32), np.zeros((n, p), np.float32)
    mask = np.ones((n, p), bool)
    has_ivar = np.array([s.ivar is not None for s in spectra], dtype=bool)
    groups: dict[tuple[int, str | None], list[int]] = {}
    for i, s in enumerate(spectra):
        how = _broadening(recipe, s)
        groups.setdefault((np.size(s.wavelength), how and how[0]), []).append(i)
    for (_, how), members in groups.items():
        batch = [spectra[i] for i in members]
        first = batch[0].wavelength
        same = all(s.wavelength is first or np.array_equal(s.wavelength, first) for s in batch)
        wave = np.asarray(first) if same else np.stack([s.wavelength for s in batch])
        z = np.array([s.redshift or 0.0 for s in batch])
        kwargs = {}
        if how is not None:
            kwargs[how] = np.array([_broadening(recipe, s)[1] for s in batch])
        out = recipe.apply(
            wave, np.stack([s.flux for s in batch]),
            np.stack([np.ones(s.flux.shape, np.float32) if s.ivar is None else s.ivar for s in batch]),
            np.stack([np.zeros(s.flux.shape, bool) if s.mask is None else s.mask for s in batch]),
            z=z if z.any() else None, **kwargs)
        flux[members], ivar[members], mask[members] = out.flux, out.ivar, out.mask
    return Prepared(flux, ivar, mask, has_ivar)


def span_coverage(recipe: Preprocessing, spectrum: SpectrumInput) -> float:
    """The fraction of the recipe's grid inside the spectrum's rest-frame wavelength span, with one
    input pixel of slack at each end: an upper bound of :attr:`Prepared.coverage`, known without
    preprocessing (a spectrum below the threshold on this count is below it after preprocessing)."""
    wave = np.asarray(spectrum.wavelength, dtype=np.float64)
    if wave.size < 2:
        return 1.0  # nothing to bound: the full check decides
    lo, hi = 2 * wave[0] - wave[1], 2 * wave[-1] - wave[-2]
    if spectrum.redshift:
        lo, hi = lo / (1.0 + spectrum.redshift), hi / (1.0 + spectrum.redshift)
    return recipe.grid.count_between(float(lo), float(hi)) / recipe.grid.length


def prepare_raw(recipe: Preprocessing, spectra: Sequence[SpectrumInput]) -> Prepared:
    """:func:`checked` then :func:`prepare`: raw spectra that must all be valid (the set builders
    and evaluations, whose spectra are known good; an invalid one raises)."""
    return prepare(recipe, [checked(s) for s in spectra])
