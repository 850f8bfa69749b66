"""The ``specserve.v1`` ``Spectrum`` message in both directions: one module for the wire.

:func:`to_proto` is how a client sends a spectrum (log-linear wavelengths as a grid, masked pixels
as ivar 0); what is not a SpectrumInput goes through :func:`specserve.runtime.astro.as_input`
first (specutils spectra, astropy Quantities and Tables in any wavelength unit).
:func:`spectrum_from_proto` is how the server reads it back: wavelengths (explicit or a grid),
flux, optional ivar and mask, redshift and source resolution into a
:class:`~specserve.runtime.spectrum.SpectrumInput`, which then goes through
:mod:`specserve.runtime.pipeline`. Both sides import only the core and the domain proto, so the
client never loads the engine and tests can round-trip exactly as client and server do.
"""

from __future__ import annotations

import functools

import numpy as np

from specserve.protos import specserve_pb2 as pb
from specserve.runtime.astro import as_input
from specserve.runtime.errors import InvalidSpectrumError
from specserve.runtime.spectrum import SpectrumInput


def _checked_size(array: np.ndarray | None, name: str, n: int) -> np.ndarray | None:
    if array is None or array.size == 0:
        return None
    if array.size != n:
        raise InvalidSpectrumError(f"{name} has {array.size} values but flux has {n}")
    return array


