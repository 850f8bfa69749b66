"""Spectrum I/O: detect a file's layout and read it into :class:`~.spectrum.Spectrum` objects.

``read_spectra(path)`` returns a list (one file may hold several spectra: template stacks, the
two arms of a LAMOST MRS file, a 2-D npz). Every format is read with astropy (FITS, gzipped or
not) or numpy (npz, CSV). Wavelengths come back in vacuum Angstrom: air wavelengths (MILES,
STELIB, and 1-D images that do not declare vacuum) are converted with the IAU standard formula.

Anything that is not a readable spectrum raises :class:`~.errors.SpectrumReadError` naming the
file and the reason; nothing else escapes from ``read_spectra``.

Formats (``source_format`` in the metadata):

=====================  ==========================================================================
``lamost_lrs_dr1``     LAMOST DR1-DR4 LRS: primary image 5 x n (flux, ivar, sub-continuum,
                       andmask, ormask), log-linear wavelengths from ``COEFF0``/``COEFF1``
``lamost_lrs_image``   LAMOST DR5-DR7 LRS: primary image 5 x n (flux, ivar, wavelength, andmask,
                       ormask)
``lamost_lrs_table``   LAMOST DR8+ LRS: one-row binary table with array columns FLUX, IVAR,
                       WAVELENGTH (ANDMASK, ORMASK optional)
``lamost_mrs``         LAMOST MRS: binary tables ``COADD_B``/``COADD_R`` (FLUX, IVAR, LOGLAM);
                       one spectrum per arm
``sdss_spec``          SDSS/BOSS ``spec-PLATE-MJD-FIBER``: ``COADD`` table (flux, loglam, ivar,
                       and_mask), ``SPECOBJ`` (SDSS) or ``SPALL`` (BOSS) table with the pipeline
                       CLASS/SUBCLASS
``boss_template``      co-added BOSS type templates: table LogLam, Flux, PropErr
``wave_flux_table``    any binary table with a wavelength and a flux column (e.g. FERRE models)
``sdss_eigen``         SDSS eigen/template stacks: primary image m x n with ``COEFF0``/``COEFF1``
``redrock_template``   DESI redrock PCA bases: ``BASIS_VECTORS`` image, linear or log wavelengths
``miles_1d``           MILES 1-D image (air, ``CRVAL1``/``CDELT1``, FWHM 2.5 A)
``stelib_1d``          STELIB 1-D image (air, ``CRVAL1``/``CDELT1``)
``fits_1d``            any other 1-D image with a linear (``DC-FLAG`` 0) or log-linear (1) WCS
``apogee_apstar``      SDSS-IV APOGEE apStar/asStar (DR17): HDU1 flux (1e-17 erg/s/cm2/A), HDU2 error,
                       HDU3 pixel bitmask, each 1-D (one visit) or rows combined (pixel-weighted),
                       combined (global-weighted), visits; log-linear vacuum wavelengths from
                       ``CRVAL1``/``CDELT1`` (4.179, 6e-6, 8575 pixels). The first row only
``apogee_apvisit``     APOGEE apVisit/asVisit: HDU1-3 flux, error, bitmask and HDU4 vacuum wavelengths,
                       3 chips x 4096 (red chip first, wavelength decreasing within a chip), joined
                       into one increasing spectrum with the chip gaps absent
``apogee_aspcapstar``  APOGEE aspcapStar: HDU1 ASPCAP pseudo-continuum-normalised flux (log-linear as
                       apStar, 0 in the chip gaps), HDU2 error, HDU3 best fit, HDU4 the ASPCAP row;
                       ``extra['normalised']`` is True
``payne_apogee_npz``   The Payne's APOGEE spectra (``spectrum``/``spec_err`` or ``spectra``/
                       ``spec_errs``) with ``apogee_wavelength.npz`` beside them
``npz``                user arrays: ``wavelength``, ``flux`` (1-D or 2-D), optional ``ivar`` or
                       ``error``, ``mask``
``csv``                user table with a header naming ``wavelength``, ``flux`` and optionally
                       ``ivar`` or ``error``
=====================  ==========================================================================

Spectra without per-pixel errors (MILES, STELIB, templates) get a constant inverse variance
estimated from the flux with DER_SNR; their metadata says ``ivar_estimated=True``.

APOGEE files are recognised by their layout (three images of one shape; a log-linear H-band WCS, or
a wavelength image in HDU4; an integer bitmask or a float best fit in HDU3; an ASPCAP table) once
the header or the name says APOGEE (``TELESCOP`` apo25m/lco25m/apo1m, ``SURVEY``, a 2MASS-style
``OBJID``/``APOGEE_ID``, pipeline ``HISTORY``, or an apStar/asStar/apVisit/asVisit/aspcapStar file
name); an APOGEE file cut short or in none of the three layouts is refused with the reason. A pixel
is unusable where its error is not positive, its flux not finite, or its ``APOGEE_PIXMASK`` has a
bit the DR17 pipeline (apogee_drp ``PixelBitMask``) calls bad: BADPIX, CRPIX, SATPIX, UNFIXABLE,
BADDARK, BADFLAT, BADERR, NOSKY (bits 0-7) and NOT_ENOUGH_PSF (14); the warning bits (Littrow ghost,
persistence, significant sky or telluric line) are kept. Elsewhere ivar = 1/error^2. Metadata: the
APOGEE id as ``object_id`` and ``extra['designation']``, RA/Dec, ``extra['snr']`` and, for a visit,
``extra['mjd']``.
"""

from __future__ import annotations

import csv
import glob
import gzip
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Callable

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyWarning

