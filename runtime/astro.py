"""Astronomy objects as requests: specutils spectra, astropy Quantities and Tables into
:class:`~specserve.runtime.spectrum.SpectrumInput`.

:func:`as_input` turns one object into one ``SpectrumInput``; :func:`as_inputs` also splits an
object holding several spectra (a 2-D flux, a table with one spectrum per row) into one input each.
They accept:

- a :class:`SpectrumInput` (returned as it is) or a read :class:`Spectrum`;
- a specutils ``Spectrum`` (specutils >= 2) or ``Spectrum1D`` (older versions);
- a tuple ``(wavelength, flux[, ivar[, mask]])`` of astropy Quantities (flux and ivar may also be
  plain arrays, ivar may also be an astropy ``StdDevUncertainty``/``VarianceUncertainty``/
  ``InverseVariance``), optionally led by an id: ``(id, wavelength, flux, ...)``;
- an astropy ``Table``/``QTable`` whose columns are the pixels (see :data:`COLUMNS`);
- ``(id, obj)`` for any of these; ``(id, wavelength, flux[, ivar, ...])`` of numpy arrays as before.

Conversions, to what the pipeline takes (vacuum Angstrom, ascending; inverse variance; True = bad):

- wavelength: any unit that ``u.spectral()`` relates to a length (nm, micron, Angstrom, GHz, eV,
  1/cm...), a specutils spectral axis with its own Doppler settings too; a descending axis (e.g. from
  frequencies) is reversed together with its arrays. A plain numpy array (or a table column with no
  unit) is Angstrom; a Quantity that is unitless or not spectral (kg) is an
  :class:`InvalidSpectrumError` naming the unit. specutils spectra and Quantities carry no air or
  vacuum flag: wavelengths are taken as **vacuum** (specserve's readers convert air wavelengths
  themselves; convert yours with ``specserve.runtime.preprocess.air_to_vacuum`` first).
- flux: its values in its own unit, whatever the unit (the models normalise by the continuum).
- uncertainty: to inverse variance in the flux's unit (1/sigma^2, 1/variance, or as it is), an
  uncertainty in another unit converted to the flux's first (``u.spectral_density`` for F_nu vs
  F_lambda); a sigma or variance <= 0 or not finite gives ivar 0 (an unusable pixel).
- ``mask``: True (non-zero) marks a bad pixel, as in specutils.
- redshift: a specutils spectrum's ``redshift`` (kept on its ``spectral_axis``) where non-zero;
  a table's ``meta['redshift']``/``meta['z']`` (or a ``redshift``/``z`` column, one per spectrum).
- id: the ``id`` argument, else the object's metadata (``id``, ``object_id``, ``objid``,
  ``object``, ``name``; a FITS header's ``OBJID``/``OBJNAME``/``OBJECT``), else ``""``. Split
  spectra get ``<id>-<i>`` (``<i>`` alone without an id).

specutils and astropy are imported only here, inside the functions, and only once such an object is
seen (a specutils spectrum is recognised by its class's module), so ``import
specserve.runtime.client`` loads neither. A 2-D flux has its spectral axis last (specutils'
``spectral_axis_index`` is followed); 3-D and larger cubes are rejected.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from specserve.runtime.errors import InvalidSpectrumError
from specserve.runtime.spectrum import Spectrum, SpectrumInput

COLUMNS = {
    "wavelength": ("wavelength", "wave", "lambda", "lam", "wavelengths"),
    "loglam": ("loglam", "log_wavelength", "log10_wavelength"),
    "flux": ("flux",),
    "ivar": ("ivar", "inverse_variance", "flux_ivar"),
    "std": ("error", "err", "uncertainty", "sigma", "flux_err", "flux_error", "std"),
    "var": ("variance", "var", "flux_var"),
    "mask": ("mask", "and_mask"),
    "redshift": ("redshift", "z"),
    "id": ("id", "object_id", "objid", "name"),
}
"""Table column names by role, matched without regard to case, first match wins. ``loglam`` is
log10 vacuum Angstrom (SDSS); a ``dex(AA)`` unit on it is followed."""

ID_KEYS = ("id", "object_id", "objid", "object", "name")
HEADER_ID_KEYS = ("OBJID", "OBJNAME", "OBJECT")
SPECUTILS_CLASSES = {"Spectrum", "Spectrum1D"}


@dataclass
class _Raw:
    """Arrays on the way: ``wavelength`` (n,) or (N, n) vacuum Angstrom in the given order,
    ``flux`` (n,) or (N, n), ``ivar``/``mask`` like ``flux`` or None; ``ids``/``redshifts``
    per spectrum when a table gives them."""

    id: str
    wavelength: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray | None = None
    mask: np.ndarray | None = None
    redshift: float | None = None
    ids: list[str] | None = None
    redshifts: np.ndarray | None = None

    @property
    def count(self) -> int | None:
        """How many spectra: None for one (a 1-D flux)."""
        return None if self.flux.ndim == 1 else int(self.flux.shape[0])


def as_input(obj: Any, id: str | None = None) -> SpectrumInput:
    """One spectrum as a :class:`SpectrumInput` (see the module docstring for what is accepted and
    how it is converted). ``id`` replaces the object's own. Raises :class:`InvalidSpectrumError`
    naming the problem: a unit that is not a wavelength, an uncertainty in a unit that does not
    match the flux, an object holding several spectra (split those with :func:`as_inputs`), an
    object of an unknown type."""
    direct = _direct(obj, id)
    if direct is not None:
        return direct
    raw = _raw(obj, id)
    if raw.count is not None:
        shape = tuple(raw.flux.shape)
        raise InvalidSpectrumError(
            f"{_named(raw.id)}flux of shape {shape} holds {shape[0]} spectra of {shape[1]} pixels: "
            "pass them one by one (specserve.runtime.astro.as_inputs splits them)")
    return _finish(raw.id, raw.wavelength, raw.flux, raw.ivar, raw.mask, raw.redshift)


def as_inputs(obj: Any, id: str | None = None) -> list[SpectrumInput]:
    """Every spectrum an object holds: one input per row of a 2-D flux (sharing its wavelengths, or
    each its own), per row of a table with array columns, or the one of :func:`as_input`. Split
    spectra are named ``<id>-<i>`` (a table's id column, where it has one, names them instead)."""
    direct = _direct(obj, id)
    if direct is not None:
        return [direct]
    raw = _raw(obj, id)
    if raw.count is None:
        return [_finish(raw.id, raw.wavelength, raw.flux, raw.ivar, raw.mask, raw.redshift)]
    out = []
    for i in range(raw.count):
        name = raw.ids[i] if raw.ids is not None else (f"{raw.id}-{i}" if raw.id else str(i))
        wave = raw.wavelength if raw.wavelength.ndim == 1 else raw.wavelength[i]
        z = raw.redshift if raw.redshifts is None else _redshift(raw.redshifts[i])
        out.append(_finish(name, wave, raw.flux[i], None if raw.ivar is None else raw.ivar[i],
                           None if raw.mask is None else raw.mask[i], z))
    return out


def is_specutils_spectrum(obj: Any) -> bool:
    """Whether ``obj`` is a specutils ``Spectrum``/``Spectrum1D`` (or a subclass), told from its
    classes' modules, so specutils is never imported to find out."""
    return any(c.__name__ in SPECUTILS_CLASSES and c.__module__.split(".")[0] == "specutils"
               for c in type(obj).__mro__)


# ------------------------------------------------------------------------------------ dispatch


def _direct(obj: Any, id: str | None) -> SpectrumInput | None:
    """The forms that need no unit conversion, as before: a SpectrumInput, a read Spectrum, an
    ``(id, wavelength, flux, ...)`` tuple of arrays, an object with SpectrumInput's fields (its
    wavelength converted if it is a Quantity); None for the others."""
    if isinstance(obj, SpectrumInput):
        return obj if id is None else replace(obj, id=str(id))
    if isinstance(obj, Spectrum):
        return SpectrumInput.from_spectrum(obj, None if id is None else str(id))
    if isinstance(obj, tuple):
        if _is_plain_tuple(obj):
            return SpectrumInput(str(obj[0] if id is None else id), *obj[1:])
        if len(obj) == 2 and _is_id(obj[0]):  # (id, obj)
            return _direct(obj[1], str(obj[0]) if id is None else id)
        return None
    if is_specutils_spectrum(obj) or _is_table(obj):
        return None
    if all(hasattr(obj, name) for name in ("id", "wavelength", "flux")):
        name = str(obj.id if id is None else id)
        return SpectrumInput(name, _angstrom(obj.wavelength, "wavelength", name), obj.flux, getattr(obj, "ivar", None),
                             getattr(obj, "mask", None), getattr(obj, "redshift", None),
                             getattr(obj, "metadata", None) or {}, getattr(obj, "source_fwhm", None),
                             getattr(obj, "source_resolution", None))
    return None


def _raw(obj: Any, id: str | None) -> _Raw:
    if isinstance(obj, tuple):
        return _from_tuple(obj, id)
    if is_specutils_spectrum(obj):
        return _from_specutils(obj, id)
    if _is_table(obj):
        return _from_table(obj, id)
    raise InvalidSpectrumError(
        f"cannot make a spectrum of a {type(obj).__module__}.{type(obj).__qualname__}: pass a "
        "SpectrumInput, a specutils Spectrum, a (wavelength, flux[, ivar]) tuple of Quantities or an "
        "astropy Table")


def _is_plain_tuple(obj: tuple) -> bool:
    """``(id, wavelength, flux, ...)`` of arrays, the form to_proto always took (not ``(id, obj)``)."""
    return len(obj) >= 3 and _is_id(obj[0]) and not _has_quantity(obj)


def _is_id(obj: Any) -> bool:
    """Whether a tuple's first item is an id (a str, a number, anything that is not an array)."""
    return isinstance(obj, (str, int, np.integer)) or not (
        _is_quantity(obj) or hasattr(obj, "__len__") or hasattr(obj, "__array__"))


def _from_tuple(obj: tuple, id: str | None) -> _Raw:
    """``(id, obj)``, or ``([id,] wavelength, flux[, ivar[, mask[, redshift]]])`` with Quantities."""
    if obj and _is_id(obj[0]):
        if len(obj) == 2:
            return _raw(obj[1], str(obj[0]) if id is None else id)
        obj, id = obj[1:], str(obj[0]) if id is None else id
    if not 2 <= len(obj) <= 5:
        raise InvalidSpectrumError(
            f"a spectrum tuple is ([id,] wavelength, flux[, ivar[, mask[, redshift]]]), got {len(obj)} items")
    name = "" if id is None else str(id)
    wave_in, flux_in, ivar_in, mask_in, z = (*obj, None, None, None)[:5]
    wave = _angstrom(wave_in, "wavelength", name)
    flux = _values(flux_in)
    ivar = None
    if ivar_in is not None:
        if hasattr(ivar_in, "uncertainty_type"):  # an astropy StdDev/Variance/InverseVariance uncertainty
            kind, values, unit = ivar_in.uncertainty_type, ivar_in.array, _uncertainty_unit(ivar_in)
        else:
            kind, values, unit = "ivar", ivar_in, _unit(ivar_in)
        wave_b = wave if wave.ndim == flux.ndim else wave[None, :]
        ivar = _to_ivar(kind, _values(values), unit, _unit(flux_in), wave_b, name)
    mask = None if mask_in is None else np.asarray(mask_in) != 0
    return _Raw(name, wave, flux, ivar, mask, _redshift(z))


# ----------------------------------------------------------------------------------- specutils


def _from_specutils(spectrum: Any, id: str | None) -> _Raw:
    name = str(id) if id is not None else _meta_id(getattr(spectrum, "meta", None))
    flux_q = spectrum.flux
    flux = _values(flux_q)
    axis = getattr(spectrum, "spectral_axis_index", None)
    axis = flux.ndim - 1 if axis is None else int(axis)
    if flux.ndim > 2:
        raise InvalidSpectrumError(f"{_named(name)}a specutils spectrum of shape {flux.shape} (a cube) is "
                                   "not taken: pass 1-D spectra, or a 2-D flux (several spectra)")
    wave = _angstrom(spectrum.spectral_axis, "spectral axis", name)
    ivar = mask = None
    uncertainty = getattr(spectrum, "uncertainty", None)
    if uncertainty is not None:
        kind = getattr(uncertainty, "uncertainty_type", None)
        if kind not in ("std", "var", "ivar"):
            raise InvalidSpectrumError(
                f"{_named(name)}uncertainty of type {type(uncertainty).__name__} ({kind!r}) is not taken: "
                "use StdDevUncertainty, VarianceUncertainty or InverseVariance")
        unc = np.moveaxis(_values(uncertainty.array), axis, -1) if flux.ndim == 2 else _values(uncertainty.array)
        wave_b = wave if unc.ndim == 1 else wave[None, :]
        ivar = _to_ivar(kind, unc, _uncertainty_unit(uncertainty), _unit(flux_q), wave_b, name)
    if getattr(spectrum, "mask", None) is not None:
        mask = np.asarray(spectrum.mask) != 0
        if flux.ndim == 2:
            mask = np.moveaxis(mask, axis, -1)
    if flux.ndim == 2:
        flux = np.moveaxis(flux, axis, -1)
    return _Raw(name, wave, flux, ivar, mask, _redshift(getattr(spectrum, "redshift", None)))


def _uncertainty_unit(uncertainty: Any):
    """An astropy uncertainty's unit (its parent's, in the right power, when it has none of its
    own; None when it has neither)."""
    return getattr(uncertainty, "unit", None)


# --------------------------------------------------------------------------------------- tables


def _is_table(obj: Any) -> bool:
    table = sys.modules.get("astropy.table")
    return table is not None and isinstance(obj, table.Table)


def _column(table: Any, role: str):
    names = {n.lower(): n for n in table.colnames}
    for candidate in COLUMNS[role]:
        if candidate in names:
            return table[names[candidate]]
    return None


def _as_quantity(column: Any):
    """A table column as a Quantity when it has a unit, else as it is (a QTable's are already)."""
    if _is_quantity(column) or getattr(column, "unit", None) is None:
        return column
    return column.quantity


def _filled(column: Any) -> tuple[Any, np.ndarray | None]:
    """A masked column filled with NaN, and its mask (None when nothing is masked)."""
    if getattr(column, "mask", None) is None:  # a Column, a Quantity
        return column, None
    mask = np.broadcast_to(np.asarray(column.mask, dtype=bool), np.shape(column))
    return (column.filled(np.nan), mask) if mask.any() else (column, None)


def _from_table(table: Any, id: str | None) -> _Raw:
    import astropy.units as u

    name = str(id) if id is not None else _meta_id(table.meta)
    flux_col = _column(table, "flux")
    if flux_col is None:
        raise InvalidSpectrumError(f"{_named(name)}the table has no flux column (columns: {', '.join(table.colnames)})")
    loglam = None
    wave_col = _column(table, "wavelength")
    if wave_col is None:
        loglam = _column(table, "loglam")
        if loglam is None:
            raise InvalidSpectrumError(
                f"{_named(name)}the table has no wavelength column (one of "
                f"{', '.join(COLUMNS['wavelength'] + COLUMNS['loglam'])}; columns: {', '.join(table.colnames)})")
    if loglam is not None:
        column = _as_quantity(loglam)
        if isinstance(getattr(column, "unit", None), u.LogUnit):
            wave = _angstrom(column.physical, "loglam", name)
        else:
            wave = 10.0 ** _values(column)
    else:
        wave = _angstrom(_as_quantity(wave_col), "wavelength", name)
    flux_col, flux_masked = _filled(flux_col)
    flux_q = _as_quantity(flux_col)
    flux, flux_unit = _values(flux_q), _unit(flux_q)
    rows = flux.ndim == 2  # one spectrum per table row, pixels along the second axis
    wave_b = wave if wave.ndim == flux.ndim else wave[None, :]
    ivar = None
    for kind in ("ivar", "std", "var"):
        column = _column(table, kind)
        if column is not None:
            q = _as_quantity(column)
            ivar = _to_ivar(kind, _values(q), _unit(q), flux_unit, wave_b, name)
            break
    mask = flux_masked
    mask_col = _column(table, "mask")
    if mask_col is not None:
        given = np.asarray(mask_col) != 0
        mask = given if mask is None else mask | given
    ids = redshifts = None
    redshift = _redshift(_meta_get(table.meta, ("redshift", "z")))
    if rows:
        id_col = _column(table, "id")
        if id_col is not None and id is None:
            ids = [str(v) for v in id_col]
        z_col = _column(table, "redshift")
        if z_col is not None:
            redshifts = np.asarray(_values(_as_quantity(z_col)), dtype=np.float64)
    return _Raw(name, wave, flux, ivar, mask, redshift, ids, redshifts)


# ---------------------------------------------------------------------------------- conversions


def _is_quantity(obj: Any) -> bool:
    units = sys.modules.get("astropy.units")
    return units is not None and isinstance(obj, units.Quantity)


def _has_quantity(obj: tuple) -> bool:
    return any(_is_quantity(item) for item in obj[:4])


def _unit(obj: Any):
    return obj.unit if _is_quantity(obj) else None


def _values(obj: Any) -> np.ndarray:
    """The numbers of an array, Quantity or column, in its own unit, as float64."""
    if _is_quantity(obj):
        obj = obj.value
    return np.asarray(obj, dtype=np.float64)


def _named(name: str) -> str:
    return f"spectrum {name!r}: " if name else ""


def _angstrom(wave: Any, what: str, name: str = "") -> np.ndarray:
    """Wavelengths in vacuum Angstrom, in the given order: a plain array is Angstrom already; a
    Quantity is converted with ``u.spectral()`` (a specutils axis with its Doppler settings)."""
    if not _is_quantity(wave):
        return np.asarray(wave, dtype=np.float64)
    import astropy.units as u

    if wave.unit.is_equivalent(u.dimensionless_unscaled):
        raise InvalidSpectrumError(
            f"{_named(name)}{what} is a unitless Quantity ({wave.unit.to_string() or 'dimensionless'}): "
            "give it a wavelength unit (e.g. u.AA, u.nm) or pass a plain numpy array in Angstrom")
    try:
        if hasattr(wave, "doppler_rest"):  # a SpectralQuantity (specutils' SpectralAxis): Doppler aware
            return np.asarray(wave.to_value(u.AA), dtype=np.float64)
        return np.asarray(wave.to_value(u.AA, equivalencies=u.spectral()), dtype=np.float64)
    except (u.UnitsError, ValueError) as exc:
        raise InvalidSpectrumError(
            f"{_named(name)}{what} in {wave.unit.to_string()} cannot be converted to a wavelength "
            f"(Angstrom): a length, frequency, energy or wavenumber unit is needed ({exc})") from None


def _to_ivar(kind: str, values: np.ndarray, unit: Any, flux_unit: Any, wave: np.ndarray,
             name: str = "") -> np.ndarray:
    """Inverse variance in the flux's unit from a standard deviation (``std``), variance (``var``)
    or inverse variance (``ivar``) in ``unit`` (None: the flux's). Not finite or <= 0 -> 0."""
    scale: Any = 1.0
    if unit is not None and flux_unit is not None:
        import astropy.units as u

        sigma_unit = unit if kind == "std" else unit ** {"var": 0.5, "ivar": -0.5}[kind]
        if sigma_unit != flux_unit:
            try:
                scale = _conversion(sigma_unit, flux_unit, wave)
            except (u.UnitsError, ValueError) as exc:
                label = {"std": "uncertainty", "var": "variance", "ivar": "inverse variance"}[kind]
                raise InvalidSpectrumError(
                    f"{_named(name)}{label} in {unit.to_string()} does not match the flux in "
                    f"{flux_unit.to_string()} ({exc})") from None
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if kind == "std":
            ivar = 1.0 / (values * scale) ** 2
        elif kind == "var":
            ivar = 1.0 / (values * scale ** 2)
        else:
            ivar = values / scale ** 2
    return np.where(np.isfinite(ivar) & (ivar > 0), ivar, 0.0)


def _conversion(unit: Any, flux_unit: Any, wave: np.ndarray) -> Any:
    """How many ``flux_unit`` one ``unit`` is: a number, or one per pixel where only
    ``u.spectral_density`` at the pixel's wavelength relates them (F_nu vs F_lambda)."""
    import astropy.units as u

    try:
        return unit.to(flux_unit)
    except u.UnitConversionError:
        ones = u.Quantity(np.ones(np.shape(wave)), unit)
        return ones.to_value(flux_unit, equivalencies=u.spectral_density(np.asarray(wave) * u.AA))


def _redshift(value: Any) -> float | None:
    """A redshift as a float, None where there is none or it is 0 (specutils' default)."""
    values = None if value is None else _values(value)
    return float(values) if values is not None and values.ndim == 0 and values != 0 else None


def _meta_get(meta: Any, keys: tuple[str, ...]) -> Any:
    if not meta:
        return None
    try:
        lowered = {str(k).lower(): v for k, v in meta.items()}
    except AttributeError:
        return None
    for key in keys:
        if lowered.get(key) not in (None, ""):
            return lowered[key]
    return None


def _meta_id(meta: Any) -> str:
    found = _meta_get(meta, ID_KEYS)
    if found is None and meta:
        header = meta.get("header") if hasattr(meta, "get") else None
        found = _meta_get(header, tuple(k.lower() for k in HEADER_ID_KEYS)) if header is not None else None
    return "" if found is None else str(found).strip()


def _finish(name: str, wave: np.ndarray, flux: np.ndarray, ivar: np.ndarray | None,
            mask: np.ndarray | None, redshift: float | None) -> SpectrumInput:
    """One spectrum's arrays, checked for shape and put in ascending wavelength order."""
    wave = np.asarray(wave, dtype=np.float64)
    if wave.ndim != 1 or flux.ndim != 1:
        raise InvalidSpectrumError(
            f"{_named(name)}wavelength and flux must be 1-D, got shapes {wave.shape} and {flux.shape}")
    if wave.shape != flux.shape:
        raise InvalidSpectrumError(f"{_named(name)}{wave.size} wavelengths but {flux.size} flux values")
    for label, array in (("ivar", ivar), ("mask", mask)):
        if array is not None and np.shape(array) != flux.shape:
            raise InvalidSpectrumError(f"{_named(name)}{label} has shape {np.shape(array)} but flux has {flux.shape}")
    if wave.size >= 2 and wave[0] > wave[-1]:  # e.g. frequencies: the pipeline takes ascending wavelengths
        wave, flux = wave[::-1], flux[::-1]
        ivar = None if ivar is None else ivar[::-1]
        mask = None if mask is None else mask[::-1]
    return SpectrumInput(name, wave, flux, ivar, None if mask is None else np.asarray(mask, dtype=bool),
                         redshift)
