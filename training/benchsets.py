"""The named benchmark sets ``giants``, ``stars`` and ``cv``, built from the data kit.

Each set is built by one deterministic function (fixed seed, no clock, no dict-order dependence)
from raw spectra as an instrument delivers them, through the serving pipeline
(:func:`specserve.runtime.pipeline.prepare_raw`, the code the server's Analyzer runs), and written
to ``<cache>/<name>/``; :func:`raw_spectra` regenerates the raw spectra of any rows:

- one ``.npy`` file per array (``flux``, ``ivar``, ``mask`` (N, n_pix); labels; ids; ``split``);
- ``meta.json``: grid and preprocessing recipe, label names/units, statistics, split sizes,
  sources, seed, and the content hash (sha256 over every array's name, dtype, shape and bytes,
  which is also the hash of the ``.npy`` files since ``np.save`` is byte-deterministic);
- ``examples.png``: a few example spectra (needs matplotlib, the ``train`` extra).

``split`` holds 0 (train), 1 (validation), 2 (test) per spectrum.

Sets:

``giants``  Miglio et al. 2021 x APOKASC-3 red giants joined on KIC; spectra from The Payne's
            Kurucz emulator at (Teff, seismic logg, [Fe/H], [alpha/Fe]) on its 7,214 native
            pixels (its unreliable ones masked), Gaussian noise at S/N log-uniform in [50, 300]
            per star, then resampled onto the APOGEE log-linear grid (gaps masked) and
            continuum-normalised. Targets: age (Gyr), mass (Msun). Split 70/15/15 at random.
``stars``   real MILES and LAMOST DR1 spectra with catalogue Teff, logg, [Fe/H], moved to the
            rest frame, resampled onto 3700-7400 A (log10 step 1e-4, R 1800), broadened to R 1800
            and continuum-normalised. Split 70/15/15 within each source.
``cv``      label 1: cataclysmic-variable spectra synthesised from the real-data CV eigenspectra
            (SDSS ``spEigenCVstar`` and the DESI redrock CV basis): random eigen-coefficients, a
            smooth continuum tilt, optionally a K/M donor star from the BOSS templates, a radial
            velocity, observed on LAMOST DR1's sampling with noise at S/N log-uniform in [10, 100]
            per native pixel. Label 0: every real spectrum of the
            other folders that covers the grid (LAMOST, MILES, STELIB, SDSS, BOSS templates, SDSS
            stellar templates incl. white dwarfs) plus low-redshift QSO-template spectra. Same grid
            as ``stars``. Split 70/15/15 within each source.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from astropy.table import Table
from astropy.utils.exceptions import AstropyWarning

from specserve.runtime.datakit import cache_dir, data_dir
from specserve.runtime.errors import DatasetError, SpectrumReadError
from specserve.runtime.io import read_spectra
from specserve.runtime.pipeline import MIN_COVERAGE, prepare_raw
from specserve.runtime.preprocess import (
    OPTICAL_PREPROCESSING,
    LogLinearGrid,
    Preprocessing,
    redshift_from_rv,
)
from specserve.runtime.spectrum import Spectrum, SpectrumInput
from specserve.training.payne import APOGEE_GRID, PayneEmulator
from specserve.training.perturb import degrade

log = logging.getLogger(__name__)

APOGEE_PREPROCESSING = Preprocessing(grid=APOGEE_GRID, knot_spacing=0.01)
SPLIT_NAMES = ("train", "validation", "test")
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)
DEFAULT_SEED = 20240108
MIN_GRID_COVERAGE = MIN_COVERAGE
LAMOST_INSTRUMENT = LogLinearGrid(start=3.5682, step=1e-4, length=3904, resolution=1800.0)
"""The sampling LAMOST DR1 delivers (``COEFF0`` 3.5682, ``COEFF1`` 1e-4, 3,904 pixels, R 1800):
synthetic spectra (CVs, QSOs) are observed on it, noise per pixel, before the pipeline."""


@dataclass
class BenchmarkSet:
    """A built set: arrays by name and its ``meta.json`` content."""

    name: str
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.arrays["flux"].shape[0])

    def split_indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.arrays["split"] == SPLIT_NAMES.index(split))

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.meta["preprocessing"])


def content_hash(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def split_labels(groups: np.ndarray, seed: int) -> np.ndarray:
    """0/1/2 (train/validation/test) per item, 70/15/15 within each group, deterministic."""
    rng = np.random.default_rng(seed)
    split = np.zeros(groups.size, dtype=np.int8)
    for group in sorted(set(groups.tolist())):
        idx = np.flatnonzero(groups == group)
        idx = idx[rng.permutation(idx.size)]
        n_val = int(round(SPLIT_FRACTIONS[1] * idx.size))
        n_test = int(round(SPLIT_FRACTIONS[2] * idx.size))
        split[idx[:n_test]] = 2
        split[idx[n_test:n_test + n_val]] = 1
    return split


def _stats(values: np.ndarray, split: np.ndarray, names: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for j, name in enumerate(names):
        col = values[:, j]
        per = {}
        for s, split_name in enumerate(("all",) + SPLIT_NAMES):
            sel = col if split_name == "all" else col[split == s - 1]
            sel = sel[np.isfinite(sel)]
            if sel.size == 0:
                continue
            q = np.percentile(sel, [5, 50, 95])
            per[split_name] = {
                "n": int(sel.size), "mean": float(sel.mean()), "std": float(sel.std()),
                "min": float(sel.min()), "p05": float(q[0]), "median": float(q[1]),
                "p95": float(q[2]), "max": float(sel.max()),
            }
        out[name] = per
    return out


# ---------------------------------------------------------------- giants


def build_giants(root: Path, seed: int = DEFAULT_SEED) -> BenchmarkSet:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        miglio = Table.read(root / "seismic" / "miglio2021_kepler_apogee.fits")
    apokasc: dict[int, dict[str, str]] = {}
    with open(root / "seismic" / "apokasc3_gold_rgb_rc.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            apokasc[int(row["KIC"])] = row
    payne = PayneEmulator.load(root / "payne_kurucz")

    def num(text: str) -> float:
        try:
            return float(text)
        except ValueError:
            return math.nan

    kic, labels, targets, target_err, evstate = [], [], [], [], []
    seen: set[int] = set()
    for row in miglio:
        k = int(row["KIC"])
        if k not in apokasc or k in seen:
            continue
        a = apokasc[k]
        lab = [num(a["Teff"]), num(a["Logg_Seis"]), num(a["[Fe/H]"]), num(a["[Alp/Fe]"])]
        tgt = [float(row["Age"]), float(row["Mass"])]
        err = [float(row["b_Age"]), float(row["b_Mass"])]
        if not (np.all(np.isfinite(lab)) and np.all(np.isfinite(tgt)) and min(tgt) > 0):
            continue
        if not payne.in_range(np.array(lab))[0]:
            continue
        seen.add(k)
        kic.append(k)
        labels.append(lab)
        targets.append(tgt)
        target_err.append(err)
        evstate.append(int(row["evstate"]))
    order = np.argsort(kic, kind="stable")
    kic_arr = np.asarray(kic, dtype=np.int64)[order]
    labels_arr = np.asarray(labels, dtype=np.float64)[order]
    targets_arr = np.asarray(targets, dtype=np.float64)[order]
    err_arr = np.asarray(target_err, dtype=np.float64)[order]
    n = kic_arr.size
    log.info("giants: %d stars in Miglio 2021 x APOKASC-3 inside the emulator's label box", n)

    rng = np.random.default_rng(seed)
    snr = np.exp(rng.uniform(math.log(50.0), math.log(300.0), size=n))
    norm = prepare_raw(APOGEE_PREPROCESSING, giants_raw(payne, labels_arr, kic_arr, snr, seed))
    split = split_labels(np.zeros(n, dtype=np.int8), seed)
    arrays = {
        "flux": norm.flux, "ivar": norm.ivar, "mask": norm.mask,
        "labels": labels_arr.astype(np.float32), "targets": targets_arr.astype(np.float32),
        "target_errors": err_arr.astype(np.float32), "kic": kic_arr,
        "evstate": np.asarray(evstate, dtype=np.int8)[order], "snr": snr.astype(np.float32),
        "split": split,
    }
    meta = {
        "description": "Miglio 2021 x APOKASC-3 red giants, Kurucz/The Payne spectra on the APOGEE grid",
        "preprocessing": APOGEE_PREPROCESSING.to_dict(),
        "label_names": ["teff", "logg", "feh", "alpha_fe"],
        "label_units": ["K", "dex", "dex", "dex"],
        "target_names": ["age", "mass"],
        "target_units": ["Gyr", "Msun"],
        "snr_range": [50.0, 300.0],
        "raw": "The Payne's flux on its 7,214 native wavelengths, its unreliable pixels masked, "
               "constant-sigma noise at S/N `snr` (generator seeded with [seed, KIC])",
        "statistics": {
            "labels": _stats(labels_arr, split, ("teff", "logg", "feh", "alpha_fe")),
            "targets": _stats(targets_arr, split, ("age", "mass")),
        },
    }
    return BenchmarkSet("giants", arrays, meta)


def giants_raw(payne: PayneEmulator, labels: np.ndarray, kic: np.ndarray, snr: np.ndarray | None,
               seed: int) -> list[SpectrumInput]:
    """The raw giants as the emulator delivers them: flux on its own 7,214 wavelengths, The
    Payne's unreliable pixels masked; with ``snr`` (per star) Gaussian noise of constant sigma at
    that S/N from a generator seeded with (seed, KIC), without it noiseless (ivar None)."""
    model = payne(labels).astype(np.float32)  # (n, 7214)
    wave, mask = payne.wavelength, payne.bad_pixels
    raws = []
    for i, k in enumerate(np.asarray(kic).tolist()):
        raw = SpectrumInput(f"KIC {k}", wave, model[i], None, mask, source_resolution=APOGEE_GRID.resolution)
        if snr is not None:
            raw = degrade(raw, float(snr[i]), np.random.default_rng([seed, int(k)]))
        raws.append(raw)
    return raws


# ---------------------------------------------------------------- stars


def _label_rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as fh:
        return {row["file"]: row for row in csv.DictReader(fh)}


def _finite_labels(row: dict[str, str]) -> list[float] | None:
    try:
        values = [float(row["teff"]), float(row["logg"]), float(row["feh"])]
    except (KeyError, ValueError):
        return None
    return values if all(math.isfinite(v) for v in values) else None


def build_stars(root: Path, seed: int = DEFAULT_SEED) -> BenchmarkSet:
    raws, lab, src, files = [], [], [], []
    for folder, source in (("miles", "miles"), ("lamost_dr1", "lamost")):
        labels = _label_rows(root / folder / "labels.csv")
        for fname in sorted(labels):
            values = _finite_labels(labels[fname])
            if values is None:
                continue
            (spectrum,) = read_spectra(root / folder / "fits" / fname)
            raws.append(SpectrumInput.from_spectrum(spectrum))
            lab.append(values)
            src.append(source)
            files.append(f"{folder}/fits/{fname}")
    prepared = prepare_raw(OPTICAL_PREPROCESSING, raws)
    keep = prepared.coverage >= MIN_GRID_COVERAGE
    for i in np.flatnonzero(~keep):
        log.warning("stars: %s does not cover the grid; left out", files[i])
    idx = np.flatnonzero(keep)
    prepared = prepared.rows(idx)
    source_arr = np.asarray(src)[idx]
    labels_arr = np.asarray(lab, dtype=np.float64)[idx]
    split = split_labels(source_arr, seed)
    arrays = {
        "flux": prepared.flux, "ivar": prepared.ivar, "mask": prepared.mask,
        "labels": labels_arr.astype(np.float32), "source": source_arr,
        "file": np.asarray(files)[idx], "file_index": np.zeros(idx.size, np.int16),
        "object_id": np.asarray([raws[i].id for i in idx]), "split": split,
    }
    meta = {
        "description": "real MILES + LAMOST DR1 spectra with catalogue labels on a LAMOST-like grid",
        "preprocessing": OPTICAL_PREPROCESSING.to_dict(),
        "label_names": ["teff", "logg", "feh"],
        "label_units": ["K", "dex", "dex"],
        "raw": "the kit's files as the reader gives them (file, file_index)",
        "sources": {s: int((source_arr == s).sum()) for s in sorted(set(source_arr.tolist()))},
        "statistics": {"labels": _stats(labels_arr, split, ("teff", "logg", "feh"))},
    }
    return BenchmarkSet("stars", arrays, meta)


# ---------------------------------------------------------------- cv

# Folders whose real spectra are the negatives, and what each reader's spectra are.
_NEGATIVE_GLOBS = (
    ("lamost", "lamost_dr1/fits/*.fits"),
    ("lamost", "lamost_dr6_formats/spec-*"),
    ("miles", "miles/fits/*.fits"),
    ("stelib", "stelib/*.fits"),
    ("sdss", "sdss_dr12/*.fits"),
    ("boss_template", "sdss_boss_templates/*.fits"),
    ("sdss_star_template", "sdss_templates/spEigenStar-*.fits"),
)
N_QSO = 40
CV_SNR_RANGE = (10.0, 100.0)
SYNTHETIC_RESOLUTION = 2000.0
"""Resolving power of the CV and QSO bases (SDSS/DESI spectra), broadened to LAMOST's on observing."""


