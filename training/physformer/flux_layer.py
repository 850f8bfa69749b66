"""The radiative flux layer of PhysFormer (Wang, Zhang, Bu & Mou 2026, arXiv:2603.01459).

Pure tensor functions, batched over spectra (B), depth layers (D), pixels (P) and angles (K);
every operation is a standard ONNX operator (Exp, Div, CumSum, Mul, ReduceSum, Conv), so the layer
exports inside the graph.

A plane-parallel atmosphere is ``D`` homogeneous layers, top (index 0) to bottom. Layer ``d`` has
optical thickness ``dtau_d = kappa_d * ds_d >= 0`` (the network predicts the product directly), so
the optical depth at its lower boundary is ``tau_d = sum_{j <= d} dtau_j`` (``tau_{-1} = 0`` at the
surface), and a temperature ``T_d`` whose source function is the Planck function
``S_d = B_lambda(T_d)`` (LTE). The formal solution for the emergent intensity at direction cosine
``mu`` with a source function constant in each layer is exact for that atmosphere:

    I(mu) = sum_d S_d (exp(-tau_{d-1}/mu) - exp(-tau_d/mu)) + I_bottom exp(-tau_{D-1}/mu)

with ``I_bottom`` the intensity entering from below (``B_lambda(T_bottom)`` for a thermalised
deep boundary, 0 for a slab lit by nothing). The emergent flux is

    F = 2 pi sum_k w_k mu_k I(mu_k)

with Gauss-Legendre nodes ``mu_k`` and weights ``w_k`` on [0, 1]. The normalised spectrum is the
flux with line plus continuum opacity divided by the flux of the same atmosphere with continuum
opacity only, then convolved with a Gaussian of the grid's resolving power.

Planck function: ``B_lambda = C1 / lambda^5 / (exp(x) - 1)`` with ``x = C2 / (lambda T)``, lambda
in micron, ``C1 = 2 h c^2 = 1.191042972e8 W um^4 m^-2 sr^-1``, ``C2 = h c / k = 14387.7688 um K``,
so B is in W m^-2 um^-1 sr^-1. ``1 / (exp(x) - 1)`` is computed as ``exp(-x) / (1 - exp(-x))``:
no overflow in float32 at any x > 0 (cool layers, blue pixels give exp(-x) -> 0, B -> 0).

Cost per spectrum: ``P * (D - 1) * K`` exponentials for the line flux and ``(D - 1) * K`` for a grey
continuum (:func:`thermalised_flux` sums the formal solution by parts, so the bottom layer's
transmission cancels and the K directions are reduced before the depth sum).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

C1 = 1.191042972e8
"""2 h c^2 in W um^4 m^-2 sr^-1."""
C2 = 14387.7688
"""h c / k in um K."""


def planck(wavelength_um: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """B_lambda(T) in W m^-2 um^-1 sr^-1; broadcasts ``wavelength_um`` (.., P) against ``temperature``."""
    x = C2 / (wavelength_um * temperature)
    e = torch.exp(-x)
    return C1 / wavelength_um**5 * e / (1.0 - e)


@lru_cache(maxsize=16)
def _gauss_legendre(n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x, w = np.polynomial.legendre.leggauss(n)
    return tuple((0.5 * (x + 1.0)).tolist()), tuple((0.5 * w).tolist())


def gauss_legendre(n: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` Gauss-Legendre nodes and weights on [0, 1] (the weights sum to 1)."""
    if n < 1:
        raise ValueError(f"need at least one quadrature node, got {n}")
    mu, w = _gauss_legendre(int(n))
    return torch.tensor(mu, dtype=dtype), torch.tensor(w, dtype=dtype)


