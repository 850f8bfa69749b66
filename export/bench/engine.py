"""Benchmarks that print figures measured side by side in one run (no timed unit tests).

``preprocess``: resampling plus continuum normalisation of one LAMOST exposure's worth of spectra
(4,000 by default, the kit's LAMOST low-resolution files cycled), each moved to its own rest frame
so every row has its own wavelengths, onto the 3700-7400 A LAMOST-like grid.

``mc``: an MC-dropout model (the SPT) on one input batch: one graph run drawing T samples against T
separate runs of one sample each, and against one single-sample run (the cost of a deterministic
pass plus one head evaluation).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from specserve.runtime.errors import DatasetError
from specserve.runtime.io import read_spectra
from specserve.runtime.preprocess import OPTICAL_PREPROCESSING, Preprocessing

BENCH_GRID = OPTICAL_PREPROCESSING.grid
TARGET_SECONDS = 2.0


@dataclass(frozen=True)
class PreprocessBenchmark:
    n_spectra: int
    n_input_pixels: int
    n_output_pixels: int
    seconds_resample: float
    seconds_normalise: float
    seconds_total: float
    cores: int

    def report(self) -> str:
        rate = self.n_spectra / self.seconds_total
        return "\n".join([
            f"preprocess benchmark: {self.n_spectra} LAMOST spectra x {self.n_input_pixels} px -> "
            f"{self.n_output_pixels} px grid, {self.cores} cores available",
            f"  resample (rest frame, flux-conserving, ivar): {self.seconds_resample:.3f} s",
            f"  continuum normalisation:                      {self.seconds_normalise:.3f} s",
            f"  total: {self.seconds_total:.3f} s ({rate:,.0f} spectra/s); target < {TARGET_SECONDS:.1f} s: "
            f"{self.seconds_total / TARGET_SECONDS:.2f} of the budget -> "
            f"{'PASS' if self.seconds_total < TARGET_SECONDS else 'FAIL'}",
        ])


def lamost_spectra(root: Path) -> list:
    """Every spectrum of the kit's LAMOST DR1 files, in file order."""
    files = sorted((root / "lamost_dr1" / "fits").glob("*.fits"))
    if not files:
        raise DatasetError(f"no LAMOST DR1 spectra under {root}")
    return [s for path in files for s in read_spectra(path)]


def lamost_batch(root: Path, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(wavelength, flux, ivar, mask, z) for ``n`` spectra cycled from the kit's LAMOST DR1 files."""
    spectra = lamost_spectra(root)
    length = min(s.n_pixels for s in spectra)
    pick = [spectra[i % len(spectra)] for i in range(n)]
    wave = np.stack([s.wavelength[:length] for s in pick])
    flux = np.stack([s.flux[:length] for s in pick])
    ivar = np.stack([s.ivar[:length] for s in pick])
    mask = np.stack([s.mask[:length] for s in pick])
    z = np.array([s.meta.extra.get("z", 0.0) for s in pick])
    return wave, flux, ivar, mask, z


def run_preprocess(root: Path, n: int = 4000, repeats: int = 3) -> PreprocessBenchmark:
    """Best of ``repeats`` timings of resample+normalise over the same batch."""
    wave, flux, ivar, mask, z = lamost_batch(root, n)
    full = OPTICAL_PREPROCESSING
    resample_only = Preprocessing(grid=BENCH_GRID, normalise=False, min_coverage=full.min_coverage)
    best_resample = best_total = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        resample_only.apply(wave, flux, ivar, mask, z=z)
        t1 = time.perf_counter()
        out = full.apply(wave, flux, ivar, mask, z=z)
        t2 = time.perf_counter()
        best_resample = min(best_resample, t1 - t0)
        best_total = min(best_total, t2 - t1)
    if not np.isfinite(out.flux).all():
        raise RuntimeError("preprocessing produced non-finite values")
    return PreprocessBenchmark(
        n_spectra=n, n_input_pixels=wave.shape[1], n_output_pixels=BENCH_GRID.length,
        seconds_resample=best_resample, seconds_normalise=best_total - best_resample,
        seconds_total=best_total, cores=len(os.sched_getaffinity(0)),
    )


@dataclass(frozen=True)
class MCBenchmark:
    model: str
    batch: int
    n_samples: int
    seconds_in_graph: float
    seconds_loop: float
    seconds_single: float
    threads: int

    def report(self) -> str:
        t = self.n_samples
        return "\n".join([
            f"MC benchmark: {self.model}, batch {self.batch}, T = {t}, ONNX Runtime CPU, {self.threads} threads "
            "(best of the repeats, same input batch)",
            f"  one run drawing T = {t} samples in the graph: {self.seconds_in_graph * 1e3:8.2f} ms",
            f"  {t} separate runs of one sample:           {self.seconds_loop * 1e3:8.2f} ms",
            f"  one run of one sample:                      {self.seconds_single * 1e3:8.2f} ms",
            f"  loop / in-graph: {self.seconds_loop / self.seconds_in_graph:.1f}x; "
            f"in-graph T = {t} / one sample: {self.seconds_in_graph / self.seconds_single:.2f}x",
        ])


def run_mc(model_path: Path, batch: int = 64, n_samples: int = 64, repeats: int = 5,
           threads: int = 2) -> MCBenchmark:
    """Time ``model_path`` (an MC model's model.onnx: spt, physformer) as described in the module docstring."""
    from specserve.runtime.contract import N_SAMPLES
    from specserve.runtime.engine.repository import load_model_file, session_options

    loaded = load_model_file(model_path.parent.parent.name, model_path.parent.name, model_path)
    if not loaded.ready:
        raise DatasetError(f"cannot benchmark {model_path}: {loaded.reason}")
    if N_SAMPLES not in loaded.card.contract.input_names:
        raise DatasetError(f"{model_path} is a {loaded.card.kind!r} model, which draws no MC samples")
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), sess_options=session_options(threads),
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    base = loaded.card.contract.dummy_inputs(loaded.card.dims, batch=batch)  # other inputs (ivar) too
    base["flux"] = rng.normal(1.0, 0.05, (batch, loaded.card.dims["n_pixels"])).astype(np.float32)

    def feed(t: int) -> dict[str, np.ndarray]:
        return {**base, N_SAMPLES: np.array([t], np.int64), "seed": np.array([rng.random()], np.float32)}

    def best(run) -> float:
        run()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        return min(times)

    in_graph = best(lambda: session.run(None, feed(n_samples)))
    loop = best(lambda: [session.run(None, feed(1)) for _ in range(n_samples)])
    single = best(lambda: session.run(None, feed(1)))
    return MCBenchmark(f"{loaded.name} version {loaded.version}", batch, n_samples, in_graph, loop, single, threads)