def _real_negatives(root: Path) -> tuple[list[SpectrumInput], list[str], list[str], list[int]]:
    raws, sources, files, index = [], [], [], []
    for source, pattern in _NEGATIVE_GLOBS:
        for path in sorted(root.glob(pattern)):
            rel = str(path.relative_to(root))
            try:
                spectra = read_spectra(path)
            except SpectrumReadError as exc:
                raise DatasetError(f"cv: cannot read kit file {rel}: {exc.reason}") from exc
            for k, spectrum in enumerate(spectra):
                raws.append(SpectrumInput.from_spectrum(spectrum))
                sources.append(source)
                files.append(rel)
                index.append(k)
    return raws, sources, files, index


def _eigen_basis(root: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, wavelength, basis (3, n)) for the two CV bases."""
    sdss = read_spectra(root / "sdss_templates" / "spEigenCVstar-55734.fits")
    desi = read_spectra(root / "redrock_templates" / "rrtemplate-STAR-CV-v0.1.fits")
    return [
        ("cv_sdss_eigen", sdss[0].wavelength, np.stack([s.flux for s in sdss]).astype(np.float64)),
        ("cv_desi_redrock", desi[0].wavelength, np.stack([s.flux for s in desi]).astype(np.float64)),
    ]


def _donor_stars(root: Path) -> list[Spectrum]:
    donors = []
    for path in sorted((root / "sdss_boss_templates").glob("*.fits")):
        if path.name[0] in "KM":
            donors.extend(read_spectra(path))
    return donors


def _smooth_tilt(wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = (np.log10(wave) - math.log10(5500.0)) / 0.15
    a, b = rng.uniform(-0.8, 0.8), rng.uniform(-0.3, 0.3)
    return np.exp(a * x + b * x * x)


_OBSERVE = Preprocessing(grid=LAMOST_INSTRUMENT, normalise=False)


def _observe(wave: np.ndarray, flux: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A model spectrum (observed-frame wavelengths) as LAMOST records it, before noise: broadened
    to R 1800 and binned onto its pixels. Returns noiseless flux and mask (n_instrument,)."""
    out = _OBSERVE.apply(wave, flux, None, None, source_resolution=SYNTHETIC_RESOLUTION)
    return out.flux, out.mask


