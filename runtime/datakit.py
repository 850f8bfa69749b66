"""Where the data kit and the cache live, and an inventory of the kit.

The kit (real spectra, catalogues, the Kurucz emulator) is read in place, never copied into the
project. Its folder is ``$SPECSERVE_DATA`` or, failing that, the first ``shared/data`` found beside
the working directory or beside the project checkout. Built benchmark sets go to
``$SPECSERVE_CACHE`` (default ``~/.cache/specserve``).

``inspect_kit`` reads every file of the kit with the reader its kind calls for and reports what it
found; a file that cannot be read is reported as an error (the CLI then exits non-zero).
"""

from __future__ import annotations

import csv
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.table import Table
from astropy.utils.exceptions import AstropyWarning

from specserve.runtime.errors import DatasetError, SpectrumReadError
from specserve.runtime.io import read_spectra

_PROJECT_ROOT = Path(__file__).resolve().parent.parent
TEXT_SUFFIXES = (".txt", ".dat", ".par", ".md", ".sha256")


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The data kit folder; raises :class:`DatasetError` naming the places tried."""
    candidates = []
    if explicit:
        candidates.append(Path(explicit))
    elif os.environ.get("SPECSERVE_DATA"):
        candidates.append(Path(os.environ["SPECSERVE_DATA"]))
    else:
        candidates += [Path.cwd() / ".." / "shared" / "data", _PROJECT_ROOT / ".." / "shared" / "data"]
    for candidate in candidates:
        if (candidate / "README.md").exists() or (candidate / "MANIFEST.sha256").exists():
            return candidate.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise DatasetError(f"data kit not found (tried {tried}); set SPECSERVE_DATA")


def cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    if explicit:
        return Path(explicit)
    if os.environ.get("SPECSERVE_CACHE"):
        return Path(os.environ["SPECSERVE_CACHE"])
    return Path.home() / ".cache" / "specserve"


def models_dir(cache: str | os.PathLike | None = None) -> Path:
    """``<cache>/models``: the default model repository (``specserve models build`` writes it,
    ``specserve serve`` serves it when no ``--repository`` is given)."""
    return cache_dir(cache) / "models"


@dataclass(frozen=True)
class KitEntry:
    """One file of the kit: what it is and what reading it gave."""

    path: str
    kind: str
    detail: str
    n_spectra: int = 0
    wave_min: float | None = None
    wave_max: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _is_fits(name: str) -> bool:
    return name.lower().endswith((".fits", ".fit", ".fits.gz", ".fit.gz"))


def inspect_file(path: Path, root: Path) -> KitEntry:
    rel = str(path.relative_to(root))
    name = path.name.lower()
    try:
        if name.endswith(TEXT_SUFFIXES) or name == "readme":
            lines = path.read_text(errors="strict").count("\n")
            return KitEntry(rel, "text", f"{lines} lines")
        if name.endswith(".csv"):
            return _inspect_csv(path, rel)
        if name.endswith(".npz"):
            return _inspect_npz(path, rel, root)
        if _is_fits(name):
            return _inspect_fits(path, rel)
        return KitEntry(rel, "unknown", "", error="no reader for this file type")
    except SpectrumReadError as exc:
        return KitEntry(rel, "spectrum?", "", error=exc.reason)
    except Exception as exc:  # report, never crash the inventory
        return KitEntry(rel, "unreadable", "", error=f"{type(exc).__name__}: {exc}")


def _spectra_entry(path: Path, rel: str) -> KitEntry:
    spectra = read_spectra(path)
    lo = min(s.wavelength[0] for s in spectra)
    hi = max(s.wavelength[-1] for s in spectra)
    fmt = spectra[0].meta.source_format
    return KitEntry(rel, "spectrum", fmt, len(spectra), float(lo), float(hi))


def _inspect_fits(path: Path, rel: str) -> KitEntry:
    try:
        return _spectra_entry(path, rel)
    except SpectrumReadError as exc:
        if "catalogue" not in exc.reason:
            raise
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        table = Table.read(path)
    return KitEntry(rel, "catalogue", f"FITS table, {len(table)} rows x {len(table.colnames)} columns")


def _inspect_csv(path: Path, rel: str) -> KitEntry:
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = [h.strip().lower() for h in next(reader)]
        n_rows = sum(1 for _ in reader)
    if "flux" in header and ("wavelength" in header or "wave" in header):
        return _spectra_entry(path, rel)
    return KitEntry(rel, "catalogue", f"CSV table, {n_rows} rows x {len(header)} columns")


def _inspect_npz(path: Path, rel: str, root: Path) -> KitEntry:
    with np.load(path, allow_pickle=False) as z:
        shapes = {k: z[k].shape for k in z.files}
    if {"w_array_0", "w_array_1", "b_array_0", "b_array_1"} <= set(shapes):
        n_pix = shapes["w_array_0"][0]
        return KitEntry(rel, "emulator", f"The Payne network, {n_pix} pixels")
    try:
        return _spectra_entry(path, rel)
    except SpectrumReadError:
        if len(shapes) == 1:
            (key, shape), = shapes.items()
            return KitEntry(rel, "array", f"{key} {shape}")
        raise


def inspect_kit(root: Path) -> list[KitEntry]:
    """Read every file under ``root`` (sorted) and report what each one is."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return [inspect_file(p, root) for p in files]