def optical_depth(dtau: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """Optical depth at each layer's lower boundary: cumulative sum of ``dtau`` over ``dim`` (depth)."""
    return torch.cumsum(dtau, dim=dim)


def emergent_intensity(source: torch.Tensor, tau: torch.Tensor, mu: torch.Tensor,
                       bottom: torch.Tensor | None = None) -> torch.Tensor:
    """Formal solution (module docstring).

    ``source`` and ``tau``: (..., D, P); ``mu``: (K,); ``bottom``: (..., P) or None (no light from
    below). Returns I: (..., K, P).
    """
    m = mu.reshape(-1, 1, 1)                                         # (K, 1, 1)
    transmitted_lower = torch.exp(-tau.unsqueeze(-3) / m)            # (..., K, D, P)
    transmitted_upper = torch.cat([torch.ones_like(transmitted_lower[..., :1, :]),
                                   transmitted_lower[..., :-1, :]], dim=-2)  # exp(-tau_{d-1}/mu), tau_{-1} = 0
    intensity = (source.unsqueeze(-3) * (transmitted_upper - transmitted_lower)).sum(dim=-2)  # (..., K, P)
    if bottom is not None:
        intensity = intensity + bottom.unsqueeze(-2) * transmitted_lower[..., -1, :]
    return intensity


def flux(source: torch.Tensor, tau: torch.Tensor, mu: torch.Tensor, weights: torch.Tensor,
         bottom: torch.Tensor | None = None) -> torch.Tensor:
    """Emergent flux ``2 pi sum_k w_k mu_k I(mu_k)``: (..., P)."""
    intensity = emergent_intensity(source, tau, mu, bottom)          # (..., K, P)
    return 2.0 * math.pi * ((weights * mu).reshape(-1, 1) * intensity).sum(dim=-2)


def gaussian_kernel(fwhm_pixels: float, half_width: int | None = None) -> torch.Tensor:
    """A normalised Gaussian of ``fwhm_pixels`` FWHM sampled on integer pixels (odd length)."""
    sigma = fwhm_pixels / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    half = int(math.ceil(4 * sigma)) if half_width is None else half_width
    x = torch.arange(-half, half + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).to(torch.float32)


def broadening_fwhm_pixels(resolution: float, log10_step: float) -> float:
    """FWHM in pixels of a resolving power ``lambda / dlambda = resolution`` on a log10-linear grid."""
    return 1.0 / (resolution * math.log(10.0) * log10_step)


def broaden(spectrum: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Convolve (B, P) with a symmetric kernel; the edges are padded with the edge values."""
    half = kernel.numel() // 2
    x = F.pad(spectrum.unsqueeze(1), (half, half), mode="replicate")
    return F.conv1d(x, kernel.reshape(1, 1, -1)).squeeze(1)


def transmission_moment(tau: torch.Tensor, mu: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``G(tau) = sum_k w_k mu_k exp(-tau / mu_k)``, elementwise (same shape as ``tau``).

    One Exp per node on ``tau`` itself, accumulated: the (K, ..) stack of transmissions is never
    built (in the exported graph: K Mul-Exp-Mul-Add chains instead of a 4-D Exp and a ReduceSum)."""
    total = None
    for k in range(mu.numel()):
        term = torch.exp(tau * (-1.0 / mu[k])) * (weights[k] * mu[k])
        total = term if total is None else total + term
    return total


def thermalised_flux(source: torch.Tensor, tau: torch.Tensor, mu: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """:func:`flux` with the deepest layer's source lighting the atmosphere from below
    (``bottom = source[..., -1, :]``), summed by parts: (..., P).

    With ``T_d = exp(-tau_d / mu)`` and ``T_{-1} = 1``, the formal solution
    ``sum_d S_d (T_{d-1} - T_d) + S_{D-1} T_{D-1}`` equals ``S_0 + sum_{d < D-1} (S_{d+1} - S_d) T_d``
    exactly, so the flux is ``2 pi (S_0 sum_k w_k mu_k + sum_{d < D-1} (S_{d+1} - S_d) G(tau_d))``
    (:func:`transmission_moment`). ``tau`` may be (..., D, 1) (a grey opacity): G is then computed
    once per layer and broadcast over the pixels. ``source`` and ``tau``: (..., D, P)."""
    c0 = (weights * mu).sum()
    moment = transmission_moment(tau[..., :-1, :], mu, weights)                     # (..., D-1, P or 1)
    gradient = source[..., 1:, :] - source[..., :-1, :]                             # (..., D-1, P)
    return 2.0 * math.pi * (c0 * source[..., 0, :] + (gradient * moment).sum(dim=-2))


def normalised_spectrum(wavelength_um: torch.Tensor, temperature: torch.Tensor, dtau_line: torch.Tensor,
                        dtau_continuum: torch.Tensor, mu: torch.Tensor, weights: torch.Tensor,
                        kernel: torch.Tensor | None = None) -> torch.Tensor:
    """Line flux over continuum flux of one atmosphere, broadened: (B, P).

    ``wavelength_um`` (P,); ``temperature`` (B, D), increasing with depth for a stellar atmosphere;
    ``dtau_line`` (B, D, P) >= 0; ``dtau_continuum`` (B, D, P) or (B, D, 1) >= 0. The deepest
    layer's Planck function lights the atmosphere from below (a thermalised boundary), so both
    fluxes are :func:`thermalised_flux`; a grey continuum's transmissions are computed per layer,
    not per pixel.
    """
    source = planck(wavelength_um, temperature.unsqueeze(-1))                  # (B, D, P)
    tau_total = optical_depth(dtau_line + dtau_continuum)
    tau_cont = optical_depth(dtau_continuum)
    ratio = thermalised_flux(source, tau_total, mu, weights) / thermalised_flux(source, tau_cont, mu, weights)
    return ratio if kernel is None else broaden(ratio, kernel)


def quadrature_error(wavelength_um: torch.Tensor, temperature: torch.Tensor, dtau_line: torch.Tensor,
                     dtau_continuum: torch.Tensor, nodes: int, reference_nodes: int = 64) -> float:
    """Largest |relative difference| of the normalised spectrum (unbroadened) with ``nodes``
    Gauss-Legendre nodes against ``reference_nodes`` nodes, computed in float64."""
    args = [t.to(torch.float64) for t in (wavelength_um, temperature, dtau_line, dtau_continuum)]
    mu, w = gauss_legendre(nodes, torch.float64)
    mu_ref, w_ref = gauss_legendre(reference_nodes, torch.float64)
    test = normalised_spectrum(*args, mu, w)
    ref = normalised_spectrum(*args, mu_ref, w_ref)
    return float(((test - ref).abs() / ref.abs()).max())