from specserve.runtime.errors import InvalidSpectrumError, SpectrumReadError
from specserve.runtime.preprocess import air_to_vacuum, estimated_ivar
from specserve.runtime.spectrum import Spectrum, SpectrumMeta

log = logging.getLogger(__name__)

LAMOST_LRS_RESOLUTION = 1800.0
LAMOST_MRS_RESOLUTION = 7500.0
SDSS_RESOLUTION = 2000.0
STELIB_FWHM = 3.0

APOGEE_RESOLUTION = 22500.0
APOGEE_TELESCOPES = ("apo25m", "lco25m", "apo1m")
APOGEE_BAD_PIXEL_BITS = 0x00FF | 0x4000
"""APOGEE_PIXMASK bits that make a pixel unusable: BADPIX, CRPIX, SATPIX, UNFIXABLE, BADDARK,
BADFLAT, BADERR, NOSKY (0-7) and NOT_ENOUGH_PSF (14), the bits the DR17 pipeline marks BAD."""
APOGEE_LOG_START = (4.1, 4.3)
"""log10 of the first wavelength an APOGEE log-linear WCS may have (apStar: 4.179, 15100.8 A)."""
_APOGEE_NAME = re.compile(r"^(ap|as)(star|visit)-|^aspcapstar-", re.IGNORECASE)
_TWOMASS_ID = re.compile(r"2M\d{8}[+-]\d{7}")

FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fts.gz")

Reader = Callable[[fits.HDUList, Path], list[Spectrum]]


def iter_inputs(items: Iterable[str | Path] = (), files_from: str | Path | None = None) -> Iterator[Path]:
    """The files named by ``items`` and by the lines of ``files_from`` (a file of paths, ``-`` for
    standard input; blank lines and ``#`` comments skipped), one at a time, never all held: a
    folder gives its files recursively in name order (hidden ones left out), a pattern not naming
    an existing file is expanded as a glob (``**`` recursive), anything else is passed as it is
    (reading it then says what is wrong)."""

    def lines() -> Iterator[str]:
        if files_from is None:
            return
        handle = sys.stdin if str(files_from) == "-" else open(files_from)
        try:
            for line in handle:
                line = line.strip()
                if line and not line.startswith("#"):
                    yield line
        finally:
            if handle is not sys.stdin:
                handle.close()

    def expand(item: str | Path) -> Iterator[Path]:
        path = Path(item)
        if path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(names):
                    if not name.startswith("."):
                        yield Path(root) / name
        elif not path.exists() and glob.has_magic(str(item)):
            for name in sorted(glob.iglob(str(item), recursive=True)):
                if Path(name).is_file():
                    yield Path(name)
        else:
            yield path

    for item in items:
        yield from expand(item)
    for item in lines():
        yield from expand(item)


def read_spectra(path: str | Path) -> list[Spectrum]:
    """Read every spectrum in ``path``; raises :class:`SpectrumReadError` if there is none."""
    path = Path(path)
    if not path.exists():
        raise SpectrumReadError(path, "no such file")
    if not path.is_file():
        raise SpectrumReadError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise SpectrumReadError(path, "empty file")
    name = path.name.lower()
    try:
        if name.endswith(".npz"):
            return _read_npz(path)
        if name.endswith(".csv"):
            return _read_csv(path)
        with warnings.catch_warnings(), _open_fits(path) as hdul:
            # Non-standard cards (STELIB, VizieR tables) are fixed by astropy on the fly.
            warnings.simplefilter("ignore", fits.verify.VerifyWarning)
            fmt = _detect_fits(hdul, path)
            return _FITS_READERS[fmt](hdul, path)
    except SpectrumReadError:
        raise
    except InvalidSpectrumError as exc:
        raise SpectrumReadError(path, str(exc)) from exc
    except Exception as exc:  # astropy, gzip and numpy raise many types on corrupt files
        raise SpectrumReadError(path, f"cannot read ({type(exc).__name__}: {exc})") from exc


def detect_format(path: str | Path) -> str:
    """Name of the layout ``read_spectra`` would use for ``path`` (reads headers only)."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            return "payne_apogee_npz" if _payne_keys(z.files) else "npz"
    if name.endswith(".csv"):
        return "csv"
    try:
        with warnings.catch_warnings(), _open_fits(path) as hdul:
            warnings.simplefilter("ignore", fits.verify.VerifyWarning)
            return _detect_fits(hdul, path)
    except SpectrumReadError:
        raise
    except Exception as exc:
        raise SpectrumReadError(path, f"cannot read ({type(exc).__name__}: {exc})") from exc


def _open_fits(path: Path) -> fits.HDUList:
    if not path.name.lower().endswith(FITS_SUFFIXES):
        with open(path, "rb") as fh:
            if fh.read(6) != b"SIMPLE":
                raise SpectrumReadError(path, "not a FITS, npz or CSV file")
    return fits.open(path, memmap=False)


def _stem(path: Path) -> str:
    """File name without its FITS/npz/CSV (and gzip) suffixes: ``MILES_res2.50_star_m0001V``."""
    name = path.name
    for suffix in (".gz", ".fits", ".fit", ".fts", ".npz", ".csv"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name


def _header_value(header: fits.Header, key: str, default=None):
    """A header value, or ``default`` when absent or unparsable (STELIB has malformed cards)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        try:
            value = header.get(key, default)
        except (fits.VerifyError, ValueError):
            return default
    if isinstance(value, str):
        value = value.strip()
    return value