# Repeated numbers cross the wire packed: one length-delimited field of little-endian values
# (protobuf's encoding of a proto3 repeated scalar). Reading them through the protobuf container
# converts every value to a Python float (about 120 us for 4,000 pixels); the packed bytes of the
# serialised message are the array itself. Both directions use them, and fall back to the
# container when a sender wrote a field unpacked.
_FLUX, _IVAR, _MASK = 4, 5, 6
_PACKED = {_FLUX: "<f4", _IVAR: "<f4", _MASK: "u1"}


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _packed_arrays(message: pb.Spectrum) -> dict[int, np.ndarray] | None:
    """flux, ivar and mask (field number -> array, absent fields left out) read straight from
    the message's serialised bytes; None when one of them was sent unpacked or more than once."""
    data = message.SerializeToString()
    found: dict[int, np.ndarray] = {}
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        number, kind = key >> 3, key & 7
        if kind == 2:
            length, pos = _varint(data, pos)
            if number in _PACKED:
                if number in found:
                    return None
                dtype = np.dtype(_PACKED[number])
                found[number] = np.frombuffer(data, dtype, length // dtype.itemsize, pos)
            pos += length
        elif number in _PACKED:
            return None  # an unpacked repeated field
        elif kind == 0:
            pos = _varint(data, pos)[1]
        elif kind == 1:
            pos += 8
        elif kind == 5:
            pos += 4
        else:
            return None
    return found


def _packed_field(number: int, payload: bytes) -> bytes:
    """One packed repeated field, serialised (tag, length, the values' bytes)."""
    out = bytearray()
    for value in ((number << 3) | 2, len(payload)):
        while value >= 0x80:
            out.append((value & 0x7F) | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out) + payload


@functools.lru_cache(maxsize=256)
def _grid_wavelength(start: float, step: float, length: int) -> np.ndarray:
    """``10 ** (start + step * i)``, one read-only array per grid (a survey sends a few grids,
    and spectra that share one share the array, which the preprocessing batches at once)."""
    wave = 10.0 ** (start + step * np.arange(length))
    wave.setflags(write=False)
    return wave


def spectrum_from_proto(message: pb.Spectrum) -> SpectrumInput:
    packed = _packed_arrays(message)
    if packed is None:
        packed = {number: np.fromiter(field, np.dtype(_PACKED[number]), len(field))
                  for number, field in ((_FLUX, message.flux), (_IVAR, message.ivar), (_MASK, message.mask))
                  if len(field)}
    flux = packed.get(_FLUX, np.zeros(0, np.float32))
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
        wave = _grid_wavelength(grid.start, grid.step, grid.length)
    else:
        raise InvalidSpectrumError(f"spectrum {message.id!r}: no wavelengths (set wavelength or grid)")
    if wave.size != flux.size:
        raise InvalidSpectrumError(f"spectrum {message.id!r}: {wave.size} wavelengths but {flux.size} flux values")
    return SpectrumInput(
        id=message.id,
        wavelength=wave,
        flux=flux,
        ivar=_checked_size(packed.get(_IVAR), "ivar", flux.size),
        mask=None if _MASK not in packed else _checked_size(packed[_MASK] != 0, "mask", flux.size),
        redshift=message.redshift if message.HasField("redshift") else None,
        metadata=dict(message.metadata),
        source_fwhm=message.source_fwhm if message.HasField("source_fwhm") else None,
        source_resolution=message.source_resolution if message.HasField("source_resolution") else None,
    )


LOG_LINEAR_RTOL = 1e-10
"""Wavelengths that 10 ** (start + step * i) reproduces this closely are sent as a grid."""


def log_linear(wave: np.ndarray) -> tuple[float, float] | None:
    """(start, step) in log10 Angstrom when ``wave`` is a log-linear grid (to LOG_LINEAR_RTOL),
    else None."""
    if wave.ndim != 1 or wave.size < 3 or not np.all(wave > 0) or not np.all(np.isfinite(wave)):
        return None
    log_wave = np.log10(wave)
    start, step = float(log_wave[0]), float((log_wave[-1] - log_wave[0]) / (wave.size - 1))
    if not step > 0:
        return None
    rebuilt = 10.0 ** (start + step * np.arange(wave.size))
    return (start, step) if np.max(np.abs(rebuilt - wave) / wave) <= LOG_LINEAR_RTOL else None


def to_proto(item) -> pb.Spectrum:
    """One spectrum as a proto message (a message already built is passed through): a
    SpectrumInput, a read Spectrum, an ``(id, wavelength, flux[, ivar])`` tuple of arrays, or what
    :func:`specserve.runtime.astro.as_input` converts (specutils spectra, astropy Quantities and
    Tables; one that cannot be converted raises InvalidSpectrumError here, before it is sent).
    Sent compactly, meaning the same to the server: log-linear wavelengths as a grid, masked pixels
    as ivar 0 when there is an ivar."""
    if isinstance(item, pb.Spectrum):
        return item
    if not isinstance(item, SpectrumInput):
        item = as_input(item)
    flux = np.asarray(item.flux, dtype=np.float32)
    ivar = None if item.ivar is None else np.asarray(item.ivar, dtype=np.float32)
    mask = None if item.mask is None or not np.any(item.mask) else np.asarray(item.mask, dtype=bool)
    if mask is not None and ivar is not None and mask.shape == ivar.shape == flux.shape:
        # ivar 0 marks an unusable pixel just as the mask does, and is cheaper to send and read
        ivar, flux, mask = np.where(mask, np.float32(0), ivar), np.where(mask, np.float32(0), flux), None
    message = pb.Spectrum(id=item.id)
    arrays = [(_FLUX, flux.astype("<f4", copy=False))]
    if ivar is not None:
        arrays.append((_IVAR, ivar.astype("<f4", copy=False)))
    if mask is not None:  # an all-usable mask says nothing
        arrays.append((_MASK, mask.astype("u1")))
    message.MergeFromString(b"".join(_packed_field(n, np.ascontiguousarray(a).tobytes()) for n, a in arrays))
    wave = np.asarray(item.wavelength, dtype=np.float64)
    grid = log_linear(wave)
    if grid is not None:  # two numbers instead of 8 bytes per pixel, and no list to convert
        message.grid.start, message.grid.step, message.grid.length = grid[0], grid[1], wave.size
    else:
        message.wavelength.values.extend(wave.tolist())
    if item.redshift is not None:
        message.redshift = float(item.redshift)
    if item.source_fwhm is not None:
        message.source_fwhm = float(item.source_fwhm)
    elif item.source_resolution is not None:
        message.source_resolution = float(item.source_resolution)
    message.metadata.update({str(k): str(v) for k, v in item.metadata.items()})
    return message