def _synthesise_cvs(root: Path, n: int, rng: np.random.Generator):
    """n CVs observed on the LAMOST sampling: (names, noiseless flux (n, L), masks (n, L), S/N)."""
    bases = _eigen_basis(root)
    donors = _donor_stars(root)
    names, clean, masks, snrs = [], [], [], []
    while len(names) < n:
        name, wave, basis = bases[len(names) % len(bases)]
        coeff = np.array([1.0, rng.normal(0.0, 3.0), rng.normal(0.0, 4.0)])
        spectrum = coeff @ basis
        sel = (wave > 3600) & (wave < 7500)
        if np.mean(spectrum[sel] <= 0) > 0.01:
            continue  # unphysical combination: draw again
        spectrum = np.maximum(spectrum, 0.0) * _smooth_tilt(wave, rng)
        if donors and rng.uniform() < 0.5:
            donor = donors[int(rng.integers(len(donors)))]
            donor_flux = np.interp(wave, donor.wavelength, donor.flux, left=0.0, right=0.0)
            scale = np.median(spectrum[sel]) / max(np.median(donor_flux[sel]), 1e-30)
            spectrum = spectrum + rng.uniform(0.1, 0.6) * scale * donor_flux
        z = float(redshift_from_rv(rng.normal(0.0, 100.0)))
        flux, mask = _observe(wave * (1.0 + z), spectrum)
        names.append(name)
        clean.append(flux)
        masks.append(mask)
        snrs.append(float(np.exp(rng.uniform(math.log(CV_SNR_RANGE[0]), math.log(CV_SNR_RANGE[1])))))
    return names, clean, masks, snrs