def _float_or_none(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def _table_columns(hdu) -> dict[str, str]:
    """Lower-case column name -> actual column name for a table HDU ({} for images)."""
    if not isinstance(hdu, (fits.BinTableHDU, fits.TableHDU)):
        return {}
    return {name.lower(): name for name in hdu.columns.names}


def _detect_fits(hdul: fits.HDUList, path: Path) -> str:
    primary = hdul[0]
    header = primary.header
    names = {hdu.name.upper() for hdu in hdul}
    apogee = _apogee_layout(hdul, path)
    if apogee is not None:
        return apogee
    if {"COADD_B", "COADD_R"} & names:
        return "lamost_mrs"
    if "BASIS_VECTORS" in names and _header_value(hdul["BASIS_VECTORS"].header, "RRTYPE"):
        return "redrock_template"
    if len(hdul) > 1:
        cols = _table_columns(hdul[1])
        if {"flux", "loglam", "ivar"} <= set(cols) and ({"SPECOBJ", "SPALL"} & names):
            return "sdss_spec"
        if {"loglam", "flux", "properr"} <= set(cols):
            return "boss_template"
        if {"flux", "ivar", "wavelength"} <= set(cols):
            return "lamost_lrs_table"
        if _wave_column(cols) and "flux" in cols:
            return "wave_flux_table"
    naxis = header.get("NAXIS", 0)
    has_coeff = "COEFF0" in header and "COEFF1" in header
    if naxis == 2 and has_coeff:
        if str(_header_value(header, "TELESCOP", "")).upper() == "LAMOST":
            exten = str(_header_value(header, "EXTEN0", "")).lower()
            return "lamost_lrs_image" if "wavelength" in exten else "lamost_lrs_dr1"
        return "sdss_eigen"
    if naxis == 1 and "CRVAL1" in header and ("CDELT1" in header or "CD1_1" in header):
        if str(_header_value(header, "TPLLIB", "")).upper() == "MILES":
            return "miles_1d"
        if "STARIDEN" in header or path.name.upper().startswith("STELIB"):
            return "stelib_1d"
        return "fits_1d"
    if naxis == 0 and len(hdul) == 1:
        raise SpectrumReadError(path, "no data: the primary HDU is empty and there are no extensions")
    if len(hdul) > 1 and _table_columns(hdul[1]):
        raise SpectrumReadError(
            path, "a table without wavelength and flux columns (a catalogue, not a spectrum)"
        )
    raise SpectrumReadError(path, f"unknown layout (primary NAXIS={naxis}, HDUs={sorted(names)})")


def _image_shape(hdu) -> tuple[int, ...] | None:
    """Numpy shape of an image HDU from its header alone (None for tables and empty HDUs)."""
    if not isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)):
        return None
    naxis = int(hdu.header.get("NAXIS", 0) or 0)
    if naxis == 0:
        return None
    return tuple(int(hdu.header.get(f"NAXIS{i}", 0) or 0) for i in range(naxis, 0, -1))


def _apogee_evidence(hdul: fits.HDUList, path: Path) -> str | None:
    """What says the file is an APOGEE product, or None."""
    header = hdul[0].header
    telescope = str(_header_value(header, "TELESCOP", "")).lower()
    if telescope in APOGEE_TELESCOPES:
        return f"TELESCOP={telescope}"
    if "apogee" in str(_header_value(header, "SURVEY", "")).lower():
        return "SURVEY"
    for key in ("APOGEE_ID", "OBJID"):
        if _TWOMASS_ID.fullmatch(str(_header_value(header, key, ""))):
            return key
    history = " ".join(str(line) for line in header.get("HISTORY", [])).upper()
    if "APOGEE" in history or "AP1DVISIT" in history:
        return "HISTORY"
    if _APOGEE_NAME.match(path.name):
        return "file name"
    return None


def _apogee_loglinear_header(hdul: fits.HDUList) -> fits.Header | None:
    """The header (HDU1, else the primary) holding an H-band log-linear WCS, or None."""
    for header in (hdul[1].header, hdul[0].header):
        crval = _float_or_none(_header_value(header, "CRVAL1"))
        cdelt = _float_or_none(_header_value(header, "CDELT1"))
        if crval is not None and cdelt is not None:
            lo, hi = APOGEE_LOG_START
            if lo < crval < hi and 0 < cdelt < 1e-4:
                return header
    return None


def _aspcap_table(hdul: fits.HDUList):
    """The ASPCAP result table of an aspcapStar file (HDU4 or later), or None."""
    for hdu in hdul[4:]:
        cols = _table_columns(hdu)
        if cols and ({"aspcapflag", "fparam", "param"} & set(cols)):
            return hdu
    return None


def _apogee_complete(hdul: fits.HDUList, path: Path) -> None:
    """Raise unless the HDUs astropy found end where the file ends: a cut file still opens, with the
    HDUs before the cut or a last HDU whose data runs past the end."""
    last = hdul.fileinfo(len(hdul) - 1)
    end = int(last["datLoc"]) + int(last["datSpan"])
    size = int(getattr(last["file"], "size", 0) or 0)
    if not size:  # gzip: astropy does not know the size; count the decompressed bytes
        with open(path, "rb") as fh:
            gzipped = fh.read(2) == b"\x1f\x8b"
        if gzipped:
            try:
                with gzip.open(path, "rb") as fh:
                    while chunk := fh.read(1 << 20):
                        size += len(chunk)
            except (OSError, EOFError) as exc:
                raise SpectrumReadError(path, f"truncated or corrupt gzip stream ({exc})") from exc
    if size and end != size:
        raise SpectrumReadError(path, f"truncated or corrupt: its {len(hdul)} readable HDUs end at byte {end} "
                                      f"but the file holds {size} bytes")


