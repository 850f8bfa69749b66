"""SDSS-IV DR17 APOGEE readers (apStar/asStar, apVisit, aspcapStar) on files written here in the DR17
layouts (apogee_drp ``ApSpec.write`` and ``ap1dvisit``; aspcapStar HDU1-4) from the kit's two real
APOGEE spectra, The Payne's npz in ``payne_kurucz/``, and the shipped SPT model on what they read."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from specserve.runtime.catalogue import identity_of
from specserve.runtime.errors import SpectrumReadError
from specserve.runtime.io import detect_format, read_spectra
from specserve.runtime.spectrum import SpectrumInput

COMBINED_ID = "2M13012770+5754582"
VISITS_ID = "2M06133561+2433362"
LOGW0, DLOGW, NWAVE = 4.179, 6e-6, 8575  # the apStar wavelength grid of the DR17 data model
# APOGEE_PIXMASK (DR17, apogee_drp PixelBitMask): the bits it calls BAD and some warning-only bits
BAD_BITS = {"BADPIX": 0, "CRPIX": 1, "SATPIX": 2, "UNFIXABLE": 3, "BADDARK": 4, "BADFLAT": 5,
            "BADERR": 6, "NOSKY": 7, "NOT_ENOUGH_PSF": 14}
WARN_BITS = {"LITTROW_GHOST": 8, "PERSIST_HIGH": 9, "PERSIST_MED": 10, "PERSIST_LOW": 11,
             "SIG_SKYLINE": 12, "SIG_TELLURIC": 13}
FLUX_UNIT = "Flux (10^-17 erg/s/cm^2/Ang)"


def _radec(designation: str) -> tuple[float, float]:
    """RA, Dec (deg) encoded in a 2MASS designation 2Mhhmmsss[+-]ddmmsss."""
    body = designation[2:]
    ra = int(body[0:2]) + int(body[2:4]) / 60 + int(body[4:8]) / 100 / 3600
    sign = -1.0 if body[8] == "-" else 1.0
    dec = int(body[9:11]) + int(body[11:13]) / 60 + int(body[13:16]) / 10 / 3600
    return 15.0 * ra, sign * dec


class Payne:
    """The kit's real spectra and where their pixels fall on the apStar grid."""

    def __init__(self, folder: Path):
        self.folder = folder
        with np.load(folder / "apogee_wavelength.npz") as z:
            self.wave = np.asarray(z["wavelength"], dtype=np.float64)
        with np.load(folder / f"spectrum_combined_{COMBINED_ID}.npz") as z:
            self.flux, self.err = np.asarray(z["spectrum"], np.float64), np.asarray(z["spec_err"], np.float64)
        with np.load(folder / f"visit_spectra_{VISITS_ID}.npz") as z:
            self.visit_flux = np.asarray(z["spectra"], np.float64)
            self.visit_err = np.asarray(z["spec_errs"], np.float64)
            self.visit_snr, self.visit_mjd = np.asarray(z["snrs"], np.float64), np.asarray(z["hjds"], np.float64)
        index = (np.log10(self.wave) - LOGW0) / DLOGW
        self.index = np.rint(index).astype(int)  # apStar pixel of each Payne pixel
        assert np.max(np.abs(index - self.index)) < 1e-3 and 0 <= self.index.min() < self.index.max() < NWAVE
        jumps = np.flatnonzero(np.diff(self.index) > 1)
        assert len(jumps) == 2  # three detectors, two gaps
        self.chips = np.split(np.arange(self.wave.size), jumps + 1)  # Payne pixels per chip, blue to red

    @property
    def grid(self) -> np.ndarray:
        return 10.0 ** (LOGW0 + DLOGW * np.arange(NWAVE))


def _on_grid(p: Payne, values: np.ndarray, fill: float) -> np.ndarray:
    out = np.full(NWAVE, fill, dtype=np.float64)
    out[p.index] = values
    return out


def _flag(rng, free: np.ndarray, bits: dict[str, int], per_bit: int) -> dict[int, int]:
    """``per_bit`` pixels drawn from ``free`` (removed from it) for each bit: {pixel: bit value}."""
    out = {}
    for bit in bits.values():
        for pixel in rng.choice(sorted(free), per_bit, replace=False):
            out[int(pixel)] = 1 << bit
            free.discard(int(pixel))
    return out