def _qso_spectra(root: Path, n: int, rng: np.random.Generator):
    """n low-redshift QSOs observed on the LAMOST sampling: (z, noiseless flux, masks, S/N)."""
    basis_spectra = read_spectra(root / "redrock_templates" / "rrtemplate-QSO-LOZ-v1.1.fits")
    wave = basis_spectra[0].wavelength
    basis = np.stack([s.flux for s in basis_spectra]).astype(np.float64)
    scale = np.sqrt(np.mean(basis**2, axis=1))
    zs, clean, masks, snrs = [], [], [], []
    while len(zs) < n:
        coeff = np.concatenate([[1.0], rng.normal(0.0, 0.15, basis.shape[0] - 1) * scale[0] / scale[1:]])
        spectrum = coeff @ basis
        z = rng.uniform(0.0, 0.25)
        observed = wave * (1.0 + z)
        sel = (observed > 3600) & (observed < 7500)
        if np.mean(spectrum[sel] <= 0) > 0.01:
            continue
        flux, mask = _observe(observed, np.maximum(spectrum, 0.0))
        zs.append(z)
        clean.append(flux)
        masks.append(mask)
        snrs.append(float(np.exp(rng.uniform(math.log(CV_SNR_RANGE[0]), math.log(CV_SNR_RANGE[1])))))
    return zs, clean, masks, snrs