def _is_wavelength_image(hdu) -> bool:
    """An apVisit wavelength image: labelled so (BUNIT, EXTNAME) or holding H-band Angstroms."""
    label = f"{_header_value(hdu.header, 'BUNIT', '')} {hdu.name}".upper()
    if "WAVE" in label:
        return True
    data = np.asarray(hdu.data, dtype=np.float64)
    return bool(np.all((data > 14000.0) & (data < 18000.0)))


def _apogee_layout(hdul: fits.HDUList, path: Path) -> str | None:
    """``apogee_apstar``, ``apogee_apvisit`` or ``apogee_aspcapstar`` from the HDU layout; None for
    a file nothing marks as APOGEE; raises for a cut APOGEE file or one in none of these layouts."""
    evidence = _apogee_evidence(hdul, path)
    if evidence is None:
        return None
    _apogee_complete(hdul, path)

    def refuse(why: str) -> SpectrumReadError:
        return SpectrumReadError(path, f"an APOGEE file ({evidence}) but not an apStar, apVisit or "
                                       f"aspcapStar layout: {why}")

    shapes = [_image_shape(hdu) for hdu in hdul[1:4]]
    if len(hdul) < 4 or any(shape is None for shape in shapes):
        found = ", ".join(f"HDU{i}={type(hdu).__name__}{_image_shape(hdu) or ''}" for i, hdu in enumerate(hdul))
        raise refuse(f"HDUs 1-3 must be flux, error and bitmask (or best-fit) images; found {found}")
    if len(set(shapes)) != 1 or len(shapes[0]) > 2:
        raise refuse(f"flux, error and bitmask images have shapes {shapes}")
    shape = shapes[0]
    if _apogee_loglinear_header(hdul) is None:
        if len(shape) == 2 and shape[0] == 3 and len(hdul) > 4 and _image_shape(hdul[4]) == shape \
                and _is_wavelength_image(hdul[4]):
            return "apogee_apvisit"
        raise refuse("no H-band log-linear wavelengths (CRVAL1/CDELT1) and no 3-chip wavelength image in HDU4")
    mask_is_integer = int(hdul[3].header.get("BITPIX", 0)) > 0
    if _aspcap_table(hdul) is not None or not mask_is_integer:
        if len(shape) != 1:
            raise refuse(f"an aspcapStar spectrum is 1-D, HDU1 has shape {shape}")
        return "apogee_aspcapstar"
    return "apogee_apstar"


def _wave_column(cols: dict[str, str]) -> str | None:
    for candidate in ("wavelength", "wave", "lambda", "wl"):
        if candidate in cols:
            return cols[candidate]
    return None


def _estimate_ivar(flux: np.ndarray) -> np.ndarray:
    """Constant inverse variance from DER_SNR for spectra that carry no errors (0 where the flux is
    not finite: those pixels are masked anyway)."""
    return estimated_ivar(flux)


def _lamost_meta(header: fits.Header, path: Path, fmt: str, resolution: float, **extra) -> SpectrumMeta:
    obsid = _header_value(header, "OBSID")
    desig = _header_value(header, "DESIG") or _header_value(header, "OBJNAME") or _stem(path)
    info = {
        "obsid": int(obsid) if obsid not in (None, "") else None,
        "designation": _header_value(header, "DESIG"),
        "objname": _header_value(header, "OBJNAME"),
        "plan_id": _header_value(header, "PLANID"),
        "fiber_id": _header_value(header, "FIBERID"),
        "lmjd": _header_value(header, "LMJD"),
        "mjd": _header_value(header, "MJD"),
        "z": _float_or_none(_header_value(header, "Z")),
        "snr_g": _float_or_none(_header_value(header, "SNRG", _header_value(header, "SN_G"))),
        "data_release": _header_value(header, "DATA_V"),
    }
    info.update(extra)
    return SpectrumMeta(
        object_id=str(obsid) if info["obsid"] is not None else str(desig),
        source_format=fmt,
        file=str(path),
        ra=_float_or_none(_header_value(header, "RA")),
        dec=_float_or_none(_header_value(header, "DEC")),
        survey_class=_header_value(header, "CLASS"),
        survey_subclass=_header_value(header, "SUBCLASS"),
        resolution=resolution,
        extra={k: v for k, v in info.items() if v is not None},
    )


def _loglinear(header: fits.Header, n: int) -> np.ndarray:
    return 10.0 ** (float(header["COEFF0"]) + float(header["COEFF1"]) * np.arange(n))


def _read_lamost_lrs_dr1(hdul: fits.HDUList, path: Path) -> list[Spectrum]:
    header, data = hdul[0].header, _image(hdul[0], path, min_rows=2)
    flux, ivar = data[0], data[1]
    mask = data[3] != 0 if data.shape[0] > 3 else None
    meta = _lamost_meta(header, path, "lamost_lrs_dr1", LAMOST_LRS_RESOLUTION)
    return [Spectrum.build(_loglinear(header, flux.size), flux, meta, ivar=ivar, mask=mask)]


def _read_lamost_lrs_image(hdul: fits.HDUList, path: Path) -> list[Spectrum]:
    header, data = hdul[0].header, _image(hdul[0], path, min_rows=3)
    mask = data[3] != 0 if data.shape[0] > 3 else None
    meta = _lamost_meta(header, path, "lamost_lrs_image", LAMOST_LRS_RESOLUTION)
    return [Spectrum.build(data[2], data[0], meta, ivar=data[1], mask=mask)]


