"""Spectrum readers on the real data kit, users' own formats, and bad files."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from specserve.runtime.errors import SpectrumReadError
from specserve.runtime.io import detect_format, read_spectra
from specserve.runtime.preprocess import air_to_vacuum

DR1 = "lamost_dr1/fits/spec-55862-B6212_sp06-003.fits"
DR6_GZ = "lamost_dr6_formats/spec-57287-KP193637N444141V03_sp10-161.fits.gz"
DR6 = "lamost_dr6_formats/spec-58397-EG014118N254444M01_sp03-031.fits"
MRS = "lamost_dr6_formats/med-58408-TD230151N343645T01_sp01-015.fits"
MRS_GZ = "lamost_dr6_formats/med-58268-HIP95119KP01_sp12-076.fits.gz"


def _one(kit: Path, rel: str):
    spectra = read_spectra(kit / rel)
    assert len(spectra) == 1
    return spectra[0]


def _sane(spectrum, lo: float, hi: float) -> None:
    w = spectrum.wavelength
    assert w.dtype == np.float64 and np.all(np.diff(w) > 0)
    assert lo <= w[0] < w[-1] <= hi
    assert np.all(np.isfinite(spectrum.flux)) and np.all(np.isfinite(spectrum.ivar))
    assert np.all(spectrum.ivar >= 0)
    assert np.all(spectrum.ivar[spectrum.mask] == 0) and np.all(spectrum.flux[spectrum.mask] == 0)
    assert spectrum.n_good > 0.5 * spectrum.n_pixels


def test_lamost_dr1(kit):
    s = _one(kit, DR1)
    assert s.meta.source_format == "lamost_lrs_dr1"
    assert s.n_pixels == 3904
    assert s.wavelength[0] == pytest.approx(10**3.5682, rel=1e-9)
    assert s.wavelength[-1] == pytest.approx(10 ** (3.5682 + 3903e-4), rel=1e-9)
    assert (s.meta.survey_class, s.meta.survey_subclass) == ("STAR", "F9")
    assert s.meta.ra == pytest.approx(99.316263) and s.meta.dec == pytest.approx(27.23237)
    assert s.meta.extra["z"] == pytest.approx(-7.138e-05)
    assert s.meta.extra["snr_g"] == pytest.approx(71.41)
    assert s.meta.resolution == 1800.0
    _sane(s, 3690, 9100)
    raw = fits.getdata(kit / DR1)
    good = ~s.mask
    np.testing.assert_array_equal(s.flux[good], raw[0][good].astype(np.float32))
    np.testing.assert_array_equal(s.ivar[good], raw[1][good].astype(np.float32))


@pytest.mark.parametrize("rel, obsid, subclass, fmt", [
    (DR6_GZ, 359910161, "F5", "lamost_lrs_image"),
    (DR6, 677503031, "G3", "lamost_lrs_image"),
])
def test_lamost_dr6_lrs(kit, rel, obsid, subclass, fmt):
    s = _one(kit, rel)
    assert s.meta.source_format == fmt == detect_format(kit / rel)
    assert s.meta.extra["obsid"] == obsid and s.meta.object_id == str(obsid)
    assert (s.meta.survey_class, s.meta.survey_subclass) == ("STAR", subclass)
    assert s.n_pixels == 3909
    assert s.wavelength[0] == pytest.approx(3699.9863, abs=1e-3)
    _sane(s, 3690, 9100)


@pytest.mark.parametrize("rel, obsid", [(MRS, 681001015), (MRS_GZ, 666212076)])
def test_lamost_mrs_arms(kit, rel, obsid):
    spectra = read_spectra(kit / rel)
    assert [s.meta.extra["arm"] for s in spectra] == ["B", "R"]
    blue, red = spectra
    assert blue.meta.object_id == f"{obsid}:B" and red.meta.extra["obsid"] == obsid
    assert 4850 < blue.wavelength[0] < blue.wavelength[-1] < 5400
    assert 6250 < red.wavelength[0] < red.wavelength[-1] < 6900
    for s in spectra:
        _sane(s, 4800, 6900)
        assert s.meta.resolution == 7500.0


def test_lamost_lrs_table_layout_matches_image(kit, tmp_path):
    """DR8+ files store the same arrays as one-row array columns of a binary table."""
    image = _one(kit, DR6)
    data = fits.getdata(kit / DR6)
    header = fits.getheader(kit / DR6)
    n = data.shape[1]
    cols = [fits.Column(name=name, format=f"{n}E", array=data[i][None, :])
            for i, name in enumerate(("FLUX", "IVAR", "WAVELENGTH", "ANDMASK", "ORMASK"))]
    primary = fits.PrimaryHDU(header=fits.Header([c for c in header.cards if c.keyword in ("OBSID", "CLASS", "SUBCLASS", "RA", "DEC")]))
    path = tmp_path / "spec-table.fits"
    fits.HDUList([primary, fits.BinTableHDU.from_columns(cols, name="COADD")]).writeto(path)
    table = _one(tmp_path, path.name)
    assert table.meta.source_format == "lamost_lrs_table"
    assert table.meta.extra["obsid"] == 677503031 and table.meta.survey_subclass == "G3"
    np.testing.assert_allclose(table.wavelength, image.wavelength, rtol=1e-7)
    np.testing.assert_array_equal(table.flux, image.flux)
    np.testing.assert_array_equal(table.mask, image.mask)


@pytest.mark.parametrize("name, cls, subclass, lo, hi", [
    ("spec-0618-52049-0372.fits", "STAR", "M1", 3800, 9220),
    ("spec-3764-55514-0972.fits", "STAR", "M6III (148783)", 3590, 10360),
    ("spec-7454-56751-0770.fits", "STAR", "K0V (10780)", 3600, 10370),
])
def test_sdss_spec(kit, name, cls, subclass, lo, hi):
    s = _one(kit, f"sdss_dr12/{name}")
    assert s.meta.source_format == "sdss_spec"
    assert (s.meta.survey_class, s.meta.survey_subclass) == (cls, subclass)
    plate, mjd, fiber = (int(x) for x in name[5:-5].split("-"))
    assert (s.meta.extra["plate"], s.meta.extra["mjd"], s.meta.extra["fiber_id"]) == (plate, mjd, fiber)
    assert s.wavelength[0] == pytest.approx(lo, abs=15) and s.wavelength[-1] == pytest.approx(hi, abs=15)
    assert s.meta.ra is not None and 0 <= s.meta.ra < 360
    _sane(s, 3500, 10500)


def test_miles_air_to_vacuum(kit):
    s = _one(kit, "miles/fits/MILES_res2.50_star_m0001V.fits")
    assert s.meta.source_format == "miles_1d"
    assert s.meta.object_id == "MILES_res2.50_star_m0001V"
    assert s.n_pixels == 4300
    air = 3540.5 + 0.9 * np.arange(4300)
    np.testing.assert_allclose(s.wavelength, air_to_vacuum(air), rtol=1e-12)
    assert 0.9 < s.wavelength[0] - 3540.5 < 1.1  # air -> vacuum shifts by ~1 A at 3500 A
    assert s.meta.fwhm == 2.5 and s.meta.ivar_estimated
    _sane(s, 3540, 7415)


def test_stelib_header_labels_and_padding(kit):
    s = _one(kit, "stelib/STELIB_v3.2_HD002857.fits")
    assert s.meta.source_format == "stelib_1d"
    assert s.meta.object_id == "HD002857" and s.meta.survey_subclass == "A2"
    assert s.meta.extra["teff"] == 7611 and s.meta.extra["logg"] == pytest.approx(2.67)
    raw = fits.getdata(kit / "stelib/STELIB_v3.2_HD002857.fits")
    np.testing.assert_array_equal(s.mask, raw == 0)  # zero padding is not data
    _sane(s, 3190, 9920)


def test_boss_template(kit):
    s = _one(kit, "sdss_boss_templates/A4_-1.0_Dwarf.fits")
    assert s.meta.source_format == "boss_template"
    assert s.meta.survey_subclass == "A4" and s.meta.object_id == "A4_-1.0_Dwarf"
    assert not s.meta.ivar_estimated
    _sane(s, 3640, 10210)


def test_sdss_eigen_templates(kit):
    stars = read_spectra(kit / "sdss_templates/spEigenStar-55734.fits")
    assert len(stars) == 123
    assert stars[0].meta.object_id == "A0 (19510)" and stars[-1].meta.object_id == "WDmagnetic"
    assert stars[0].wavelength[0] == pytest.approx(10**3.4842)
    cvs = read_spectra(kit / "sdss_templates/spEigenCVstar-55734.fits")
    assert len(cvs) == 3 and cvs[0].meta.survey_class == "STAR_CV"
    for s in stars[:5] + cvs:
        assert s.meta.source_format == "sdss_eigen"
        _sane(s, 3000, 12000)


@pytest.mark.parametrize("name, n, lo, hi", [
    ("rrtemplate-QSO-LOZ-v1.1.fits", 4, 1329.0, 9634.0),
    ("rrtemplate-STAR-CV-v0.1.fits", 3, 3000.0, 11000.0),
])
def test_redrock_templates(kit, name, n, lo, hi):
    spectra = read_spectra(kit / "redrock_templates" / name)
    assert len(spectra) == n
    for s in spectra:
        assert s.meta.source_format == "redrock_template"
        assert s.wavelength[0] == pytest.approx(lo, abs=0.5) and s.wavelength[-1] == pytest.approx(hi, abs=0.5)
        assert np.all(np.isfinite(s.flux))


def test_payne_apogee_npz(kit):
    one = read_spectra(kit / "payne_kurucz/spectrum_combined_2M13012770+5754582.npz")
    visits = read_spectra(kit / "payne_kurucz/visit_spectra_2M06133561+2433362.npz")
    assert len(one) == 1 and len(visits) == 3
    for s in one + visits:
        assert s.meta.source_format == "payne_apogee_npz" and s.n_pixels == 7214
        _sane(s, 15100, 17000)


def test_wave_flux_table(kit):
    s = _one(kit, "lamost_dr6_formats/FERRE_sun_5750_4.50.fits")
    assert s.meta.source_format == "wave_flux_table" and s.meta.ivar_estimated
    _sane(s, 2980, 10020)


def test_user_npz_2d_and_errors(tmp_path):
    wave = np.linspace(4000, 5000, 200)
    flux = np.vstack([np.ones(200), 2 * np.ones(200)])
    error = np.full((2, 200), 0.1)
    np.savez(tmp_path / "mine.npz", wavelength=wave, flux=flux, error=error, id=np.array(["a", "b"]))
    spectra = read_spectra(tmp_path / "mine.npz")
    assert [s.meta.object_id for s in spectra] == ["a", "b"]
    np.testing.assert_allclose(spectra[1].flux, 2.0)
    np.testing.assert_allclose(spectra[0].ivar, 100.0, rtol=1e-5)


def test_user_csv_with_ivar_and_error(tmp_path):
    wave = np.linspace(4000, 5000, 50)
    (tmp_path / "ivar.csv").write_text(
        "# my star\nwavelength,flux,ivar\n" + "".join(f"{w},{1.5},{4.0}\n" for w in wave))
    (tmp_path / "err.csv").write_text("Wavelength, Flux, Error\n" + "".join(f"{w},{2.0},{0.5}\n" for w in wave))
    a, = read_spectra(tmp_path / "ivar.csv")
    b, = read_spectra(tmp_path / "err.csv")
    np.testing.assert_allclose(a.wavelength, wave)
    np.testing.assert_allclose(a.ivar, 4.0)
    np.testing.assert_allclose(b.ivar, 4.0)
    assert a.meta.source_format == "csv" and not a.meta.ivar_estimated


# ------------------------------------------------------------------ bad files


def _bad(path: Path, reason_part: str) -> None:
    with pytest.raises(SpectrumReadError) as info:
        read_spectra(path)
    assert str(path) in str(info.value)
    assert reason_part.lower() in info.value.reason.lower()


def test_truncated_fits(kit, tmp_path):
    data = (kit / DR1).read_bytes()
    (tmp_path / "trunc.fits").write_bytes(data[:20000])
    (tmp_path / "trunc_header.fits").write_bytes(data[:1000])
    _bad(tmp_path / "trunc.fits", "cannot read")
    _bad(tmp_path / "trunc_header.fits", "cannot read")


def test_truncated_gzip(kit, tmp_path):
    data = (kit / DR6_GZ).read_bytes()
    (tmp_path / "trunc.fits.gz").write_bytes(data[: len(data) // 2])
    _bad(tmp_path / "trunc.fits.gz", "cannot read")


def test_empty_and_missing(tmp_path):
    (tmp_path / "empty.fits").write_bytes(b"")
    _bad(tmp_path / "empty.fits", "empty")
    _bad(tmp_path / "nothere.fits", "no such file")
    (tmp_path / "notes.txt").write_text("hello")
    _bad(tmp_path / "notes.txt", "not a FITS")
    (tmp_path / "fake.fits").write_text("hello, not FITS at all")
    _bad(tmp_path / "fake.fits", "cannot read")


def test_wrong_hdu_layouts(kit, tmp_path):
    fits.PrimaryHDU().writeto(tmp_path / "nodata.fits")
    _bad(tmp_path / "nodata.fits", "no data")
    _bad(kit / "seismic/miglio2021_kepler_apogee.fits", "catalogue")
    fits.PrimaryHDU(np.zeros((4, 5, 6), dtype=np.float32)).writeto(tmp_path / "cube.fits")
    _bad(tmp_path / "cube.fits", "unknown layout")


def test_all_nan_flux(kit, tmp_path):
    with fits.open(kit / DR1) as hdul:
        hdul[0].data[0, :] = np.nan
        hdul.writeto(tmp_path / "nan.fits")
    _bad(tmp_path / "nan.fits", "no usable pixel")
    with open(tmp_path / "nan.fits", "rb") as src, gzip.open(tmp_path / "nan.fits.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    _bad(tmp_path / "nan.fits.gz", "no usable pixel")


def test_bad_user_files(tmp_path):
    np.savez(tmp_path / "nokeys.npz", x=np.ones(3))
    _bad(tmp_path / "nokeys.npz", "wavelength")
    (tmp_path / "nohead.csv").write_text("1,2\n3,4\n")
    _bad(tmp_path / "nohead.csv", "header")
    (tmp_path / "text.csv").write_text("wavelength,flux\n4000,abc\n")
    _bad(tmp_path / "text.csv", "non-numeric")
    (tmp_path / "unsorted.csv").write_text("wavelength,flux\n4001,1\n4000,1\n4002,1\n")
    _bad(tmp_path / "unsorted.csv", "increasing")
    np.savez(tmp_path / "mismatch.npz", wavelength=np.arange(10.0) + 4000, flux=np.ones(9))
    _bad(tmp_path / "mismatch.npz", "pixels")