def _history(header: fits.Header, lines: list[str]) -> None:
    for line in lines:
        header["HISTORY"] = line


def _wcs_header(extname: str | None, bunit: str) -> fits.Header:
    h = fits.Header()
    h["CRVAL1"], h["CDELT1"], h["CRPIX1"] = LOGW0, DLOGW, 1
    h["CTYPE1"], h["DC-FLAG"] = "LOG-LINEAR", 1
    h["BUNIT"] = bunit
    if extname:
        h["EXTNAME"] = extname
    return h


def _write_apstar(path: Path, header: fits.Header, flux, err, bits, extnames: bool) -> None:
    hdus = [fits.PrimaryHDU(header=header)]
    for data, name, unit in ((flux, "FLUX", FLUX_UNIT), (err, "ERROR", "Err (10^-17 erg/s/cm^2/Ang)"),
                             (bits, "MASK", "Pixel bitmask"), (np.zeros_like(flux), "SKY FLUX", "Sky"),
                             (np.zeros_like(flux), "SKY ERROR", "Sky error"),
                             (np.ones_like(flux), "TELLURIC", "Telluric"),
                             (np.zeros_like(flux), "TELLURIC ERROR", "Telluric error")):
        hdus.append(fits.ImageHDU(data, header=_wcs_header(name if extnames else None, unit)))
    fits.HDUList(hdus).writeto(path)


@pytest.fixture(scope="module")
def payne(kit) -> Payne:
    return Payne(kit / "payne_kurucz")