def _read_lamost_lrs_table(hdul: fits.HDUList, path: Path) -> list[Spectrum]:
    table = hdul[1]
    cols = _table_columns(table)
    row = table.data[0]
    mask = np.asarray(row[cols["andmask"]]) != 0 if "andmask" in cols else None
    meta = _lamost_meta(hdul[0].header, path, "lamost_lrs_table", LAMOST_LRS_RESOLUTION)
    return [
        Spectrum.build(
            np.ravel(row[cols["wavelength"]]),
            np.ravel(row[cols["flux"]]),
            meta,
            ivar=np.ravel(row[cols["ivar"]]),
            mask=None if mask is None else np.ravel(mask),
        )
    ]


def _read_lamost_mrs(hdul: fits.HDUList, path: Path) -> list[Spectrum]:
    spectra = []
    reasons = []
    for arm in ("COADD_B", "COADD_R"):
        if arm not in hdul:
            continue
        table = hdul[arm]
        cols = _table_columns(table)
        meta = _lamost_meta(
            hdul[0].header, path, "lamost_mrs", LAMOST_MRS_RESOLUTION,
            arm=arm[-1], snr_arm=_float_or_none(_header_value(table.header, "SNR")),
        )
        meta = SpectrumMeta(**{**meta.__dict__, "object_id": f"{meta.object_id}:{arm[-1]}"})
        mask = np.asarray(table.data[cols["andmask"]]) != 0 if "andmask" in cols else None
        try:
            spectra.append(
                Spectrum.build(
                    10.0 ** np.asarray(table.data[cols["loglam"]], dtype=np.float64),
                    table.data[cols["flux"]],
                    meta,
                    ivar=table.data[cols["ivar"]],
                    mask=mask,
                )
            )
        except InvalidSpectrumError as exc:
            reasons.append(f"{arm}: {exc}")
            log.warning("%s: skipping %s: %s", path, arm, exc)
    if not spectra:
        raise SpectrumReadError(path, "no usable arm (" + "; ".join(reasons) + ")")
    return spectra


def _read_sdss_spec(hdul: fits.HDUList, path: Path) -> list[Spectrum]:
    coadd = hdul[1]
    cols = _table_columns(coadd)
    specobj = hdul["SPECOBJ" if "SPECOBJ" in hdul else "SPALL"].data
    scols = {c.lower(): c for c in specobj.columns.names}

    def pick(key: str):
        return specobj[scols[key]][0] if key in scols else None

    plate, mjd, fiber = pick("plate"), pick("mjd"), pick("fiberid")
    specobjid = str(pick("specobjid") or "").strip()
    object_id = specobjid or f"{int(plate):04d}-{int(mjd)}-{int(fiber):04d}"
    meta = SpectrumMeta(
        object_id=object_id,
        source_format="sdss_spec",
        file=str(path),
        ra=_float_or_none(pick("plug_ra")),
        dec=_float_or_none(pick("plug_dec")),
        survey_class=str(pick("class")).strip() if pick("class") is not None else None,
        survey_subclass=str(pick("subclass")).strip() if pick("subclass") is not None else None,
        resolution=SDSS_RESOLUTION,
        extra={
            k: v
            for k, v in {
                "plate": None if plate is None else int(plate),
                "mjd": None if mjd is None else int(mjd),
                "fiber_id": None if fiber is None else int(fiber),
                "z": _float_or_none(pick("z")),
            }.items()
            if v is not None
        },
    )
    mask = np.asarray(coadd.data[cols["and_mask"]]) != 0 if "and_mask" in cols else None
    return [
        Spectrum.build(
            10.0 ** np.asarray(coadd.data[cols["loglam"]], dtype=np.float64),
            coadd.data[cols["flux"]],
            meta,
            ivar=coadd.data[cols["ivar"]],
            mask=mask,
        )
    ]


def _read_boss_template(hdul: fits.HDUList, path: Path) -> list[Spectrum]:
    table = hdul[1]
    cols = _table_columns(table)
    err = np.asarray(table.data[cols["properr"]], dtype=np.float64)
    with np.errstate(divide="ignore"):
        ivar = np.where(err > 0, 1.0 / err**2, 0.0)
    stem = _stem(path)
    meta = SpectrumMeta(
        object_id=stem,
        source_format="boss_template",
        file=str(path),
        survey_class="STAR",
        survey_subclass=stem.split("_")[0],
        resolution=SDSS_RESOLUTION,
    )
    wave = 10.0 ** np.asarray(table.data[cols["loglam"]], dtype=np.float64)
    return [Spectrum.build(wave, table.data[cols["flux"]], meta, ivar=ivar)]


def _read_wave_flux_table(hdul: fits.HDUList, path: Path) -> list[Spectrum]:
    table = hdul[1]
    cols = _table_columns(table)
    flux = np.asarray(table.data[cols["flux"]], dtype=np.float64)
    ivar, estimated = _ivar_from_columns(table.data, cols, flux)
    meta = SpectrumMeta(
        object_id=_stem(path),
        source_format="wave_flux_table",
        file=str(path),
        ivar_estimated=estimated,
    )
    return [Spectrum.build(table.data[_wave_column(cols)], flux, meta, ivar=ivar)]