def _synthetic_raw(bench: BenchmarkSet, i: int, noisy: bool) -> SpectrumInput:
    a = bench.arrays
    row = int(a["synthetic_row"][i])
    raw = SpectrumInput(str(a["object_id"][i]), LAMOST_INSTRUMENT.wavelength, a["raw_clean"][row], None,
                        a["raw_mask"][row], source_resolution=LAMOST_INSTRUMENT.resolution)
    if noisy:
        seed = int(bench.meta.get("seed", DEFAULT_SEED))
        raw = degrade(raw, float(a["snr"][i]), np.random.default_rng([seed, 1, row]))
    return raw


def build_cv(root: Path, seed: int = DEFAULT_SEED) -> BenchmarkSet:
    rng = np.random.default_rng(seed)
    raws, sources, files, file_index = _real_negatives(root)
    real = prepare_raw(OPTICAL_PREPROCESSING, raws)
    covered = real.coverage >= MIN_GRID_COVERAGE
    for i in np.flatnonzero(~covered):
        log.info("cv: %s (%s) covers too little of the grid; left out", files[i], raws[i].id)
    kept = np.flatnonzero(covered)
    raws = [raws[i] for i in kept]
    sources, files, file_index = ([x[i] for i in kept] for x in (sources, files, file_index))
    n_real = len(raws)
    ids = [r.id for r in raws]
    qso = _qso_spectra(root, N_QSO, rng)
    for k, z in enumerate(qso[0]):
        sources.append("qso_template")
        files.append("redrock_templates/rrtemplate-QSO-LOZ-v1.1.fits")
        ids.append(f"qso-z{z:.3f}-{k:03d}")
    n_neg = len(ids)
    pos = _synthesise_cvs(root, n_neg, rng)  # as many CVs as negatives
    for k, name in enumerate(pos[0]):
        sources.append(name)
        files.append("sdss_templates/spEigenCVstar-55734.fits" if name == "cv_sdss_eigen"
                     else "redrock_templates/rrtemplate-STAR-CV-v0.1.fits")
        ids.append(f"{name}-{k:05d}")
    n_syn = len(ids) - n_real
    label = np.concatenate([np.zeros(n_neg, dtype=np.int8), np.ones(len(pos[0]), dtype=np.int8)])
    source_arr = np.asarray(sources)
    split = split_labels(source_arr, seed)
    arrays = {
        "raw_clean": np.stack(qso[1] + pos[1]).astype(np.float32), "raw_mask": np.stack(qso[2] + pos[2]),
        "synthetic_row": np.concatenate([np.full(n_real, -1), np.arange(n_syn)]).astype(np.int32),
        "object_id": np.asarray(ids), "snr": np.asarray([np.nan] * n_real + qso[3] + pos[3], dtype=np.float32),
        "label": label, "source": source_arr, "file": np.asarray(files),
        "file_index": np.asarray(file_index + [0] * n_syn, dtype=np.int16), "split": split,
    }
    bench = BenchmarkSet("cv", arrays, {"seed": seed})
    synthetic = prepare_raw(OPTICAL_PREPROCESSING, [_synthetic_raw(bench, i, noisy=True)
                                                  for i in range(n_real, len(ids))])
    if (synthetic.coverage < MIN_GRID_COVERAGE).any():
        raise DatasetError("cv: a synthetic spectrum does not cover the grid")
    for key in ("flux", "ivar", "mask"):
        arrays[key] = np.concatenate([getattr(real.rows(kept), key), getattr(synthetic, key)])
    meta = {
        "description": "CV (label 1, from real CV eigenspectra) vs real non-CV spectra (label 0)",
        "preprocessing": OPTICAL_PREPROCESSING.to_dict(),
        "class_names": ["non_cv", "cv"],
        "n_real_negatives": n_real,
        "n_template_negatives": n_neg - n_real,
        "n_positives": int(label.sum()),
        "positive_snr_range": list(CV_SNR_RANGE),
        "raw": "real spectra: the kit's files as the reader gives them (file, file_index); CVs and "
               "QSOs: noiseless flux observed on LAMOST's DR1 sampling (raw_clean, raw_mask by "
               "synthetic_row), constant-sigma noise at S/N `snr` (generator seeded with [seed, 1, row])",
        "sources": {s: int((source_arr == s).sum()) for s in sorted(set(sources))},
        "split_counts": {
            name: {"cv": int(((split == i) & (label == 1)).sum()), "non_cv": int(((split == i) & (label == 0)).sum())}
            for i, name in enumerate(SPLIT_NAMES)
        },
    }
    return BenchmarkSet("cv", arrays, meta)