@pytest.fixture(scope="module")
def written(payne, tmp_path_factory):
    """The four files and what each must read as: {name: (path, expectation dict)}."""
    p, rng = payne, np.random.default_rng(17)
    out = tmp_path_factory.mktemp("apogee")
    files = {}

    # apStar, two visits of the visit star: rows combined (pixel-weighted), combined (global), visits
    w = 1.0 / p.visit_err[:2] ** 2
    comb_flux = (p.visit_flux[:2] * w).sum(0) / w.sum(0)
    comb_err = 1.0 / np.sqrt(w.sum(0))
    glob_w = p.visit_snr[:2, None] ** 2
    glob_flux = (p.visit_flux[:2] * glob_w).sum(0) / glob_w.sum()
    flux = np.vstack([_on_grid(p, comb_flux, np.nan), _on_grid(p, glob_flux, np.nan),
                      _on_grid(p, p.visit_flux[0], np.nan), _on_grid(p, p.visit_flux[1], np.nan)])
    err = np.vstack([_on_grid(p, comb_err, 0.0), _on_grid(p, comb_err, 0.0),
                     _on_grid(p, p.visit_err[0], 0.0), _on_grid(p, p.visit_err[1], 0.0)])
    bits = np.zeros(flux.shape, np.int32)
    bits[2:, :] = 1 << BAD_BITS["BADPIX"]  # visit rows all bad: only the first row may be read
    free = set(p.index.tolist())
    flags = _flag(rng, free, BAD_BITS, 3) | _flag(rng, free, WARN_BITS, 3)
    for pixel, value in flags.items():
        bits[0, pixel] = value
    zero_err, neg_err, nan_flux = (int(rng.choice(sorted(free))) for _ in range(3))
    err[0, zero_err], err[0, neg_err], flux[0, nan_flux] = 0.0, -1.0, np.nan
    bad = np.ones(NWAVE, bool)
    bad[p.index] = False
    bad[[q for q, v in flags.items() if v & sum(1 << b for b in BAD_BITS.values())]] = True
    bad[[zero_err, neg_err, nan_flux]] = True
    ra, dec = _radec(VISITS_ID)
    h = fits.Header()
    h["FIELD"], h["OBJID"], h["TELESCOP"] = "AQMES-BONUS", VISITS_ID, "apo25m"
    h["SNR"] = float(np.nanmedian(comb_flux / comb_err))
    h["RA"], h["DEC"], h["NVISITS"] = ra, dec, 2
    h["CRVAL1"], h["CDELT1"], h["CRPIX1"], h["CTYPE1"], h["DC-FLAG"] = LOGW0, DLOGW, 1, "LOG-LINEAR", 1
    for i in range(2):
        h[f"SFILE{i + 1}"] = f"apVisit-dr17-apo25m-5094-{int(p.visit_mjd[i])}-{120 + i}.fits"
        h[f"JD{i + 1}"] = p.visit_mjd[i] + 2400000.5
        h[f"SNRVIS{i + 1}"] = p.visit_snr[i]
    _history(h, ["APOGEE Reduction Pipeline Version: dr17", "HDU0 : header", "HDU1 : flux",
                 "HDU2 : flux uncertainty", "HDU3 : pixel bitmask"])
    path = out / f"apStar-dr17-{VISITS_ID}.fits"
    _write_apstar(path, h, flux.astype(np.float32), err.astype(np.float32), bits, extnames=True)
    files["apstar2"] = (path, {"format": "apogee_apstar", "id": VISITS_ID, "flux": flux[0], "err": err[0],
                               "bad": bad, "ra": ra, "dec": dec, "snr": h["SNR"], "nvisits": 2})

    # apStar of the combined star with NVISITS=1: 1-D images, the WCS in HDU1-3 only (IDL style)
    flux1, err1 = _on_grid(p, p.flux, np.nan), _on_grid(p, p.err, 0.0)
    bits1 = np.zeros(NWAVE, np.int16)
    free = set(p.index.tolist())
    flags = _flag(rng, free, BAD_BITS, 2) | _flag(rng, free, WARN_BITS, 2)
    for pixel, value in flags.items():
        bits1[pixel] = value
    bad1 = np.ones(NWAVE, bool)
    bad1[p.index] = False
    bad1[[q for q, v in flags.items() if v & sum(1 << b for b in BAD_BITS.values())]] = True
    ra1, dec1 = _radec(COMBINED_ID)
    h = fits.Header()
    h["OBJID"], h["TELESCOP"], h["SNR"] = COMBINED_ID, "apo25m", float(np.median(p.flux / p.err))
    h["RA"], h["DEC"], h["NVISITS"] = ra1, dec1, 1
    h["SFILE1"] = "apVisit-r13-5660-56013-031.fits"
    _history(h, ["APOGEE Reduction Pipeline Version: r13"])
    path = out / f"apStar-dr17-{COMBINED_ID}.fits"
    _write_apstar(path, h, flux1.astype(np.float32), err1.astype(np.float32), bits1, extnames=False)
    files["apstar1"] = (path, {"format": "apogee_apstar", "id": COMBINED_ID, "flux": flux1, "err": err1,
                               "bad": bad1, "ra": ra1, "dec": dec1, "snr": h["SNR"], "nvisits": 1})

    # apVisit of the first visit: three chips padded to one length with flagged detector pixels,
    # wavelength decreasing within a chip, red chip first
    n = max(len(c) for c in p.chips)
    pads = [(n - len(p.chips[0]), 0), (200, n - len(p.chips[1]) - 200), (0, n - len(p.chips[2]))]
    gaps = [p.index[p.chips[1][0]] - p.index[p.chips[0][-1]], p.index[p.chips[2][0]] - p.index[p.chips[1][-1]]]
    assert pads[1][0] < gaps[0] and pads[1][1] < gaps[1]  # padding stays inside the detector gaps
    rows = {k: [] for k in ("wave", "flux", "err", "bits", "source")}
    free = set(range(p.wave.size))
    flags = _flag(rng, free, BAD_BITS, 2) | _flag(rng, free, WARN_BITS, 2)
    zero_err = int(rng.choice(sorted(free)))
    for chip, (lo, hi) in zip(p.chips, pads):
        grid_pix = np.arange(p.index[chip[0]] - lo, p.index[chip[-1]] + hi + 1)
        source = np.full(grid_pix.size, -1)
        source[lo:lo + len(chip)] = chip
        real = source >= 0
        e = np.where(real, p.visit_err[0][np.maximum(source, 0)], 1e10)
        e[source == zero_err] = 0.0
        b = np.where(real, 0, 1 << BAD_BITS["BADPIX"]).astype(np.int16)
        for q, v in flags.items():
            b[source == q] = v
        rows["wave"].append(10.0 ** (LOGW0 + DLOGW * grid_pix))
        rows["flux"].append(np.where(real, p.visit_flux[0][np.maximum(source, 0)], 0.0))
        rows["err"].append(e)
        rows["bits"].append(b)
        rows["source"].append(source)
    # the Payne grid is the rest frame: the visit is written on it (no Doppler shift) to compare pixels
    arrays = {k: np.vstack(v[::-1])[:, ::-1] for k, v in rows.items()}  # red chip first, decreasing
    assert np.all(np.diff(arrays["wave"].reshape(-1)) < 0)
    ra, dec = _radec(VISITS_ID)
    mjd = int(p.visit_mjd[0])
    h = fits.Header()
    h["LOCID"], h["PLATE"], h["TELESCOP"], h["MJD5"], h["FIBERID"] = 4590, 8100, "apo25m", mjd, 229
    h["JD-MID"] = p.visit_mjd[0] + 2400000.5
    h["OBJID"], h["RA"], h["DEC"], h["SNR"] = VISITS_ID, ra, dec, float(p.visit_snr[0])
    _history(h, ["AP1DVISIT:  APOGEE Reduction Pipeline Version: r13", "AP1DVISIT:  HDU0 = Header only",
                 "AP1DVISIT:  HDU1 - Flux (10^-17 ergs/s/cm^2/Ang)", "AP1DVISIT:  HDU4 - Wavelength (Ang)"])
    hdus = [fits.PrimaryHDU(header=h)]
    for key, dtype, unit in (("flux", np.float32, FLUX_UNIT), ("err", np.float32, "Flux Error (10^-17 erg/s/cm^2/Ang)"),
                             ("bits", np.int16, "Flag Mask (bitwise)"), ("wave", np.float64, "Wavelength (Ang)")):
        hh = fits.Header()
        hh["CTYPE1"], hh["CTYPE2"], hh["BUNIT"] = "Pixel", "Chip", unit
        hdus.append(fits.ImageHDU(arrays[key].astype(dtype), header=hh))
    for unit, fill in (("Sky", 0.0), ("Sky Error", 0.0), ("Telluric", 1.0), ("Telluric Error", 0.0)):
        hdus.append(fits.ImageHDU(np.full(arrays["flux"].shape, fill, np.float32), header=fits.Header([("BUNIT", unit)])))
    hdus.append(fits.ImageHDU(np.zeros((3, 14)), header=fits.Header([("BUNIT", "Wavelength Coefficients")])))
    hdus.append(fits.ImageHDU(np.zeros((3, 26)), header=fits.Header([("BUNIT", "LSF Coefficients")])))
    path = out / f"apVisit-dr17-8100-{mjd}-229.fits"
    fits.HDUList(hdus).writeto(path)
    flat = {k: v.reshape(-1) for k, v in arrays.items()}
    order = np.argsort(flat["wave"])
    bad_v = (flat["source"] < 0) | (flat["err"] <= 0)
    bad_v |= (flat["bits"].astype(int) & sum(1 << b for b in BAD_BITS.values())) != 0
    files["apvisit"] = (path, {"format": "apogee_apvisit", "id": VISITS_ID, "wave": flat["wave"][order],
                               "flux": flat["flux"][order], "err": flat["err"][order], "bad": bad_v[order],
                               "source": flat["source"][order], "ra": ra, "dec": dec,
                               "snr": float(p.visit_snr[0]), "mjd": mjd})

    # aspcapStar of the combined star: normalised flux, 0 in the gaps (where the error is large, not 0)
    flux_a, err_a = _on_grid(p, p.flux, 0.0), _on_grid(p, p.err, 1e10)
    table = fits.BinTableHDU.from_columns([
        fits.Column("APOGEE_ID", "18A", array=[COMBINED_ID]), fits.Column("TELESCOPE", "8A", array=["apo25m"]),
        fits.Column("RA", "D", array=[ra1]), fits.Column("DEC", "D", array=[dec1]),
        fits.Column("SNR", "E", array=[np.median(p.flux / p.err)]),
        fits.Column("TEFF", "E", array=[4712.0]), fits.Column("LOGG", "E", array=[2.61]),
        fits.Column("M_H", "E", array=[-0.21]), fits.Column("ASPCAPFLAG", "K", array=[0]),
        fits.Column("FPARAM", "9E", array=[np.arange(9, dtype=np.float32)])])
    h = fits.Header()
    h["TELESCOP"] = "apo25m"
    hdus = [fits.PrimaryHDU(header=h),
            fits.ImageHDU(flux_a.astype(np.float32), header=_wcs_header(None, "")),
            fits.ImageHDU(err_a.astype(np.float32), header=_wcs_header(None, "")),
            fits.ImageHDU(np.where(flux_a > 0, flux_a * 0.99, 0).astype(np.float32), header=_wcs_header(None, "")),
            table]
    path = out / f"aspcapStar-dr17-{COMBINED_ID}.fits"
    fits.HDUList(hdus).writeto(path)
    files["aspcap"] = (path, {"format": "apogee_aspcapstar", "id": COMBINED_ID, "flux": flux_a, "err": err_a,
                              "bad": flux_a == 0, "ra": ra1, "dec": dec1, "snr": float(np.median(p.flux / p.err)),
                              "teff": 4712.0, "logg": 2.61, "m_h": -0.21})
    return files


