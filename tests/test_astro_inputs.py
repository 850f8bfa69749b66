"""specutils spectra, astropy Quantities and Tables as requests (``specserve.runtime.astro``).

A real LAMOST DR1 spectrum of the kit, rebuilt as a specutils ``Spectrum`` (in Angstrom, nm, micron,
GHz, eV and 1/cm; with each kind of uncertainty), as Quantity tuples and as Tables, must come out as
the Angstrom original: wavelengths ascending, flux, inverse variance, mask and redshift. Units that
are not wavelengths are refused by name; a real server answers a specutils spectrum in nm as it
answers the original; the client never imports specutils.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import astropy.units as u
import numpy as np
import pytest
from astropy.nddata import InverseVariance, StdDevUncertainty, VarianceUncertainty
from astropy.table import QTable, Table
from conftest import serving
from specutils import Spectrum

from specserve.runtime.astro import as_input, as_inputs, is_specutils_spectrum
from specserve.runtime.client import Client
from specserve.runtime.errors import InvalidSpectrumError
from specserve.runtime.io import read_spectra
from specserve.runtime.spectrum import SpectrumInput
from specserve.runtime.wire import spectrum_from_proto, to_proto

ROOT = Path(__file__).resolve().parents[1]
LAMOST = "lamost_dr1/fits/spec-55862-B6212_sp06-003.fits"
FLUX_UNIT = u.Unit("1e-17 erg / (s cm2 Angstrom)")


@pytest.fixture(scope="module")
def original(kit) -> SpectrumInput:
    """The kit spectrum in vacuum Angstrom, as a request without the reader's resolution (a
    specutils spectrum carries none)."""
    spectrum = read_spectra(kit / LAMOST)[0]
    assert spectrum.mask.any() and not spectrum.mask.all()  # the mask is exercised
    z = spectrum.meta.extra["z"]
    assert z != 0
    return SpectrumInput(spectrum.meta.object_id, spectrum.wavelength, spectrum.flux, spectrum.ivar,
                         spectrum.mask, float(z))


def _uncertainty(ivar: np.ndarray, kind: str, unit=None):
    """``ivar`` (in FLUX_UNIT^-2) as an astropy uncertainty of ``kind``, expressed in ``unit``
    (a flux unit; None: no unit of its own)."""
    scale = 1.0 if unit is None else FLUX_UNIT.to(unit)  # how many ``unit`` one FLUX_UNIT is
    with np.errstate(divide="ignore"):
        if kind == "std":
            values = 1 / np.sqrt(ivar) * scale
            return StdDevUncertainty(values if unit is None else values * unit)
        if kind == "var":
            values = 1 / ivar * scale ** 2
            return VarianceUncertainty(values if unit is None else values * unit ** 2)
    values = ivar / scale ** 2
    return InverseVariance(values if unit is None else values / unit ** 2)


def _specutils(s: SpectrumInput, unit=u.AA, kind: str = "ivar", redshift: float | None = None,
               uncertainty_unit=None, ascending: bool = True) -> Spectrum:
    """``s`` as a specutils spectrum whose spectral axis is in ``unit``, ascending in that unit
    (a frequency grid as it usually comes: wavelengths descending) or not (in wavelength order)."""
    axis = (s.wavelength * u.AA).to(unit, equivalencies=u.spectral())
    order = np.argsort(axis.value) if ascending else np.arange(axis.size)
    return Spectrum(flux=np.asarray(s.flux)[order] * FLUX_UNIT, spectral_axis=axis[order],
                    uncertainty=_uncertainty(np.asarray(s.ivar, dtype=np.float64)[order], kind, uncertainty_unit),
                    mask=np.asarray(s.mask)[order], redshift=s.redshift if redshift is None else redshift,
                    meta={"object_id": s.id})


def _same(converted: SpectrumInput, original: SpectrumInput, ivar_rtol: float = 1e-12) -> None:
    assert converted.id == original.id
    np.testing.assert_allclose(converted.wavelength, original.wavelength, rtol=1e-12, atol=0)
    assert np.all(np.diff(converted.wavelength) > 0)
    np.testing.assert_array_equal(converted.flux, original.flux)
    np.testing.assert_allclose(converted.ivar, original.ivar, rtol=ivar_rtol, atol=0)
    np.testing.assert_array_equal(np.asarray(converted.mask, dtype=bool), original.mask)


# ----------------------------------------------------------------------------------- specutils


@pytest.mark.parametrize("unit", [u.AA, u.nm, u.micron, u.GHz, u.eV, u.k], ids=str)
@pytest.mark.parametrize("ascending", [True, False], ids=["ascending-axis", "wavelength-order"])
def test_specutils_spectral_axis_in_any_unit_comes_back_in_angstrom(original, unit, ascending):
    spectrum = _specutils(original, unit, ascending=ascending)
    assert is_specutils_spectrum(spectrum)
    assert spectrum.spectral_axis.unit == unit
    reversed_ = unit.physical_type != "length" and ascending  # a frequency grid: wavelengths descending
    wave_as_given = spectrum.spectral_axis.to_value(u.AA, equivalencies=u.spectral())
    assert (np.diff(wave_as_given) < 0).all() == reversed_
    converted = as_input(spectrum)
    _same(converted, original)
    assert converted.redshift == pytest.approx(original.redshift, rel=1e-9)


@pytest.mark.parametrize("kind", ["std", "var", "ivar"])
@pytest.mark.parametrize("uncertainty_unit", [None, FLUX_UNIT, u.Unit("1e-20 erg / (s cm2 Angstrom)")],
                         ids=["none", "flux-unit", "other-unit"])
def test_specutils_uncertainties_become_ivar_in_the_flux_unit(original, kind, uncertainty_unit):
    converted = as_input(_specutils(original, u.nm, kind, uncertainty_unit=uncertainty_unit))
    bad = original.ivar == 0
    assert bad.any()
    assert np.all(converted.ivar[bad] == 0)  # sigma = inf, var = inf: unusable, not NaN
    _same(converted, original, ivar_rtol=1e-6)


def test_specutils_redshift_is_carried_and_zero_means_none(original):
    assert as_input(_specutils(original, u.nm, redshift=0.25)).redshift == pytest.approx(0.25)
    assert as_input(_specutils(original, u.nm, redshift=0.0)).redshift is None


def test_specutils_id_from_meta_or_argument(original):
    spectrum = _specutils(original, u.nm)
    assert as_input(spectrum).id == original.id
    assert as_input(spectrum, id="mine").id == "mine"
    assert as_input(("named", spectrum)).id == "named"


def test_specutils_2d_flux_is_refused_by_as_input_and_split_by_as_inputs(original):
    factors = np.array([1.0, 2.0, 3.0])
    flux = factors[:, None] * np.asarray(original.flux)[None, :]
    ivar = np.asarray(original.ivar, dtype=np.float64)[None, :] / factors[:, None] ** 2
    mask = np.stack([original.mask] * 3)
    axis = (original.wavelength * u.AA).to(u.GHz, equivalencies=u.spectral())[::-1]  # ascending GHz
    spectrum = Spectrum(flux=flux[:, ::-1] * FLUX_UNIT, spectral_axis=axis,
                        uncertainty=InverseVariance(ivar[:, ::-1]), mask=mask[:, ::-1])
    assert spectrum.spectral_axis_index == 1
    with pytest.raises(InvalidSpectrumError, match=r"3 spectra .*as_inputs"):
        as_input(spectrum)
    with pytest.raises(InvalidSpectrumError, match="3 spectra"):
        to_proto(spectrum)
    parts = as_inputs(spectrum, id="fibre")
    assert [p.id for p in parts] == ["fibre-0", "fibre-1", "fibre-2"]
    for factor, part in zip(factors, parts):
        np.testing.assert_allclose(part.wavelength, original.wavelength, rtol=1e-12)
        np.testing.assert_allclose(part.flux, factor * np.asarray(original.flux), rtol=1e-7)
        np.testing.assert_allclose(part.ivar, np.asarray(original.ivar) / factor ** 2, rtol=1e-6)
        np.testing.assert_array_equal(part.mask, original.mask)


def test_specutils_spectrum1d_of_older_versions_is_taken(original):
    import specutils

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated since specutils 2 in favour of Spectrum
        spectrum = specutils.Spectrum1D(flux=np.asarray(original.flux) * FLUX_UNIT,
                                        spectral_axis=original.wavelength / 1e4 * u.micron,
                                        uncertainty=InverseVariance(original.ivar), mask=original.mask,
                                        redshift=original.redshift, meta={"id": original.id})
    assert type(spectrum).__name__ == "Spectrum1D" and is_specutils_spectrum(spectrum)
    _same(as_input(spectrum), original, ivar_rtol=1e-7)


def test_specutils_velocity_axis_without_rest_value_is_refused(original):
    spectrum = Spectrum(flux=np.asarray(original.flux) * FLUX_UNIT,
                        spectral_axis=np.linspace(-100, 100, original.wavelength.size) * u.km / u.s)
    with pytest.raises(InvalidSpectrumError, match="km / s"):
        as_input(spectrum)


# ---------------------------------------------------------------------------- Quantities, Tables


def test_quantity_tuples_in_nm(original):
    wave_nm = (original.wavelength * u.AA).to(u.nm)
    ivar = np.asarray(original.ivar, dtype=np.float64)
    converted = as_input((wave_nm, np.asarray(original.flux) * FLUX_UNIT, ivar / FLUX_UNIT ** 2,
                          original.mask), id=original.id)
    _same(converted, original)
    # a leading id, plain arrays for flux and ivar
    _same(as_input((original.id, wave_nm, original.flux, original.ivar, original.mask)), original)
    # ivar in another unit (per (1e-20 ...)^2 = 1e-6 per FLUX_UNIT^2) is expressed in the flux's
    other = u.Unit("1e-20 erg / (s cm2 Angstrom)")
    converted = as_input((original.id, wave_nm, np.asarray(original.flux) * FLUX_UNIT, ivar * 1e-6 / other ** 2,
                          original.mask))
    _same(converted, original, ivar_rtol=1e-9)
    # an astropy uncertainty object in place of ivar
    converted = as_input((original.id, wave_nm, np.asarray(original.flux) * FLUX_UNIT,
                          _uncertainty(ivar, "std"), original.mask))
    _same(converted, original, ivar_rtol=1e-6)


def test_quantity_tuple_with_f_nu_uncertainty_for_f_lambda_flux():
    wave = np.linspace(4000.0, 5000.0, 11) * u.AA
    flux = np.ones(11) * u.Unit("erg / (s cm2 Angstrom)")
    sigma = np.full(11, 2.0) * u.Jy
    converted = as_input((wave.to(u.nm), flux, StdDevUncertainty(sigma)))
    sigma_flambda = sigma.to_value(flux.unit, equivalencies=u.spectral_density(wave))
    np.testing.assert_allclose(converted.ivar, 1 / sigma_flambda ** 2, rtol=1e-10)
    assert np.ptp(converted.ivar) > 0  # the conversion depends on the wavelength


def test_tables_in_nm_and_loglam(original):
    ivar = np.asarray(original.ivar, dtype=np.float64)
    wave_nm = original.wavelength / 10.0
    qtable = QTable({"Wavelength": wave_nm * u.nm, "flux": np.asarray(original.flux) * FLUX_UNIT,
                     "ivar": ivar / FLUX_UNIT ** 2, "mask": original.mask.astype(int)},
                    meta={"OBJECT": original.id, "z": original.redshift})
    converted = as_input(qtable)
    _same(converted, original)
    assert converted.redshift == pytest.approx(original.redshift)
    with np.errstate(divide="ignore"):
        sigma = 1 / np.sqrt(ivar)
    table = Table({"wave": wave_nm, "flux": original.flux, "error": sigma, "mask": original.mask},
                  meta={"id": original.id})
    table["wave"].unit = u.nm
    _same(as_input(table), original, ivar_rtol=1e-6)
    sdss_like = Table({"loglam": np.log10(original.wavelength), "flux": original.flux, "ivar": ivar,
                       "and_mask": original.mask.astype(np.int32) * 16})
    _same(as_input(sdss_like, id=original.id), original, ivar_rtol=1e-12)


def test_table_with_one_spectrum_per_row_is_split(original):
    n = original.wavelength.size
    table = QTable({"id": ["a", "b"], "wavelength": np.stack([original.wavelength / 10.0] * 2) * u.nm,
                    "flux": np.stack([original.flux, 2 * np.asarray(original.flux)]),
                    "z": [0.1, 0.0]})
    with pytest.raises(InvalidSpectrumError, match="2 spectra"):
        as_input(table)
    a, b = as_inputs(table)
    assert (a.id, b.id) == ("a", "b") and a.wavelength.size == n
    assert (a.redshift, b.redshift) == (pytest.approx(0.1), None)
    np.testing.assert_allclose(b.wavelength, original.wavelength, rtol=1e-12)
    np.testing.assert_allclose(b.flux, 2 * np.asarray(original.flux), rtol=1e-7)


# ------------------------------------------------------------------------------------ refusals


def test_a_wavelength_in_kg_is_refused_naming_the_unit(original):
    with pytest.raises(InvalidSpectrumError, match=r"wavelength in kg cannot be converted"):
        as_input((original.wavelength * u.kg, original.flux))
    table = QTable({"wavelength": original.wavelength * u.kg, "flux": original.flux})
    with pytest.raises(InvalidSpectrumError, match=r"in kg"):
        as_input(table)
    with pytest.raises(InvalidSpectrumError, match=r"in kg"):
        to_proto(("x", original.wavelength * u.kg, original.flux))


def test_a_unitless_quantity_is_refused_but_a_plain_array_is_angstrom(original):
    with pytest.raises(InvalidSpectrumError, match="unitless Quantity"):
        as_input((original.wavelength * u.dimensionless_unscaled, original.flux))
    plain = as_input(("x", original.wavelength, original.flux))
    np.testing.assert_array_equal(plain.wavelength, original.wavelength)


def test_an_uncertainty_in_a_unit_unrelated_to_the_flux_is_refused(original):
    with pytest.raises(InvalidSpectrumError, match=r"inverse variance in 1 / kg2 does not match the flux"):
        as_input((original.wavelength * u.AA, np.asarray(original.flux) * FLUX_UNIT,
                  np.asarray(original.ivar) / u.kg ** 2))


def test_an_unknown_object_is_refused():
    with pytest.raises(InvalidSpectrumError, match="cannot make a spectrum of a builtins.dict"):
        as_input({"flux": [1, 2, 3]})


# ----------------------------------------------------------------------------------- the wire


def test_to_proto_sends_a_specutils_spectrum_as_the_original(original):
    sent = spectrum_from_proto(to_proto(_specutils(original, u.micron, "std")))
    reference = spectrum_from_proto(to_proto(original))
    assert sent.id == reference.id and sent.redshift == pytest.approx(reference.redshift)
    np.testing.assert_allclose(sent.wavelength, reference.wavelength, rtol=1e-12)
    np.testing.assert_array_equal(sent.flux, reference.flux)
    np.testing.assert_allclose(sent.ivar, reference.ivar, rtol=1e-6)
    assert (sent.mask is None) == (reference.mask is None)


def test_to_proto_keeps_the_forms_it_took(original):
    as_tuple = to_proto((original.id, original.wavelength, original.flux, original.ivar, original.mask,
                         original.redshift))
    assert as_tuple == to_proto(original)
    message = to_proto(original)
    assert to_proto(message) is message


def test_importing_the_client_does_not_import_specutils():
    code = "import sys, specserve.runtime.client; print('specutils' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr


# ------------------------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def rbm_server(tmp_path_factory):
    """A real ``specserve serve`` on port 0 over the shipped RBM (deterministic: free energies)."""
    repo = tmp_path_factory.mktemp("astro-repo")
    shutil.copytree(ROOT / "runtime" / "models" / "rbm", repo / "rbm")
    with serving(repo) as address:
        yield address


def test_server_answers_a_specutils_spectrum_in_nm_as_the_original(rbm_server, kit):
    files = sorted((kit / "lamost_dr1/fits").glob("*.fits"))[:6]
    originals = []
    for path in files:
        s = read_spectra(path)[0]
        originals.append(SpectrumInput(s.meta.object_id, s.wavelength, s.flux, s.ivar, s.mask,
                                       float(s.meta.extra["z"])))
    in_nm = [_specutils(s, u.nm, "std") for s in originals]
    in_ghz = [(s.id, _specutils(s, u.GHz, "var")) for s in originals]
    with Client(rbm_server) as client:
        expected = client.analyze(originals, models=["rbm"])
        got = client.analyze(in_nm, models=["rbm"])
        streamed = list(client.stream(in_ghz, models=["rbm"], batch_size=4))
        with pytest.raises(InvalidSpectrumError, match="in kg"):
            client.analyze([(originals[0].wavelength * u.kg, originals[0].flux)], models=["rbm"])
    compared = 0
    for want, rows in zip(expected, zip(got, streamed)):
        for row in rows:
            assert row.id == want.id and row.ok and row.notes == want.notes
            assert row.values.keys() == want.values.keys()
            for key, value in want.values.items():
                assert row.values[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        compared += bool(want.values)
    assert compared >= 3  # most of them are covered and analysed, so values are compared


def test_stream_yields_the_rows_before_an_unconvertible_spectrum_then_raises(rbm_server, original):
    good = [(f"s{i}", _specutils(original, u.nm)) for i in range(5)]
    bad = ("bad", original.wavelength * u.kg, original.flux)
    with Client(rbm_server) as client:
        stream = client.stream(good[:3] + [bad] + good[3:], models=["rbm"], batch_size=2)
        rows = [next(stream) for _ in range(3)]
        with pytest.raises(InvalidSpectrumError, match="'bad'.*in kg"):
            next(stream)
    assert [r.id for r in rows] == ["s0", "s1", "s2"]
    assert all(r.ok and r.values for r in rows)