BUILDERS: dict[str, Callable[[Path, int], BenchmarkSet]] = {
    "giants": build_giants,
    "stars": build_stars,
    "cv": build_cv,
}


# ---------------------------------------------------------------- raw spectra


def raw_spectra(bench: BenchmarkSet, idx: np.ndarray, noisy: bool = True,
                data: Path | None = None) -> list[SpectrumInput]:
    """The raw spectra ``idx`` of a built set, as they entered the pipeline when it was built.

    With ``noisy=False`` the synthetic spectra (giants, CVs, QSOs) come noiseless (ivar None),
    ready for :func:`specserve.training.perturb.degrade`; real spectra always carry their own
    noise. ``prepare_raw(bench.preprocessing, raw_spectra(bench, idx))`` gives back exactly
    ``bench.arrays['flux'][idx]`` (and ivar, mask): the set-equivalence tests check it."""
    idx = np.asarray(idx, dtype=np.intp)
    a = bench.arrays
    if bench.name == "giants":
        payne = PayneEmulator.load(data_dir(data) / "payne_kurucz")
        seed = int(bench.meta.get("seed", DEFAULT_SEED))
        return giants_raw(payne, a["labels"][idx].astype(np.float64), a["kic"][idx],
                          a["snr"][idx].astype(np.float64) if noisy else None, seed)
    root = data_dir(data)
    read: dict[str, list[Spectrum]] = {}
    out = []
    for i in idx.tolist():
        if "synthetic_row" in a and a["synthetic_row"][i] >= 0:
            out.append(_synthetic_raw(bench, i, noisy))
            continue
        rel = str(a["file"][i])
        if rel not in read:
            read[rel] = read_spectra(root / rel)
        out.append(SpectrumInput.from_spectrum(read[rel][int(a["file_index"][i])]))
    return out


