"""Refining PhysFormer's encoder estimate by fitting its generator to the observed spectrum, and
the diagnostic that decides whether that is worth doing (issue 20, item 3).

:func:`refine` takes the encoder's MC mean and spread as a Gaussian prior and runs a fixed number
of Gauss-Newton steps on

    0.5 sum_p w_p (flux_p - g(theta, z)_p)^2 + 0.5 sum_k ((theta_k - theta0_k) / s_k)^2

in the standardised parameters ``theta`` (log10 Teff, logg, [Fe/H]), with the latent ``z`` held at
the encoder's mean, the Jacobian by forward differences (four generator runs per step: every
operation is one the exported graphs already use), ``w_p = 1 / (1/ivar_p + sigma_sys^2)`` (a
systematic floor for the generator's own error) and each step clipped into the box.

:func:`refinement_diagnostic` measures, on the evaluation's spectra, what refinement does to the
MAE and *why*: the generator's chi-square at the catalogue labels against the one at the encoder's
estimate. When the catalogue labels fit the observed spectra no better than the encoder's estimate
(true in about half of the stars, as for a coin), the fit's minimum is not nearer the truth than
the encoder, and refinement moves the parameters along the generator's own errors: it cannot help
until the generator is more accurate than the encoder. The evaluation report carries this
diagnostic (``rows.physformer.refinement``); the exported graph does not refine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from specserve.training.physformer.model import PARAMETER_NAMES, PhysFormer

FD_STEP = 1e-3
"""Forward-difference step of the Jacobian, in standardised units."""


def _physical(model: PhysFormer, theta: torch.Tensor) -> torch.Tensor:
    x = theta * model.param_std + model.param_mean
    return torch.cat([10.0 ** x[:, :1], x[:, 1:]], dim=1)


def _prior_sigma(model: PhysFormer, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The encoder's spread (physical units) in standardised units."""
    log_teff = std[:, :1] / (mean[:, :1] * math.log(10.0))
    return torch.cat([log_teff, std[:, 1:]], dim=1) / model.param_std


def refine(model: PhysFormer, flux: np.ndarray, ivar: np.ndarray, mean: np.ndarray, std: np.ndarray,
           latent: np.ndarray, steps: int = 1, sigma_sys: float = 0.05, prior_scale: float = 1.0) -> np.ndarray:
    """Refined parameters (n, 3), physical units, after ``steps`` Gauss-Newton steps (module docstring)."""
    f, iv, z = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in (flux, ivar, latent))
    m0, s0 = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in (mean, std))
    with torch.no_grad():
        theta0 = model.standardise(m0)
        precision = 1.0 / (_prior_sigma(model, m0, s0) * prior_scale).clamp_min(1e-3) ** 2
        weight = torch.where(iv > 0, 1.0 / (1.0 / iv.clamp_min(1e-12) + sigma_sys ** 2), torch.zeros_like(iv))
        low = model.standardise(model.box_min.unsqueeze(0))
        high = model.standardise(model.box_max.unsqueeze(0))
        theta = theta0.clone()
        for _ in range(steps):
            base = model.generate(_physical(model, theta), z)
            columns = []
            for k in range(3):
                shifted = theta.clone()
                shifted[:, k] += FD_STEP
                columns.append((model.generate(_physical(model, shifted), z) - base) / FD_STEP)
            jac = torch.stack(columns, dim=-1)                                          # (n, P, 3)
            normal = torch.einsum("npi,np,npj->nij", jac, weight, jac) + torch.diag_embed(precision)
            rhs = torch.einsum("npi,np->ni", jac, weight * (f - base)) - precision * (theta - theta0)
            theta = torch.minimum(torch.maximum(theta + torch.linalg.solve(normal, rhs), low), high)
        return _physical(model, theta).numpy().astype(np.float64)


def _chi2(model: PhysFormer, flux: torch.Tensor, weight: torch.Tensor, params: np.ndarray,
          latent: torch.Tensor | None) -> torch.Tensor:
    p = torch.from_numpy(np.ascontiguousarray(params, dtype=np.float32))
    return (weight * (flux - model.generate(p, latent)) ** 2).sum(-1) / (weight > 0).sum(-1).clamp_min(1)


def refinement_diagnostic(model: PhysFormer, variants: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                          encoder: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]], truth: np.ndarray,
                          select: np.ndarray, keys: Sequence[str], steps: Sequence[int] = (1, 3),
                          sigma_sys: Sequence[float] = (0.0, 0.05)) -> dict[str, Any]:
    """Per evaluation row ``keys``: the MAE over ``select`` (e.g. FGK) of the encoder and of each
    refinement setting, and the generator's median chi-square per pixel at the encoder's estimate
    and at the catalogue labels (with the encoder's latent), with the fraction of stars whose
    catalogue labels fit better. ``variants[key] = (flux, ivar, ok)``; ``encoder[key] = (mean,
    std, latent)`` of the MC encoder on them."""
    out: dict[str, Any] = {}
    for key in keys:
        f, iv, _ = variants[key]
        mean, std, latent = encoder[key]
        f, iv, mean, std, latent = f[select], iv[select], mean[select], std[select], latent[select]
        y = truth[select]

        def mae(p: np.ndarray) -> dict[str, float]:
            return dict(zip(PARAMETER_NAMES, map(float, np.abs(p - y).mean(axis=0))))

        row: dict[str, Any] = {"n": int(select.sum()), "encoder": mae(mean), "refined": {}}
        for s in sigma_sys:
            for n in steps:
                row["refined"][f"sigma_sys={s:g},steps={n}"] = mae(refine(model, f, iv, mean, std, latent, n, s))
        with torch.no_grad():
            ft, ivt, zt = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in (f, iv, latent))
            weight = torch.where(ivt > 0, 1.0 / (1.0 / ivt.clamp_min(1e-12) + max(sigma_sys) ** 2), torch.zeros_like(ivt))
            at_encoder = _chi2(model, ft, weight, mean, zt)
            at_truth = _chi2(model, ft, weight, y, zt)
        row["chi2_per_pixel_median"] = {"encoder_estimate": float(at_encoder.median()),
                                        "catalogue_labels": float(at_truth.median()),
                                        "sigma_sys": float(max(sigma_sys))}
        row["catalogue_fits_better_fraction"] = float((at_truth < at_encoder).float().mean())
        out[key] = row
    return out