KINDS = ["apstar2", "apstar1", "apvisit", "aspcap"]


def _read_one(path: Path):
    spectra = read_spectra(path)
    assert len(spectra) == 1
    return spectra[0]


@pytest.mark.parametrize("kind", KINDS)
def test_detected_by_layout_and_header_not_only_by_name(written, kind, tmp_path):
    path, want = written[kind]
    renamed = tmp_path / "spectrum.fits"
    shutil.copy(path, renamed)
    assert detect_format(path) == detect_format(renamed) == want["format"]
    assert _read_one(renamed).meta.source_format == want["format"]


def test_name_alone_marks_an_apogee_file_and_nothing_else_does(written, tmp_path):
    path, _ = written["apstar2"]
    with fits.open(path) as hdul:
        for key in ("TELESCOP", "OBJID", "HISTORY"):
            del hdul[0].header[key]
        hdul.writeto(tmp_path / f"apStar-dr17-{VISITS_ID}.fits")
        hdul.writeto(tmp_path / "plain.fits")
    assert detect_format(tmp_path / f"apStar-dr17-{VISITS_ID}.fits") == "apogee_apstar"
    with pytest.raises(SpectrumReadError, match="unknown layout"):
        detect_format(tmp_path / "plain.fits")


@pytest.mark.parametrize("kind", ["apstar2", "apstar1", "aspcap"])
def test_loglinear_files_read_on_the_apstar_grid(written, payne, kind):
    path, want = written[kind]
    s = _read_one(path)
    assert s.n_pixels == NWAVE and np.all(np.diff(s.wavelength) > 0)
    np.testing.assert_allclose(s.wavelength, payne.grid, rtol=1e-12)
    # vacuum: the kit's APOGEE pixels (vacuum wavelengths) land on their own wavelengths
    np.testing.assert_allclose(s.wavelength[payne.index], payne.wave, rtol=1e-9)
    np.testing.assert_array_equal(s.mask, want["bad"])
    good = ~want["bad"]
    np.testing.assert_array_equal(s.flux[good], want["flux"][good].astype(np.float32))
    np.testing.assert_allclose(s.ivar[good], 1.0 / want["err"][good].astype(np.float32).astype(np.float64) ** 2,
                               rtol=1e-6)
    assert np.all(s.ivar[s.mask] == 0) and np.all(s.flux[s.mask] == 0)
    assert s.meta.resolution == 22500.0