# ---------------------------------------------------------------- storage


def _plot_examples(bench: BenchmarkSet, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'specserve[train]'): no examples.png")
        return False
    recipe = bench.preprocessing
    wave = recipe.grid.wavelength
    flux, mask = bench.arrays["flux"], bench.arrays["mask"]
    rng = np.random.default_rng(0)
    if "label" in bench.arrays:
        picks = [int(rng.choice(np.flatnonzero(bench.arrays["label"] == c))) for c in (0, 0, 1, 1)]
        titles = [f"{bench.meta['class_names'][bench.arrays['label'][i]]}: {bench.arrays['object_id'][i]}" for i in picks]
    else:
        picks = sorted(rng.choice(bench.size, size=4, replace=False).tolist())
        names = bench.meta["label_names"]
        titles = [", ".join(f"{n}={v:.4g}" for n, v in zip(names, bench.arrays["labels"][i])) for i in picks]
        if "targets" in bench.arrays:
            titles = [t + f"; age={bench.arrays['targets'][i, 0]:.3g} Gyr, mass={bench.arrays['targets'][i, 1]:.3g} Msun"
                      for t, i in zip(titles, picks)]
    fig, axes = plt.subplots(len(picks), 1, figsize=(11, 2.2 * len(picks)), sharex=True)
    for ax, i, title in zip(axes, picks, titles):
        shown = np.where(mask[i], np.nan, flux[i])
        ax.plot(wave, shown, lw=0.5, color="k")
        ax.set_title(title, fontsize=8)
        ax.set_ylabel("normalised flux", fontsize=7)
    axes[-1].set_xlabel("vacuum wavelength [A]")
    fig.suptitle(f"benchmark set '{bench.name}': {bench.size} spectra", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def build(name: str, data: Path | None = None, cache: Path | None = None,
          seed: int = DEFAULT_SEED, plot: bool = True) -> tuple[BenchmarkSet, Path]:
    """Build set ``name`` from the kit and write it to ``<cache>/<name>``; returns it and its folder."""
    if name not in BUILDERS:
        raise DatasetError(f"unknown benchmark set {name!r}; known: {', '.join(BUILDERS)}")
    root = data_dir(data)
    bench = BUILDERS[name](root, seed)
    bench.meta.update({
        "name": name,
        "seed": seed,
        "size": bench.size,
        "split_sizes": {s: int((bench.arrays["split"] == i).sum()) for i, s in enumerate(SPLIT_NAMES)},
        "arrays": {k: {"dtype": v.dtype.str, "shape": list(v.shape)} for k, v in sorted(bench.arrays.items())},
        "content_hash": content_hash(bench.arrays),
    })
    target = cache_dir(cache) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        for key, array in bench.arrays.items():
            np.save(tmp / f"{key}.npy", array, allow_pickle=False)
        (tmp / "meta.json").write_text(json.dumps(bench.meta, indent=2, sort_keys=True) + "\n")
        if plot:
            _plot_examples(bench, tmp / "examples.png")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return bench, target


def load(name: str, cache: Path | None = None, verify: bool = False) -> BenchmarkSet:
    """Load a built set; ``verify`` recomputes the content hash."""
    folder = cache_dir(cache) / name
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        raise DatasetError(f"benchmark set {name!r} is not built in {folder}; run: specserve data build {name}")
    meta = json.loads(meta_path.read_text())
    arrays = {key: np.load(folder / f"{key}.npy", allow_pickle=False) for key in meta["arrays"]}
    bench = BenchmarkSet(name, arrays, meta)
    if verify and content_hash(arrays) != meta["content_hash"]:
        raise DatasetError(f"benchmark set {name!r} in {folder} does not match its content hash")
    return bench