def _ivar_from_columns(data, cols: dict[str, str], flux: np.ndarray) -> tuple[np.ndarray, bool]:
    if "ivar" in cols:
        return np.asarray(data[cols["ivar"]], dtype=np.float64), False
    for name in ("error", "err", "sigma", "flux_err"):
        if name in cols:
            err = np.asarray(data[cols[name]], dtype=np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.where(err > 0, 1.0 / err**2, 0.0), False
    return _estimate_ivar(flux), True


def _image(hdu, path: Path, min_rows: int = 1) -> np.ndarray:
    data = hdu.data
    if data is None:
        raise SpectrumReadError(path, f"HDU {hdu.name!r} holds no data")
    data = np.asarray(data, dtype=np.float64)
    if data.ndim == 1:
        data = data[None, :]
    if data.ndim != 2 or data.shape[0] < min_rows:
        raise SpectrumReadError(path, f"HDU {hdu.name!r} has shape {data.shape}, expected at least {min_rows} rows")
    return data


def _read_sdss_eigen(hdul: fits.HDUList, path: Path) -> list[Spectrum]:
    header, data = hdul[0].header, _image(hdul[0], path)
    wave = _loglinear(header, data.shape[1])
    kind = str(_header_value(header, "OBJECT", "")) or None
    spectra = []
    for i, flux in enumerate(data):
        name = _header_value(header, f"NAME{i}") or f"{path.stem}[{i}]"
        meta = SpectrumMeta(
            object_id=str(name),
            source_format="sdss_eigen",
            file=str(path),
            survey_class=kind,
            survey_subclass=str(name).split(" (")[0],
            resolution=SDSS_RESOLUTION,
            ivar_estimated=True,
            extra={"row": i},
        )
        spectra.append(Spectrum.build(wave, flux, meta, ivar=_estimate_ivar(flux)))
    return spectra


def _wcs_axis(header: fits.Header, n: int) -> np.ndarray:
    crval = float(header["CRVAL1"])
    cdelt = float(header.get("CDELT1", header.get("CD1_1")))
    crpix = float(header.get("CRPIX1", 1.0))
    axis = crval + cdelt * (np.arange(n) + 1.0 - crpix)
    return axis


def _read_redrock(hdul: fits.HDUList, path: Path) -> list[Spectrum]:
    hdu = hdul["BASIS_VECTORS"]
    header, data = hdu.header, _image(hdu, path)
    axis = _wcs_axis(header, data.shape[1])
    wave = 10.0**axis if bool(header.get("LOGLAM", False)) else axis
    rrtype = str(_header_value(header, "RRTYPE", ""))
    subtype = str(_header_value(header, "RRSUBTYP", ""))
    spectra = []
    for i, flux in enumerate(data):
        meta = SpectrumMeta(
            object_id=f"{rrtype}-{subtype}[{i}]",
            source_format="redrock_template",
            file=str(path),
            survey_class=rrtype or None,
            survey_subclass=subtype or None,
            ivar_estimated=True,
            extra={"row": i, "version": _header_value(header, "VERSION")},
        )
        spectra.append(Spectrum.build(wave, flux, meta, ivar=_estimate_ivar(flux)))
    return spectra


def _is_vacuum_1d(header: fits.Header) -> bool:
    if str(_header_value(header, "CTYPE1", "")).upper().startswith("WAVE"):
        return True
    if bool(_header_value(header, "VACUUM", False)):
        return True
    return str(_header_value(header, "AIRORVAC", "")).lower().startswith("vac")


def _read_1d(fmt: str) -> Reader:
    def reader(hdul: fits.HDUList, path: Path) -> list[Spectrum]:
        header, data = hdul[0].header, _image(hdul[0], path)
        flux = data[0]
        axis = _wcs_axis(header, flux.size)
        wave = 10.0**axis if int(_header_value(header, "DC-FLAG", 0) or 0) == 1 else axis
        vacuum = _is_vacuum_1d(header) and fmt == "fits_1d"
        if not vacuum:
            wave = air_to_vacuum(wave)
        # Zero-padded ends (STELIB) are not data.
        padding = flux == 0
        extra = {"air_to_vacuum": not vacuum}
        fwhm = None
        if fmt == "miles_1d":
            fwhm = _float_or_none(_header_value(header, "FWHM"))
        elif fmt == "stelib_1d":
            fwhm = STELIB_FWHM
            for key, name in (("TEFF", "teff"), ("LOG_G", "logg"), ("FE_H", "feh")):
                value = _float_or_none(_header_value(header, key))
                if value is not None:
                    extra[name] = value
        object_id = _header_value(header, "OBJECT") or _header_value(header, "STARIDEN") or _stem(path)
        meta = SpectrumMeta(
            object_id=str(object_id),
            source_format=fmt,
            file=str(path),
            survey_subclass=_header_value(header, "SPECTYPE") or None,
            fwhm=fwhm,
            ivar_estimated=True,
            extra=extra,
        )
        ivar = _estimate_ivar(np.where(padding, np.nan, flux))
        return [Spectrum.build(wave, flux, meta, ivar=ivar, mask=padding)]

    return reader


def _apogee_image(hdu, path: Path, what: str) -> np.ndarray:
    data = hdu.data
    if data is None:
        raise SpectrumReadError(path, f"the {what} HDU holds no data")
    return np.asarray(data)


def _apogee_first_row(hdu, path: Path, what: str) -> np.ndarray:
    """An apStar image's first row (the pixel-weighted combined spectrum), or the image when 1-D."""
    data = _apogee_image(hdu, path, what)
    return data[0] if data.ndim == 2 else data


def _apogee_unusable(flux: np.ndarray, error: np.ndarray, bits: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(ivar, mask): ivar = 1/error^2; masked where the error is not positive, the flux not finite
    or a bad APOGEE_PIXMASK bit is set."""
    error = np.asarray(error, dtype=np.float64)
    good = np.isfinite(error) & (error > 0) & np.isfinite(flux)
    if bits is not None:
        if bits.dtype.kind not in "iu":
            bits = np.where(np.isfinite(bits), bits, 0).astype(np.int64)
        good &= (bits.astype(np.int64) & APOGEE_BAD_PIXEL_BITS) == 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ivar = np.where(good, 1.0 / error**2, 0.0)
    return ivar, ~good


def _apogee_id(hdul: fits.HDUList, path: Path, table=None) -> str | None:
    header = hdul[0].header
    for key in ("APOGEE_ID", "OBJID"):
        value = str(_header_value(header, key, "") or "").strip()
        if value:
            return value
    if table is not None:
        cols = _table_columns(table)
        if "apogee_id" in cols and len(table.data):
            value = str(table.data[cols["apogee_id"]][0]).strip()
            if value:
                return value
    found = _TWOMASS_ID.search(path.name)
    return found.group(0) if found else None


def _apogee_meta(hdul: fits.HDUList, path: Path, fmt: str, table=None, **extra) -> SpectrumMeta:
    header = hdul[0].header
    apogee_id = _apogee_id(hdul, path, table)
    ra = _float_or_none(_header_value(header, "RA"))
    dec = _float_or_none(_header_value(header, "DEC"))
    row = {}
    if table is not None and len(table.data):
        cols = _table_columns(table)
        row = {k: table.data[cols[k]][0] for k in ("ra", "dec", "snr", "teff", "logg", "m_h") if k in cols}
        ra = ra if ra is not None else _float_or_none(row.get("ra"))
        dec = dec if dec is not None else _float_or_none(row.get("dec"))
    telescope = _header_value(header, "TELESCOP")
    info = {
        "designation": apogee_id,
        "snr": _float_or_none(_header_value(header, "SNR", row.get("snr"))),
        "telescope": str(telescope).strip() if telescope not in (None, "") else None,
        "field": _header_value(header, "FIELD") or None,
        "starflag": _header_value(header, "STARFLAG"),
    }
    for key in ("teff", "logg", "m_h"):
        info[key] = _float_or_none(row.get(key))
    info.update(extra)
    return SpectrumMeta(
        object_id=apogee_id or _stem(path),
        source_format=fmt,
        file=str(path),
        ra=ra,
        dec=dec,
        resolution=APOGEE_RESOLUTION,
        extra={k: v for k, v in info.items() if v is not None},
    )


def _apogee_loglinear_wave(hdul: fits.HDUList, n: int) -> np.ndarray:
    return 10.0 ** _wcs_axis(_apogee_loglinear_header(hdul), n)


def _read_apogee_apstar(hdul: fits.HDUList, path: Path) -> list[Spectrum]:
    flux = _apogee_first_row(hdul[1], path, "flux").astype(np.float64)
    error = _apogee_first_row(hdul[2], path, "error")
    bits = _apogee_first_row(hdul[3], path, "bitmask")
    ivar, mask = _apogee_unusable(flux, error, bits)
    nvisits = _header_value(hdul[0].header, "NVISITS")
    meta = _apogee_meta(hdul, path, "apogee_apstar", nvisits=None if nvisits in (None, "") else int(nvisits))
    return [Spectrum.build(_apogee_loglinear_wave(hdul, flux.size), flux, meta, ivar=ivar, mask=mask)]


def _read_apogee_aspcapstar(hdul: fits.HDUList, path: Path) -> list[Spectrum]:
    flux = _apogee_image(hdul[1], path, "flux").astype(np.float64)
    error = _apogee_image(hdul[2], path, "error")
    ivar, mask = _apogee_unusable(flux, error, None)
    mask |= flux == 0  # the chip gaps of the normalised spectrum
    meta = _apogee_meta(hdul, path, "apogee_aspcapstar", table=_aspcap_table(hdul), normalised=True)
    return [Spectrum.build(_apogee_loglinear_wave(hdul, flux.size), flux, meta, ivar=ivar, mask=mask)]


def _read_apogee_apvisit(hdul: fits.HDUList, path: Path) -> list[Spectrum]:
    flux, error, bits, wave = (_apogee_image(hdul[i], path, what)
                               for i, what in ((1, "flux"), (2, "error"), (3, "bitmask"), (4, "wavelength")))
    wave = wave.astype(np.float64)
    if not np.all(np.isfinite(wave) & (wave > 0)):
        raise SpectrumReadError(path, "the apVisit wavelength image (HDU4) is not all finite and positive")
    chips = []  # (chip rows, pixels) -> flat indices of each chip in increasing wavelength
    for row in range(wave.shape[0]):
        step = np.diff(wave[row])
        if np.all(step < 0):
            order = np.arange(wave.shape[1])[::-1]
        elif np.all(step > 0):
            order = np.arange(wave.shape[1])
        else:
            raise SpectrumReadError(path, f"apVisit chip {row}: wavelengths are not monotonic")
        chips.append(row * wave.shape[1] + order)
    chips.sort(key=lambda index: wave.reshape(-1)[index[0]])
    index = np.concatenate(chips)
    wave, flux = wave.reshape(-1)[index], flux.reshape(-1)[index].astype(np.float64)
    if np.any(np.diff(wave) <= 0):
        raise SpectrumReadError(path, "apVisit chips overlap in wavelength")
    ivar, mask = _apogee_unusable(flux, error.reshape(-1)[index], bits.reshape(-1)[index])
    header = hdul[0].header
    mjd = _header_value(header, "MJD5")
    if mjd in (None, ""):
        jd = _float_or_none(_header_value(header, "JD-MID"))
        mjd = None if jd is None else jd - 2400000.5
    meta = _apogee_meta(
        hdul, path, "apogee_apvisit",
        mjd=None if mjd in (None, "") else (int(mjd) if float(mjd).is_integer() else float(mjd)),
        plate=_header_value(header, "PLATE"),
        fiber_id=_header_value(header, "FIBERID"),
    )
    return [Spectrum.build(wave, flux, meta, ivar=ivar, mask=mask)]


_FITS_READERS: dict[str, Reader] = {
    "lamost_lrs_dr1": _read_lamost_lrs_dr1,
    "lamost_lrs_image": _read_lamost_lrs_image,
    "lamost_lrs_table": _read_lamost_lrs_table,
    "lamost_mrs": _read_lamost_mrs,
    "sdss_spec": _read_sdss_spec,
    "boss_template": _read_boss_template,
    "wave_flux_table": _read_wave_flux_table,
    "sdss_eigen": _read_sdss_eigen,
    "redrock_template": _read_redrock,
    "miles_1d": _read_1d("miles_1d"),
    "stelib_1d": _read_1d("stelib_1d"),
    "fits_1d": _read_1d("fits_1d"),
    "apogee_apstar": _read_apogee_apstar,
    "apogee_apvisit": _read_apogee_apvisit,
    "apogee_aspcapstar": _read_apogee_aspcapstar,
}

FORMATS = tuple(_FITS_READERS) + ("payne_apogee_npz", "npz", "csv")


def _payne_keys(keys) -> bool:
    keys = set(keys)
    return {"spectrum", "spec_err"} <= keys or {"spectra", "spec_errs"} <= keys


def _read_npz(path: Path) -> list[Spectrum]:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    if _payne_keys(arrays):
        return _read_payne_npz(path, arrays)
    keys = {k.lower(): k for k in arrays}
    wave_key = next((keys[k] for k in ("wavelength", "wave") if k in keys), None)
    if wave_key is None or "flux" not in keys:
        raise SpectrumReadError(path, f"npz needs 'wavelength' and 'flux' arrays, found {sorted(arrays)}")
    wave = np.asarray(arrays[wave_key], dtype=np.float64)
    flux = np.atleast_2d(np.asarray(arrays[keys["flux"]], dtype=np.float64))
    if "ivar" in keys:
        ivar = np.broadcast_to(np.asarray(arrays[keys["ivar"]], dtype=np.float64), flux.shape)
        estimated = False
    elif "error" in keys:
        err = np.broadcast_to(np.asarray(arrays[keys["error"]], dtype=np.float64), flux.shape)
        with np.errstate(divide="ignore", invalid="ignore"):
            ivar = np.where(err > 0, 1.0 / err**2, 0.0)
        estimated = False
    else:
        ivar = np.stack([_estimate_ivar(f) for f in flux])
        estimated = True
    mask = np.broadcast_to(arrays[keys["mask"]], flux.shape) if "mask" in keys else None
    ids = [str(x) for x in arrays[keys["id"]]] if "id" in keys else None
    spectra = []
    for i in range(flux.shape[0]):
        object_id = ids[i] if ids and i < len(ids) else (path.stem if flux.shape[0] == 1 else f"{path.stem}[{i}]")
        meta = SpectrumMeta(object_id=object_id, source_format="npz", file=str(path), ivar_estimated=estimated)
        spectra.append(
            Spectrum.build(wave, flux[i], meta, ivar=ivar[i], mask=None if mask is None else mask[i])
        )
    return spectra


def _read_payne_npz(path: Path, arrays: dict[str, np.ndarray]) -> list[Spectrum]:
    wave_file = path.parent / "apogee_wavelength.npz"
    if not wave_file.exists():
        raise SpectrumReadError(path, f"APOGEE spectra need {wave_file.name} beside them")
    with np.load(wave_file, allow_pickle=False) as z:
        wave = np.asarray(z["wavelength"], dtype=np.float64)
    if "spectrum" in arrays:
        flux, err = np.atleast_2d(arrays["spectrum"]), np.atleast_2d(arrays["spec_err"])
    else:
        flux, err = np.atleast_2d(arrays["spectra"]), np.atleast_2d(arrays["spec_errs"])
    err = np.asarray(err, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ivar = np.where(err > 0, 1.0 / err**2, 0.0)
    name = path.stem.split("_")[-1]
    spectra = []
    for i in range(flux.shape[0]):
        meta = SpectrumMeta(
            object_id=name if flux.shape[0] == 1 else f"{name}[{i}]",
            source_format="payne_apogee_npz",
            file=str(path),
            resolution=22500.0,
            extra={"row": i},
        )
        spectra.append(Spectrum.build(wave, flux[i], meta, ivar=ivar[i]))
    return spectra


def _read_csv(path: Path) -> list[Spectrum]:
    with open(path, newline="") as fh:
        rows = [row for row in csv.reader(fh) if row and not row[0].lstrip().startswith("#")]
    if not rows:
        raise SpectrumReadError(path, "CSV has no header")
    header = [h.strip().lower() for h in rows[0]]
    cols = {h: i for i, h in enumerate(header)}
    wave_col = next((cols[k] for k in ("wavelength", "wave") if k in cols), None)
    if wave_col is None or "flux" not in cols:
        raise SpectrumReadError(path, f"CSV header must name 'wavelength' and 'flux', got {rows[0]}")
    body = rows[1:]
    if not body:
        raise SpectrumReadError(path, "CSV has a header but no rows")
    try:
        table = np.array([[float(v) if v.strip() else np.nan for v in row] for row in body])
    except ValueError as exc:
        raise SpectrumReadError(path, f"CSV holds a non-numeric value ({exc})") from exc
    if table.ndim != 2 or table.shape[1] != len(header):
        raise SpectrumReadError(path, "CSV rows do not all have as many values as the header")
    data = {name: table[:, i] for name, i in cols.items()}
    flux = data["flux"]
    ivar, estimated = _ivar_from_columns(data, {k: k for k in data}, flux)
    meta = SpectrumMeta(object_id=path.stem, source_format="csv", file=str(path), ivar_estimated=estimated)
    return [Spectrum.build(table[:, wave_col], flux, meta, ivar=ivar)]