def test_apstar_combined_row_and_identity(written):
    for kind in ("apstar2", "apstar1"):
        path, want = written[kind]
        s = _read_one(path)
        assert s.meta.object_id == want["id"] and s.meta.extra["nvisits"] == want["nvisits"]
        assert identity_of(s.meta) == pytest.approx(
            {"designation": want["id"], "ra": want["ra"], "dec": want["dec"], "snr": want["snr"]})
        assert "normalised" not in s.meta.extra


def test_apvisit_chips_joined_in_increasing_wavelength(written, payne):
    path, want = written["apvisit"]
    s = _read_one(path)
    with fits.open(path) as hdul:
        assert hdul[1].data.shape[0] == 3
        assert s.n_pixels == hdul[1].data.size
    assert np.all(np.diff(s.wavelength) > 0)
    np.testing.assert_array_equal(s.wavelength, want["wave"])
    real = want["source"] >= 0
    np.testing.assert_allclose(s.wavelength[real], payne.wave[want["source"][real]], rtol=1e-9)
    # the chip gaps are absent: consecutive pixels of the spectrum are neighbours except across two gaps
    steps = np.diff(np.log10(s.wavelength)) / DLOGW
    assert np.sum(steps > 1.5) == 2 and np.allclose(steps[steps <= 1.5], 1.0)
    np.testing.assert_array_equal(s.mask, want["bad"])
    good = ~want["bad"]
    np.testing.assert_array_equal(s.flux[good], want["flux"][good].astype(np.float32))
    np.testing.assert_allclose(s.ivar[good], 1.0 / want["err"][good].astype(np.float32).astype(np.float64) ** 2,
                               rtol=1e-6)
    np.testing.assert_array_equal(s.flux[good], payne.visit_flux[0][want["source"][good]].astype(np.float32))
    assert s.meta.object_id == VISITS_ID
    assert identity_of(s.meta) == pytest.approx({"designation": VISITS_ID, "ra": want["ra"], "dec": want["dec"],
                                                 "snr": want["snr"], "mjd": want["mjd"]})


