"""The named benchmark sets ``giants``, ``stars`` and ``cv``, built from the data kit.

Each set is built by one deterministic function (fixed seed, no clock, no dict-order dependence)
through the runtime's own preprocessing, and written to ``<cache>/<name>/``:

- one ``.npy`` file per array (``flux``, ``ivar``, ``mask`` (N, n_pix); labels; ids; ``split``);
- ``meta.json``: grid and preprocessing recipe, label names/units, statistics, split sizes,
  sources, seed, and the content hash (sha256 over every array's name, dtype, shape and bytes,
  which is also the hash of the ``.npy`` files since ``np.save`` is byte-deterministic);
- ``examples.png``: a few example spectra (needs matplotlib, the ``train`` extra).

``split`` holds 0 (train), 1 (validation), 2 (test) per spectrum.

Sets:

``giants``  Miglio et al. 2021 x APOKASC-3 red giants joined on KIC; spectra from The Payne's
            Kurucz emulator at (Teff, seismic logg, [Fe/H], [alpha/Fe]) on the APOGEE log-linear
            grid (gaps masked), Gaussian noise at S/N log-uniform in [50, 300] per star,
            continuum-normalised. Targets: age (Gyr), mass (Msun). Split 70/15/15 at random.
``stars``   real MILES and LAMOST DR1 spectra with catalogue Teff, logg, [Fe/H], moved to the
            rest frame, resampled onto 3700-7400 A (log10 step 1e-4, R 1800), broadened to R 1800
            and continuum-normalised. Split 70/15/15 within each source.
``cv``      label 1: cataclysmic-variable spectra synthesised from the real-data CV eigenspectra
            (SDSS ``spEigenCVstar`` and the DESI redrock CV basis): random eigen-coefficients, a
            smooth continuum tilt, optionally a K/M donor star from the BOSS templates, a radial
            velocity, noise at S/N log-uniform in [10, 100]. Label 0: every real spectrum of the
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
from astropy.io import fits
from astropy.table import Table
from astropy.utils.exceptions import AstropyWarning

from specserve.runtime.datakit import cache_dir, data_dir
from specserve.runtime.errors import DatasetError, SpectrumReadError
from specserve.runtime.io import read_spectra
from specserve.runtime.preprocess import (
    LAMOST_LIKE_GRID,
    OPTICAL_PREPROCESSING,
    Preprocessing,
    add_noise,
    continuum_normalise,
)
from specserve.runtime.spectrum import Spectrum

from .payne import APOGEE_GRID, PayneEmulator

log = logging.getLogger(__name__)

OPTICAL_GRID = LAMOST_LIKE_GRID
APOGEE_PREPROCESSING = Preprocessing(grid=APOGEE_GRID, knot_spacing=0.01)
SPLIT_NAMES = ("train", "validation", "test")
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)
DEFAULT_SEED = 20240108
MIN_GRID_COVERAGE = 0.75


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


def _prepare_one(spectrum: Spectrum, recipe: Preprocessing, z: float | None = None):
    """One real spectrum through the runtime's preprocessing; None if it misses the grid."""
    kwargs: dict[str, Any] = {}
    if spectrum.meta.fwhm is not None:
        kwargs["source_fwhm"] = spectrum.meta.fwhm
    elif spectrum.meta.resolution is not None and spectrum.meta.resolution > recipe.grid.resolution:
        kwargs["source_resolution"] = spectrum.meta.resolution
    if z is not None and z != 0.0:
        kwargs["z"] = z
    out = recipe.apply(spectrum.wavelength, spectrum.flux, spectrum.ivar, spectrum.mask, **kwargs)
    coverage = 1.0 - out.mask.mean()
    return out if coverage >= MIN_GRID_COVERAGE else None


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
    model = payne(labels_arr)  # (N, 7214)
    raw, mask = payne.full_grid(model)
    noisy, ivar = add_noise(raw, None, snr, rng, mask=mask)
    norm = continuum_normalise(noisy, ivar, mask, APOGEE_GRID.log_wavelength,
                               knot_spacing=APOGEE_PREPROCESSING.knot_spacing,
                               lower=APOGEE_PREPROCESSING.clip_lower, upper=APOGEE_PREPROCESSING.clip_upper)
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
        "statistics": {
            "labels": _stats(labels_arr, split, ("teff", "logg", "feh", "alpha_fe")),
            "targets": _stats(targets_arr, split, ("age", "mass")),
        },
    }
    return BenchmarkSet("giants", arrays, meta)


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
    rows: list[tuple[str, str, Spectrum, list[float], float | None]] = []
    for folder, source in (("miles", "miles"), ("lamost_dr1", "lamost")):
        labels = _label_rows(root / folder / "labels.csv")
        for fname in sorted(labels):
            values = _finite_labels(labels[fname])
            if values is None:
                continue
            (spectrum,) = read_spectra(root / folder / "fits" / fname)
            z = spectrum.meta.extra.get("z") if source == "lamost" else None
            rows.append((source, f"{folder}/fits/{fname}", spectrum, values, z))
    flux, ivar, mask, lab, src, files, ids = [], [], [], [], [], [], []
    for source, rel, spectrum, values, z in rows:
        out = _prepare_one(spectrum, OPTICAL_PREPROCESSING, z)
        if out is None:
            log.warning("stars: %s does not cover the grid; left out", rel)
            continue
        flux.append(out.flux)
        ivar.append(out.ivar)
        mask.append(out.mask)
        lab.append(values)
        src.append(source)
        files.append(rel)
        ids.append(spectrum.meta.object_id)
    source_arr = np.asarray(src)
    labels_arr = np.asarray(lab, dtype=np.float64)
    split = split_labels(source_arr, seed)
    arrays = {
        "flux": np.stack(flux), "ivar": np.stack(ivar), "mask": np.stack(mask),
        "labels": labels_arr.astype(np.float32), "source": source_arr,
        "file": np.asarray(files), "object_id": np.asarray(ids), "split": split,
    }
    meta = {
        "description": "real MILES + LAMOST DR1 spectra with catalogue labels on a LAMOST-like grid",
        "preprocessing": OPTICAL_PREPROCESSING.to_dict(),
        "label_names": ["teff", "logg", "feh"],
        "label_units": ["K", "dex", "dex"],
        "sources": {s: int((source_arr == s).sum()) for s in sorted(set(src))},
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


def _real_negatives(root: Path) -> tuple[list[Any], list[str], list[str], list[str]]:
    outs, sources, files, ids = [], [], [], []
    for source, pattern in _NEGATIVE_GLOBS:
        for path in sorted(root.glob(pattern)):
            rel = str(path.relative_to(root))
            try:
                spectra = read_spectra(path)
            except SpectrumReadError as exc:
                raise DatasetError(f"cv: cannot read kit file {rel}: {exc.reason}") from exc
            for spectrum in spectra:
                z = spectrum.meta.extra.get("z") if source in ("lamost", "sdss") else None
                out = _prepare_one(spectrum, OPTICAL_PREPROCESSING, z)
                if out is None:
                    log.info("cv: %s (%s) covers too little of the grid; left out", rel, spectrum.meta.object_id)
                    continue
                outs.append(out)
                sources.append(source)
                files.append(rel)
                ids.append(spectrum.meta.object_id)
    return outs, sources, files, ids


def _eigen_basis(root: Path) -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    """(name, wavelength, basis (3, n), source resolution) for the two CV bases."""
    sdss = read_spectra(root / "sdss_templates" / "spEigenCVstar-55734.fits")
    desi = read_spectra(root / "redrock_templates" / "rrtemplate-STAR-CV-v0.1.fits")
    return [
        ("cv_sdss_eigen", sdss[0].wavelength, np.stack([s.flux for s in sdss]).astype(np.float64), 2000.0),
        ("cv_desi_redrock", desi[0].wavelength, np.stack([s.flux for s in desi]).astype(np.float64), 2000.0),
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


def _synthesise_cvs(root: Path, n: int, rng: np.random.Generator):
    bases = _eigen_basis(root)
    donors = _donor_stars(root)
    flux, ivar, mask, sources, ids, snrs = [], [], [], [], [], []
    raw_recipe = Preprocessing(grid=OPTICAL_GRID, normalise=False)
    made = 0
    while made < n:
        name, wave, basis, resolution = bases[made % len(bases)]
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
        rv = rng.normal(0.0, 100.0)
        out = raw_recipe.apply(wave, spectrum, None, None, rv=-rv, source_resolution=resolution)
        snr = float(np.exp(rng.uniform(math.log(CV_SNR_RANGE[0]), math.log(CV_SNR_RANGE[1]))))
        noisy, noisy_ivar = add_noise(out.flux, None, snr, rng, mask=out.mask)
        norm = continuum_normalise(noisy, noisy_ivar, out.mask, OPTICAL_GRID.log_wavelength,
                                   knot_spacing=OPTICAL_PREPROCESSING.knot_spacing,
                                   lower=OPTICAL_PREPROCESSING.clip_lower,
                                   upper=OPTICAL_PREPROCESSING.clip_upper)
        flux.append(norm.flux)
        ivar.append(norm.ivar)
        mask.append(norm.mask)
        sources.append(name)
        ids.append(f"{name}-{made:05d}")
        snrs.append(snr)
        made += 1
    return flux, ivar, mask, sources, ids, snrs


def _qso_spectra(root: Path, n: int, rng: np.random.Generator):
    basis_spectra = read_spectra(root / "redrock_templates" / "rrtemplate-QSO-LOZ-v1.1.fits")
    wave = basis_spectra[0].wavelength
    basis = np.stack([s.flux for s in basis_spectra]).astype(np.float64)
    scale = np.sqrt(np.mean(basis**2, axis=1))
    outs = []
    while len(outs) < n:
        coeff = np.concatenate([[1.0], rng.normal(0.0, 0.15, basis.shape[0] - 1) * scale[0] / scale[1:]])
        spectrum = coeff @ basis
        z = rng.uniform(0.0, 0.25)
        observed = wave * (1.0 + z)
        sel = (observed > 3600) & (observed < 7500)
        if np.mean(spectrum[sel] <= 0) > 0.01:
            continue
        out = OPTICAL_PREPROCESSING.apply(observed, np.maximum(spectrum, 0.0), None, None,
                                          source_resolution=2000.0)
        if 1.0 - out.mask.mean() < MIN_GRID_COVERAGE:
            continue
        outs.append((out, z))
    return outs


def build_cv(root: Path, seed: int = DEFAULT_SEED) -> BenchmarkSet:
    rng = np.random.default_rng(seed)
    neg, neg_sources, neg_files, neg_ids = _real_negatives(root)
    n_real = len(neg)
    flux = [o.flux for o in neg]
    ivar = [o.ivar for o in neg]
    mask = [o.mask for o in neg]
    sources, files, ids = list(neg_sources), list(neg_files), list(neg_ids)
    snrs = [float("nan")] * n_real
    for i, (out, z) in enumerate(_qso_spectra(root, N_QSO, rng)):
        flux.append(out.flux)
        ivar.append(out.ivar)
        mask.append(out.mask)
        sources.append("qso_template")
        files.append("redrock_templates/rrtemplate-QSO-LOZ-v1.1.fits")
        ids.append(f"qso-z{z:.3f}-{i:03d}")
        snrs.append(float("nan"))
    n_neg = len(flux)
    pos = _synthesise_cvs(root, n_neg, rng)
    flux += pos[0]
    ivar += pos[1]
    mask += pos[2]
    sources += pos[3]
    files += ["sdss_templates/spEigenCVstar-55734.fits" if s == "cv_sdss_eigen"
              else "redrock_templates/rrtemplate-STAR-CV-v0.1.fits" for s in pos[3]]
    ids += pos[4]
    snrs += pos[5]
    label = np.concatenate([np.zeros(n_neg, dtype=np.int8), np.ones(len(pos[0]), dtype=np.int8)])
    source_arr = np.asarray(sources)
    split = split_labels(source_arr, seed)
    arrays = {
        "flux": np.stack(flux), "ivar": np.stack(ivar), "mask": np.stack(mask),
        "label": label, "source": source_arr, "file": np.asarray(files),
        "object_id": np.asarray(ids), "snr": np.asarray(snrs, dtype=np.float32), "split": split,
    }
    meta = {
        "description": "CV (label 1, from real CV eigenspectra) vs real non-CV spectra (label 0)",
        "preprocessing": OPTICAL_PREPROCESSING.to_dict(),
        "class_names": ["non_cv", "cv"],
        "n_real_negatives": n_real,
        "n_template_negatives": n_neg - n_real,
        "n_positives": int(label.sum()),
        "positive_snr_range": list(CV_SNR_RANGE),
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
