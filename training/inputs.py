"""Model inputs from raw spectra, through the serving pipeline: what training and evaluation feed
the networks.

:class:`RawInputs` holds some rows of a benchmark set as raw spectra in memory (the synthetic
ones noiseless, the real ones as observed; :func:`~specserve.training.benchsets.raw_spectra`) and
turns them into model inputs the way the server does (:func:`~specserve.runtime.pipeline.prepare`
with the set's recipe, which is the model card's). Noise, shifts, tilts and masks are applied to
the raw spectra (:mod:`specserve.training.perturb`), never to normalised ones.

Shapes: every :class:`~specserve.runtime.pipeline.Prepared` is (n, P) on the set's grid, rows in
the order of ``idx``.

Evaluation: :func:`evaluation_variants` gives the raw test spectra of every report row (as
observed; at each S/N with each noise model; under each perturbation of :data:`PERTURBATIONS`),
the same lists for the torch path (:func:`torch_inputs`) and for the served path (the exported
graph behind the runtime's Analyzer, in :mod:`specserve.export.served`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from specserve.runtime.pipeline import MIN_COVERAGE, Prepared, prepare_raw
from specserve.runtime.spectrum import SpectrumInput
from specserve.training.benchsets import BenchmarkSet, raw_spectra
from specserve.training.perturb import NOISE_MODELS, Augmentation, degrade, mask_runs, resample_native, shift, tilt


def observed(bench: BenchmarkSet, idx: np.ndarray) -> Prepared:
    """Rows ``idx`` of the set as built (each spectrum at its own S/N): the stored arrays, which
    are the pipeline's output for the set's raw spectra."""
    a = bench.arrays
    idx = np.asarray(idx, dtype=np.intp)
    return Prepared(a["flux"][idx], a["ivar"][idx], a["mask"][idx], np.ones(idx.size, bool))


def model_inputs(bench: BenchmarkSet, idx: np.ndarray) -> np.ndarray:
    """The spectra ``idx`` as built, as model input: (n, P) float32, unusable pixels filled."""
    return observed(bench, idx).model_flux()


def _merge(base: Prepared, rows: np.ndarray, other: Prepared) -> Prepared:
    flux, ivar, mask, has = (np.array(getattr(base, k), copy=True) for k in ("flux", "ivar", "mask", "has_ivar"))
    flux[rows], ivar[rows], mask[rows], has[rows] = other.flux, other.ivar, other.mask, other.has_ivar
    return Prepared(flux, ivar, mask, has)


class RawInputs:
    """Rows ``idx`` of ``bench`` as raw spectra, and their model inputs through the pipeline."""

    def __init__(self, bench: BenchmarkSet, idx: np.ndarray, data: Path | None = None):
        self.bench = bench
        self.idx = np.asarray(idx, dtype=np.intp)
        self.recipe = bench.preprocessing
        self.raws: list[SpectrumInput] = raw_spectra(bench, self.idx, noisy=False, data=data)

    def __len__(self) -> int:
        return int(self.idx.size)

    def observed(self) -> Prepared:
        return observed(self.bench, self.idx)

    def prepare(self, raws: Sequence[SpectrumInput]) -> Prepared:
        return prepare_raw(self.recipe, raws)

    def transformed(self, transform: Callable[[SpectrumInput], SpectrumInput]) -> Prepared:
        """Every raw spectrum through ``transform``, then the pipeline."""
        return self.prepare([transform(r) for r in self.raws])

    def at_snr(self, snr: float | np.ndarray, rng: np.random.Generator, noise: str = "constant",
               transform: Callable[[SpectrumInput], SpectrumInput] | None = None) -> Prepared:
        """Every spectrum observed at S/N ``snr`` (scalar or (n,)) with the ``noise`` model; a
        spectrum already noisier keeps its own noise. ``transform`` acts before the noise."""
        snrs = np.broadcast_to(np.asarray(snr, dtype=np.float64), (len(self),))
        raws = self.raws if transform is None else [transform(r) for r in self.raws]
        return self.prepare([degrade(r, float(s), rng, noise) for r, s in zip(raws, snrs)])

    def augmented(self, augmentation: Augmentation, fraction: float, rng: np.random.Generator) -> Prepared:
        """The set as built, with a random ``fraction`` of the spectra replaced by a fresh raw-level
        augmentation of their raw spectrum (noise, shift, tilt, masks) through the pipeline."""
        base = self.observed()
        if fraction <= 0 or len(self) == 0:
            return base
        rows = np.flatnonzero(rng.uniform(size=len(self)) < fraction)
        if rows.size == 0:
            return base
        return _merge(base, rows, self.prepare([augmentation(self.raws[i], rng) for i in rows]))


class AugmentedPool:
    """``size`` augmented versions of the training spectra, made on first use and reused in turn:
    epoch e trains on version e % size. Raw-level augmentation through the pipeline costs about
    2 ms per spectrum (7,984-pixel giants), so fresh draws every epoch would double a 200-epoch
    SPT run; a pool of 8 keeps most of the variety for 1/25 of the cost."""

    def __init__(self, raw: RawInputs, augmentation: Augmentation, fraction: float,
                 rng: np.random.Generator, size: int = 8):
        if size < 1:
            raise ValueError(f"pool size must be >= 1, got {size}")
        self.raw, self.augmentation, self.fraction, self.rng = raw, augmentation, fraction, rng
        self._versions: list[Prepared] = []
        self.size = size

    def epoch(self, epoch: int) -> Prepared:
        k = epoch % self.size
        while len(self._versions) <= k:
            self._versions.append(self.raw.augmented(self.augmentation, self.fraction, self.rng))
        return self._versions[k]


def augmentation(config) -> Augmentation:
    """The raw-level augmentation a model config asks for (its ``augment_*`` fields): noise at an
    S/N log-uniform in [augment_snr_min, augment_snr_max] (constant or photon, half each), a
    radial-velocity residual N(0, augment_rv) km/s on half the augmented spectra, a calibration
    tilt |a| <= augment_tilt on half, masked runs over up to augment_mask of the pixels on 30 %,
    another native sampling on 20 %; all on the raw spectrum, before the pipeline. The training
    set gets ``augment_pool`` augmented versions, used in turn (:class:`AugmentedPool`)."""
    return Augmentation(snr_min=config.augment_snr_min, snr_max=config.augment_snr_max,
                        rv_sigma=config.augment_rv, p_shift=0.5 if config.augment_rv else 0.0,
                        tilt=config.augment_tilt, p_tilt=0.5 if config.augment_tilt else 0.0,
                        mask_fraction=config.augment_mask, p_mask=0.3 if config.augment_mask else 0.0)


def training_pool(config, bench: BenchmarkSet, idx: np.ndarray, rng: np.random.Generator,
                  fraction: float | None = None) -> AugmentedPool:
    """The augmentation pool of a model config on rows ``idx`` (``augment_fraction`` by default)."""
    return AugmentedPool(RawInputs(bench, idx), augmentation(config),
                         config.augment_fraction if fraction is None else fraction, rng, config.augment_pool)


PERTURBATIONS: dict[str, Callable[[SpectrumInput, np.random.Generator], SpectrumInput]] = {
    "rv_+5kms": lambda r, rng: shift(r, 5.0),
    "rv_-5kms": lambda r, rng: shift(r, -5.0),
    "tilt_0.15": lambda r, rng: tilt(r, 0.15),
    "tilt_-0.15": lambda r, rng: tilt(r, -0.15),
    "masked_5pct": lambda r, rng: mask_runs(r, 0.05, rng),
    "sampling_1.5x_coarser": lambda r, rng: resample_native(r, 1.5),
    "sampling_linear": lambda r, rng: resample_native(r, 1.0, linear=True),
}
"""Raw-level perturbations of the perturbation table: radial-velocity residuals, flux-calibration
tilts, bad-pixel runs, and the same spectra on other native samplings (each on the observed test
spectra, with their own noise)."""


def variant_key(noise: str, snr: float) -> str:
    return f"snr_{noise}_{snr:g}"


def evaluation_variants(bench: BenchmarkSet, idx: np.ndarray, snr_levels: Sequence[float], seed: int,
                        perturbations: bool = True) -> dict[str, list[SpectrumInput]]:
    """Raw spectra of every evaluation row: ``native`` (as observed), ``snr_<noise>_<S/N>`` for each
    noise model and level (from the noiseless synthetic spectra, or the real ones with their own
    noise), and ``perturb_<name>`` for each of :data:`PERTURBATIONS`. Deterministic for ``seed``."""
    raw = RawInputs(bench, idx)
    out = {"native": raw_spectra(bench, idx, noisy=True)}
    for k, noise in enumerate(NOISE_MODELS):
        for snr in snr_levels:
            rng = np.random.default_rng([seed, int(round(snr * 1000)), k])
            out[variant_key(noise, snr)] = [degrade(r, float(snr), rng, noise) for r in raw.raws]
    if perturbations:
        for k, (name, fn) in enumerate(PERTURBATIONS.items()):
            rng = np.random.default_rng([seed, 7, k])
            out[f"perturb_{name}"] = [fn(r, rng) for r in out["native"]]
    return out


def torch_inputs(bench: BenchmarkSet, raws: Sequence[SpectrumInput]) -> tuple[Prepared, np.ndarray]:
    """The pipeline's output for ``raws`` and which of them a model applies to (coverage >=
    MIN_COVERAGE, as the server decides): (prepared, (n,) bool)."""
    prepared = prepare_raw(bench.preprocessing, raws)
    return prepared, prepared.coverage >= MIN_COVERAGE