def test_aspcapstar_is_marked_normalised_and_carries_the_aspcap_row(written):
    path, want = written["aspcap"]
    s = _read_one(path)
    assert s.meta.extra["normalised"] is True
    assert s.meta.object_id == want["id"]  # from the ASPCAP table: the primary header has no id
    assert identity_of(s.meta) == pytest.approx(
        {"designation": want["id"], "ra": want["ra"], "dec": want["dec"], "snr": want["snr"]})
    assert {k: s.meta.extra[k] for k in ("teff", "logg", "m_h")} == pytest.approx(
        {k: want[k] for k in ("teff", "logg", "m_h")})
    # the gaps hold flux 0 with a positive error: masked by their zero flux
    assert np.all(want["err"][want["bad"]] > 0) and np.all(s.mask[want["bad"]])


@pytest.fixture(scope="module")
def shipped_spt():
    from specserve.runtime.defaults import SHIPPED
    from specserve.runtime.embedded.local import LocalRuntime

    runtime = LocalRuntime(SHIPPED)
    return runtime, runtime.models["spt"].card.preprocessing


@pytest.mark.parametrize("kind", KINDS)
def test_spt_coverage_accepts_the_apogee_files(written, shipped_spt, kind):
    from specserve.runtime.pipeline import MIN_COVERAGE, prepare_raw, span_coverage

    _, recipe = shipped_spt
    s = SpectrumInput.from_spectrum(_read_one(written[kind][0]))
    prepared = prepare_raw(recipe, [s])
    assert span_coverage(recipe, s) >= float(prepared.coverage[0]) >= MIN_COVERAGE


def test_spt_prepares_the_apstar_as_the_npz_it_was_written_from(written, shipped_spt, payne):
    """The one-visit apStar holds the kit's combined spectrum: on the model grid it must be the same
    input as the Payne npz read directly, except where the apStar flags pixels the npz does not."""
    from specserve.runtime.pipeline import prepare_raw

    _, recipe = shipped_spt
    apstar = SpectrumInput.from_spectrum(_read_one(written["apstar1"][0]))
    (npz,) = read_spectra(payne.folder / f"spectrum_combined_{COMBINED_ID}.npz")
    a, b = (prepare_raw(recipe, [s]) for s in (apstar, SpectrumInput.from_spectrum(npz)))
    # the model grid is the apStar grid from a later pixel: the apStar's flagged pixels stay single pixels
    offset = (recipe.grid.start - LOGW0) / DLOGW
    assert abs(offset - round(offset)) < 1e-6 and recipe.grid.step == pytest.approx(DLOGW)
    want = written["apstar1"][1]
    flagged = np.zeros(NWAVE, bool)
    flagged[payne.index] = want["bad"][payne.index]
    assert flagged.sum() > 0
    np.testing.assert_array_equal(a.mask[0] & ~b.mask[0], flagged[round(offset):round(offset) + recipe.grid.length])
    assert not np.any(b.mask[0] & ~a.mask[0])
    both = ~a.mask[0] & ~b.mask[0]
    assert both.sum() > 0.85 * recipe.grid.length
    # the same pixels, normalised by continua fitted without the flagged pixels in one of them
    np.testing.assert_allclose(a.flux[0][both], b.flux[0][both], rtol=0, atol=1e-3)


