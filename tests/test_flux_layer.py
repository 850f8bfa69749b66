"""The radiative flux layer against analytic cases: Planck, an isothermal slab, a semi-infinite
atmosphere with a linear source function (Eddington-Barbier), positivity, limb darkening, the
quadrature, broadening."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from astropy import units as u
from astropy.modeling.physical_models import BlackBody

from specserve.training.physformer import flux_layer as fl

torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("temperature", [2500.0, 5778.0, 12000.0, 40000.0])
def test_planck_matches_astropy_in_float32(temperature):
    wave = torch.linspace(0.37, 0.74, 50)
    got = fl.planck(wave, torch.tensor(temperature)).numpy()
    bb = BlackBody(temperature=temperature * u.K, scale=1.0 * u.W / (u.m**2 * u.um * u.sr))
    want = bb(wave.numpy().astype(np.float64) * u.um).to_value(u.W / (u.m**2 * u.um * u.sr))
    np.testing.assert_allclose(got, want, rtol=2e-5)


def test_planck_never_overflows():
    wave = torch.tensor([0.1, 0.37, 5.0])
    for t in (100.0, 1000.0, 1e6):
        b = fl.planck(wave, torch.tensor(t))
        assert torch.all(torch.isfinite(b)) and torch.all(b >= 0)
    assert float(fl.planck(torch.tensor(0.37), torch.tensor(150.0))) == 0.0  # exp(-x) underflows to 0


def test_gauss_legendre_integrates_polynomials_on_the_unit_interval():
    mu, w = fl.gauss_legendre(4, torch.float64)
    assert float(w.sum()) == pytest.approx(1.0)
    for k in range(8):  # exact up to degree 2n - 1
        assert float((w * mu**k).sum()) == pytest.approx(1.0 / (k + 1), rel=1e-12)
    with pytest.raises(ValueError):
        fl.gauss_legendre(0)


def test_isothermal_slab():
    # I(mu) = B (1 - exp(-tau / mu)), whatever the layering of the slab
    b, total = 3.0, 0.7
    dtau = torch.tensor([0.1, 0.25, 0.05, 0.3], dtype=torch.float64).reshape(4, 1)
    source = torch.full((4, 1), b, dtype=torch.float64)
    mu = torch.tensor([0.05, 0.3, 0.77, 1.0], dtype=torch.float64)
    intensity = fl.emergent_intensity(source, fl.optical_depth(dtau), mu)[:, 0]
    np.testing.assert_allclose(intensity.numpy(), b * (1 - np.exp(-total / mu.numpy())), rtol=1e-12)
    # optically thick: the slab radiates B; optically thin: I ~ B tau / mu
    thick = fl.emergent_intensity(source, fl.optical_depth(dtau * 100), mu)[:, 0]
    np.testing.assert_allclose(thick.numpy(), b, rtol=1e-12)
    thin = fl.emergent_intensity(source, fl.optical_depth(dtau * 1e-4), torch.tensor([1.0], dtype=torch.float64))
    assert float(thin) == pytest.approx(b * total * 1e-4, rel=1e-4)


def _linear_atmosphere(a: float, b: float, tau_max: float = 60.0, layers: int = 4000):
    edges = torch.cat([torch.zeros(1, dtype=torch.float64),
                       torch.logspace(-5, math.log10(tau_max), layers, dtype=torch.float64)])
    mid = 0.5 * (edges[1:] + edges[:-1])
    source = (a + b * mid).reshape(-1, 1)
    return source, edges[1:].reshape(-1, 1), torch.tensor([a + b * tau_max], dtype=torch.float64)


def test_semi_infinite_linear_source_function_eddington_barbier():
    a, b = 1.0, 1.5
    source, tau, bottom = _linear_atmosphere(a, b)
    mu = torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)
    intensity = fl.emergent_intensity(source, tau, mu, bottom)[:, 0]
    np.testing.assert_allclose(intensity.numpy(), a + b * mu.numpy(), rtol=1e-5)  # I(mu) = S(tau = mu)
    nodes, weights = fl.gauss_legendre(4, torch.float64)
    f = fl.flux(source, tau, nodes, weights, bottom)
    assert float(f) == pytest.approx(math.pi * (a + 2 * b / 3), rel=1e-5)


def test_flux_is_positive_for_any_atmosphere():
    g = torch.Generator().manual_seed(0)
    wave = torch.linspace(0.37, 0.74, 300)
    temperature = torch.sort(3000 + 20000 * torch.rand(8, 16, generator=g), dim=1).values
    dtau_line = torch.rand(8, 16, 300, generator=g) ** 4 * 50
    dtau_cont = torch.rand(8, 16, 1, generator=g) * 2
    mu, w = fl.gauss_legendre(4)
    source = fl.planck(wave, temperature.unsqueeze(-1))
    f = fl.flux(source, fl.optical_depth(dtau_line + dtau_cont), mu, w, source[..., -1, :])
    assert torch.all(f > 0) and torch.all(torch.isfinite(f))
    spec = fl.normalised_spectrum(wave, temperature, dtau_line, dtau_cont, mu, w)
    assert torch.all(spec > 0) and torch.all(torch.isfinite(spec))


@pytest.mark.parametrize("grey", [False, True])
def test_thermalised_flux_is_the_formal_solution_summed_by_parts(grey):
    """The flux the model uses (summed by parts, the bottom lit by the deepest layer) equals the
    direct formal solution to float64 rounding, for per-pixel and grey opacities alike."""
    g = torch.Generator().manual_seed(2)
    wave = torch.linspace(0.37, 0.74, 250, dtype=torch.float64)
    temperature = torch.sort(3000 + 20000 * torch.rand(5, 12, generator=g, dtype=torch.float64), dim=1).values
    dtau = torch.rand(5, 12, 1 if grey else 250, generator=g, dtype=torch.float64) ** 3 * 10
    mu, w = fl.gauss_legendre(6, torch.float64)
    source = fl.planck(wave, temperature.unsqueeze(-1))
    tau = fl.optical_depth(dtau)
    direct = fl.flux(source, tau.expand_as(source), mu, w, source[..., -1, :])
    by_parts = fl.thermalised_flux(source, tau, mu, w)
    assert by_parts.shape == direct.shape
    assert float(((by_parts - direct).abs() / direct.abs()).max()) < 1e-12


def test_limb_darkening_when_temperature_rises_with_depth():
    wave = torch.tensor([0.5])
    temperature = torch.linspace(4500, 9000, 32)
    dtau = torch.full((32, 1), 0.2)
    source = fl.planck(wave, temperature.unsqueeze(-1))
    mu = torch.linspace(0.05, 1.0, 12)
    intensity = fl.emergent_intensity(source, fl.optical_depth(dtau), mu, source[-1])[:, 0]
    assert torch.all(intensity[1:] > intensity[:-1])  # darker towards the limb (small mu)
    # and brighter towards the limb when the temperature falls with depth
    source_inv = fl.planck(wave, temperature.flip(0).unsqueeze(-1))
    inverted = fl.emergent_intensity(source_inv, fl.optical_depth(dtau), mu, source_inv[-1])[:, 0]
    assert torch.all(inverted[1:] < inverted[:-1])


def test_absorption_lines_need_temperature_falling_outwards():
    wave = torch.linspace(0.5, 0.51, 41)
    line = torch.exp(-0.5 * ((wave - 0.505) / 0.0005) ** 2) * 20
    temperature = torch.linspace(4000, 9000, 24).unsqueeze(0)
    dtau_line = (line * torch.full((24, 1), 0.05)).unsqueeze(0)
    dtau_cont = torch.full((1, 24, 1), 0.15)
    mu, w = fl.gauss_legendre(4)
    spec = fl.normalised_spectrum(wave, temperature, dtau_line, dtau_cont, mu, w)[0]
    assert float(spec[20]) < 0.8 and float(spec[0]) == pytest.approx(1.0, abs=1e-3)
    emission = fl.normalised_spectrum(wave, temperature.flip(1), dtau_line, dtau_cont, mu, w)[0]
    assert float(emission[20]) > 1.2  # a temperature inversion makes the line an emission line


def test_quadrature_error_falls_with_nodes():
    g = torch.Generator().manual_seed(1)
    wave = torch.linspace(0.37, 0.74, 200)
    temperature = torch.sort(3500 + 8000 * torch.rand(4, 16, generator=g), dim=1).values
    dtau_line = torch.rand(4, 16, 200, generator=g) ** 3 * 5
    dtau_cont = torch.rand(4, 16, 1, generator=g) * 0.5
    errors = [fl.quadrature_error(wave, temperature, dtau_line, dtau_cont, n) for n in (1, 2, 4, 6, 8)]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    # on these harsh random atmospheres (measured: 1.2e-3 with 4 nodes, 1.7e-4 with 6, against 64)
    assert errors[2] < 2e-3 and errors[3] < 3e-4


def test_broadening_keeps_the_continuum_and_the_line_area():
    fwhm = fl.broadening_fwhm_pixels(1800, 1e-4)
    assert fwhm == pytest.approx(2.413, abs=1e-3)
    kernel = fl.gaussian_kernel(fwhm)
    assert kernel.numel() % 2 == 1 and float(kernel.sum()) == pytest.approx(1.0, abs=1e-6)
    spec = torch.ones(2, 101)
    spec[:, 50] = 0.0
    out = fl.broaden(spec, kernel)
    assert float(out[0, 0]) == pytest.approx(1.0) and float(out[0, 50]) > 0.5
    assert float((1 - out[0]).sum()) == pytest.approx(1.0, abs=1e-5)  # equivalent width conserved
