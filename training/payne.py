"""The Payne's Kurucz spectral emulator (Ting et al. 2019), forward pass in numpy.

One small network per APOGEE pixel p. Labels x = (Teff, logg, [Fe/H], [alpha/Fe]) are scaled as
``s = (x - x_min) / (x_max - x_min) - 0.5``; then ``h_p = sigmoid(W0[p] @ s + b0[p])`` (5 hidden
units) and ``flux_p = W1[p] . h_p + b1[p]`` (unnormalised flux).

Shapes: labels (N, 4) -> flux (N, 7214). The 7214 pixels lie on a log-linear grid of 7984 pixels
(log10 step 6e-6 from 4.180932, vacuum) with two detector gaps; :meth:`PayneEmulator.full_grid`
places them there, the gaps masked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from specserve.runtime.errors import DatasetError
from specserve.runtime.preprocess import LogLinearGrid

LABEL_NAMES = ("teff", "logg", "feh", "alpha_fe")
APOGEE_GRID = LogLinearGrid(start=4.180932, step=6e-6, length=7984, resolution=22500.0)


@dataclass(frozen=True, eq=False)
class PayneEmulator:
    w0: np.ndarray  # (P, 5, 4)
    b0: np.ndarray  # (P, 5)
    w1: np.ndarray  # (P, 5)
    b1: np.ndarray  # (P,)
    x_min: np.ndarray  # (4,)
    x_max: np.ndarray  # (4,)
    wavelength: np.ndarray  # (P,) vacuum Angstrom
    bad_pixels: np.ndarray  # (P,) bool, The Payne's own mask of unreliable pixels

    @classmethod
    def load(cls, folder: Path) -> "PayneEmulator":
        try:
            with np.load(folder / "NN_unnormalized_spectra.npz") as z:
                nets = {k: np.asarray(z[k], dtype=np.float64) for k in z.files}
            with np.load(folder / "apogee_wavelength.npz") as z:
                wave = np.asarray(z["wavelength"], dtype=np.float64)
            with np.load(folder / "apogee_mask.npz") as z:
                bad = np.asarray(z["apogee_mask"], dtype=bool)
        except (OSError, KeyError) as exc:
            raise DatasetError(f"cannot load The Payne emulator from {folder}: {exc}") from exc
        return cls(
            nets["w_array_0"], nets["b_array_0"], nets["w_array_1"], nets["b_array_1"],
            nets["x_min"], nets["x_max"], wave, bad,
        )

    @property
    def n_pixels(self) -> int:
        return int(self.wavelength.size)

    def in_range(self, labels: np.ndarray) -> np.ndarray:
        """(N,) bool: labels inside the box the emulator was trained on."""
        labels = np.atleast_2d(labels)
        return np.all((labels >= self.x_min) & (labels <= self.x_max), axis=1)

    def __call__(self, labels: np.ndarray) -> np.ndarray:
        """Unnormalised flux (N, P) for labels (N, 4)."""
        labels = np.atleast_2d(np.asarray(labels, dtype=np.float64))
        if labels.shape[1] != 4:
            raise ValueError(f"labels must have 4 columns {LABEL_NAMES}, got shape {labels.shape}")
        scaled = (labels - self.x_min) / (self.x_max - self.x_min) - 0.5  # (N, 4)
        pre = np.einsum("phl,nl->nph", self.w0, scaled) + self.b0  # (N, P, 5)
        hidden = 1.0 / (1.0 + np.exp(-pre))
        return np.einsum("nph,ph->np", hidden, self.w1) + self.b1  # (N, P)

    def grid_index(self) -> np.ndarray:
        """Index of each emulator pixel on :data:`APOGEE_GRID`."""
        idx = (np.log10(self.wavelength) - APOGEE_GRID.start) / APOGEE_GRID.step
        rounded = np.rint(idx).astype(int)
        if np.max(np.abs(idx - rounded)) > 1e-3 or rounded.min() < 0 or rounded.max() >= APOGEE_GRID.length:
            raise DatasetError("emulator wavelengths do not lie on the APOGEE log-linear grid")
        return rounded

    def full_grid(self, flux: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Place (N, P) emulator fluxes on the 7984-pixel grid: (flux, mask), gaps masked."""
        flux = np.atleast_2d(flux)
        idx = self.grid_index()
        out = np.zeros((flux.shape[0], APOGEE_GRID.length), dtype=np.float64)
        out[:, idx] = flux
        mask = np.ones(APOGEE_GRID.length, dtype=bool)
        mask[idx] = self.bad_pixels
        return out, np.broadcast_to(mask, out.shape).copy()
