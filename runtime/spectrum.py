"""The in-memory spectrum: arrays on the spectrum's own wavelengths plus what is known of it.

A :class:`Spectrum` holds one spectrum of ``n`` pixels:

- ``wavelength`` (n,) float64, vacuum Angstrom, strictly increasing;
- ``flux`` (n,) float32, in the file's units (finite everywhere: unusable pixels hold 0);
- ``ivar`` (n,) float32, inverse variance of ``flux``; 0 marks an unusable pixel;
- ``mask`` (n,) bool, True where the pixel is unusable (its ``ivar`` is then 0 too).

Readers build spectra with :meth:`Spectrum.build`, which enforces these invariants.

A :class:`SpectrumInput` is one raw spectrum as a client (or a benchmark set) hands it to the
pipeline: its own wavelengths, flux, optional ivar and mask, redshift and source resolution.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from specserve.runtime.errors import InvalidSpectrumError


@dataclass(frozen=True)
class SpectrumMeta:
    """What is known about a spectrum besides its arrays.

    ``survey_class``/``survey_subclass`` are the source pipeline's classification (e.g. LAMOST
    ``STAR``/``F9``, SDSS ``STAR``/``M1``), not specserve's. ``extra`` carries format-specific
    values (LAMOST obsid, S/N, redshift, catalogue parameters...), JSON-friendly scalars only.
    """

    object_id: str
    source_format: str
    file: str = ""
    ra: float | None = None
    dec: float | None = None
    survey_class: str | None = None
    survey_subclass: str | None = None
    resolution: float | None = None
    fwhm: float | None = None
    ivar_estimated: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Spectrum:
    """One spectrum on its own wavelengths; see the module docstring for the invariants."""

    wavelength: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray
    mask: np.ndarray
    meta: SpectrumMeta

    @property
    def n_pixels(self) -> int:
        return int(self.wavelength.size)

    @property
    def n_good(self) -> int:
        return int(np.count_nonzero(~self.mask))

    @property
    def wavelength_range(self) -> tuple[float, float]:
        return float(self.wavelength[0]), float(self.wavelength[-1])

    @classmethod
    def build(
        cls,
        wavelength: np.ndarray,
        flux: np.ndarray,
        meta: SpectrumMeta,
        ivar: np.ndarray | None = None,
        mask: np.ndarray | None = None,
    ) -> "Spectrum":
        """Validate and normalise arrays into a :class:`Spectrum`.

        Pixels with non-finite flux, non-finite or non-positive ``ivar`` or a True ``mask`` become
        unusable (flux 0, ivar 0, mask True). Raises :class:`InvalidSpectrumError` when shapes
        disagree, wavelengths are not finite and strictly increasing, or no pixel is usable.
        """
        wave = np.asarray(wavelength, dtype=np.float64)
        flux = np.asarray(flux, dtype=np.float64)
        if wave.ndim != 1 or flux.ndim != 1:
            raise InvalidSpectrumError(
                f"wavelength and flux must be 1-D, got shapes {wave.shape} and {flux.shape}"
            )
        if wave.size != flux.size:
            raise InvalidSpectrumError(
                f"wavelength has {wave.size} pixels but flux has {flux.size}"
            )
        if wave.size < 2:
            raise InvalidSpectrumError(f"a spectrum needs at least 2 pixels, got {wave.size}")
        if not np.all(np.isfinite(wave)):
            raise InvalidSpectrumError("wavelength contains NaN or infinite values")
        if not np.all(np.diff(wave) > 0):
            raise InvalidSpectrumError("wavelength is not strictly increasing")
        bad = ~np.isfinite(flux)
        if ivar is None:
            ivar_arr = np.ones_like(flux)
        else:
            ivar_arr = np.asarray(ivar, dtype=np.float64)
            if ivar_arr.shape != flux.shape:
                raise InvalidSpectrumError(
                    f"ivar has shape {ivar_arr.shape} but flux has {flux.shape}"
                )
            bad |= ~np.isfinite(ivar_arr) | (ivar_arr <= 0)
        if mask is not None:
            mask_arr = np.asarray(mask)
            if mask_arr.shape != flux.shape:
                raise InvalidSpectrumError(
                    f"mask has shape {mask_arr.shape} but flux has {flux.shape}"
                )
            bad |= mask_arr.astype(bool)
        if bad.all():
            raise InvalidSpectrumError("no usable pixel (flux all NaN, ivar all 0 or all masked)")
        flux = np.where(bad, 0.0, flux).astype(np.float32)
        ivar_out = np.where(bad, 0.0, ivar_arr).astype(np.float32)
        return cls(wave, flux, ivar_out, bad, meta)


@dataclass(frozen=True)
class SpectrumInput:
    """One raw spectrum on its own wavelengths (vacuum Angstrom): flux, optional inverse variance
    and mask (True = unusable), optional redshift, the instrument's resolution where known (a
    constant FWHM in observed-frame Angstrom, or a resolving power R), free-form metadata.

    This is what the serving pipeline receives from a client and what every benchmark set is
    built from, so both go through the same steps (:mod:`specserve.runtime.pipeline`)."""

    id: str
    wavelength: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray | None = None
    mask: np.ndarray | None = None
    redshift: float | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    source_fwhm: float | None = None
    source_resolution: float | None = None

    @classmethod
    def from_spectrum(cls, spectrum: Spectrum, id: str | None = None) -> "SpectrumInput":
        """A read spectrum as a request: the survey pipeline's redshift (LAMOST, SDSS) and the
        resolution the reader knows are passed on."""
        z = spectrum.meta.extra.get("z")
        return cls(id or spectrum.meta.object_id, spectrum.wavelength, spectrum.flux, spectrum.ivar,
                   spectrum.mask, float(z) if z is not None else None,
                   source_fwhm=spectrum.meta.fwhm, source_resolution=spectrum.meta.resolution)

    def with_arrays(self, **changes: Any) -> "SpectrumInput":
        """A copy with some fields replaced (e.g. noisier flux and its ivar)."""
        return replace(self, **changes)