def test_spt_analyses_the_apogee_files_end_to_end(written, shipped_spt):
    runtime, _ = shipped_spt
    unreadable = []
    rows = runtime.analyze_files([written[k][0] for k in KINDS], models=["spt"],
                                 on_unreadable=lambda path, reason: unreadable.append((path, reason)))
    assert unreadable == [] and len(rows) == len(KINDS)
    for (file, row), kind in zip(rows, KINDS):
        assert file == str(written[kind][0]) and not row.error and row.notes == []
        assert row.models == ["spt:1"] and row.identity["designation"] == written[kind][1]["id"]
        assert {"age", "age_err", "mass", "mass_err"} <= set(row.values)
        assert all(np.isfinite(row.values[k]) for k in ("age", "mass"))
        assert row.values["age_err"] > 0 and row.values["mass_err"] > 0


# ------------------------------------------------------------------ bad APOGEE files


def _refused(path: Path, *reason_parts: str) -> None:
    with pytest.raises(SpectrumReadError) as info:
        read_spectra(path)
    assert str(path) in str(info.value)
    for part in reason_parts:
        assert part.lower() in info.value.reason.lower(), info.value.reason


@pytest.mark.filterwarnings("ignore:File may have been truncated")
@pytest.mark.parametrize("kind", KINDS)
def test_truncated_apogee_file(written, kind, tmp_path):
    data = written[kind][0].read_bytes()
    for cut in (len(data) // 2, len(data) - 2880, 5000):  # in the sky/telluric HDUs, the last HDU, HDU1
        path = tmp_path / f"{cut}-{written[kind][0].name}"
        path.write_bytes(data[:cut])
        _refused(path, "truncated")  # astropy opens what it can of a cut file: the reader must notice
        gz = path.with_name(path.name + ".gz")
        gz.write_bytes(gzip.compress(data[:cut]))
        _refused(gz, "truncated")


def test_apogee_file_in_no_apogee_layout(written, tmp_path):
    path, _ = written["apstar2"]
    with fits.open(path) as hdul:
        fits.HDUList(hdul[:2]).writeto(tmp_path / "apStar-dr17-short.fits")
        fits.HDUList([hdul[0], hdul[1], hdul[2], fits.ImageHDU(hdul[3].data[:, :100])]).writeto(
            tmp_path / "apStar-dr17-shapes.fits")
        nowcs = fits.HDUList([hdu.copy() for hdu in hdul])
        for hdu in nowcs[:4]:
            del hdu.header["CRVAL1"]
        nowcs.writeto(tmp_path / "apStar-dr17-nowcs.fits")
    _refused(tmp_path / "apStar-dr17-short.fits", "APOGEE file", "HDUs 1-3 must be")
    _refused(tmp_path / "apStar-dr17-shapes.fits", "APOGEE file", "shapes")
    _refused(tmp_path / "apStar-dr17-nowcs.fits", "APOGEE file", "no H-band log-linear wavelengths")


def test_apvisit_with_bad_wavelengths(written, tmp_path):
    path, _ = written["apvisit"]
    with fits.open(path) as hdul:
        hdul[4].data[1, 10] = np.nan
        hdul.writeto(tmp_path / "nan-wave.fits")
    with fits.open(path) as hdul:
        hdul[4].data[0] = hdul[4].data[1] + 1.0  # two chips on one wavelength range
        hdul.writeto(tmp_path / "overlap.fits")
    with fits.open(path) as hdul:
        hdul[4].data[2, 100], hdul[4].data[2, 101] = hdul[4].data[2, 101], hdul[4].data[2, 100]
        hdul.writeto(tmp_path / "unsorted.fits")
    _refused(tmp_path / "nan-wave.fits", "wavelength image", "not all finite")
    _refused(tmp_path / "overlap.fits", "overlap")
    _refused(tmp_path / "unsorted.fits", "chip 2", "not monotonic")


def test_apstar_without_a_usable_pixel(written, tmp_path):
    path, _ = written["apstar1"]
    with fits.open(path) as hdul:
        hdul[3].data[:] = 1 << BAD_BITS["SATPIX"]
        hdul.writeto(tmp_path / "apStar-dr17-saturated.fits")
    _refused(tmp_path / "apStar-dr17-saturated.fits", "no usable pixel")
