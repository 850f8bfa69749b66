"""specserve.v1 messages to the data plane's types, on the server's side of the wire.

:func:`spectrum_from_proto` is how the server reads a client's ``Spectrum`` message: wavelengths
(explicit, or a log-linear grid), flux, optional ivar and mask, redshift and source resolution
into a :class:`~specserve.runtime.spectrum.SpectrumInput`, which then goes through
:mod:`specserve.runtime.pipeline`. Kept apart from the servicer so that tests and tools can decode
exactly as the server does without importing the KServe protos.
"""

from __future__ import annotations

import numpy as np

from specserve.protos import specserve_pb2 as pb

from .errors import InvalidSpectrumError
from .spectrum import SpectrumInput


def _as_array(values, name: str, n: int | None, dtype=np.float64) -> np.ndarray | None:
    if len(values) == 0:
        return None
    array = np.fromiter(values, dtype, len(values))
    if n is not None and array.size != n:
        raise InvalidSpectrumError(f"{name} has {array.size} values but flux has {n}")
    return array


def spectrum_from_proto(message: pb.Spectrum) -> SpectrumInput:
    flux = np.fromiter(message.flux, np.float64, len(message.flux))
    if flux.size == 0:
        raise InvalidSpectrumError(f"spectrum {message.id!r}: empty flux")
    which = message.WhichOneof("wavelengths")
    if which == "wavelength":
        wave = np.fromiter(message.wavelength.values, np.float64, len(message.wavelength.values))
    elif which == "grid":
        grid = message.grid
        if grid.length != flux.size:
            raise InvalidSpectrumError(f"spectrum {message.id!r}: grid length {grid.length} but flux has {flux.size} values")
        if not (np.isfinite(grid.start) and np.isfinite(grid.step) and grid.step > 0):
            raise InvalidSpectrumError(f"spectrum {message.id!r}: log-linear grid needs finite start and step > 0")
        wave = 10.0 ** (grid.start + grid.step * np.arange(grid.length))
    else:
        raise InvalidSpectrumError(f"spectrum {message.id!r}: no wavelengths (set wavelength or grid)")
    if wave.size != flux.size:
        raise InvalidSpectrumError(f"spectrum {message.id!r}: {wave.size} wavelengths but {flux.size} flux values")
    return SpectrumInput(
        id=message.id,
        wavelength=wave,
        flux=flux,
        ivar=_as_array(message.ivar, "ivar", flux.size),
        mask=_as_array(message.mask, "mask", flux.size, bool),
        redshift=message.redshift if message.HasField("redshift") else None,
        metadata=dict(message.metadata),
        source_fwhm=message.source_fwhm if message.HasField("source_fwhm") else None,
        source_resolution=message.source_resolution if message.HasField("source_resolution") else None,
    )
