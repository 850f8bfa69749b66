"""Catalogues: ``(file, row)`` pairs as an astropy Table, written as CSV or FITS (what
``specserve analyze --out`` and ``specserve watch`` write)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from specserve.runtime.client.client import Row


def catalogue_table(rows: Sequence[tuple[str, Row]]):
    """``(file, row)`` pairs as an astropy Table: file, id, one float column per value (NaN where a
    row has none), models, notes."""
    from astropy.table import Table

    value_names = sorted({k for _, row in rows for k in row.values})
    table = Table()
    table["file"] = [f for f, _ in rows]
    table["id"] = [row.id for _, row in rows]
    for name in value_names:
        table[name] = np.array([row.values.get(name, np.nan) for _, row in rows], dtype=np.float64)
    table["models"] = [";".join(row.models) for _, row in rows]
    table["notes"] = ["; ".join(row.notes + ([row.error] if row.error else [])) for _, row in rows]
    return table


def catalogue_format(path: str | Path) -> str:
    """astropy's format for a catalogue path: FITS for .fits/.fit, CSV otherwise."""
    return "fits" if Path(path).suffix.lower() in (".fits", ".fit") else "ascii.csv"


def write_catalogue(path: str | Path, rows: Sequence[tuple[str, Row]]) -> None:
    """Write ``(file, row)`` pairs as CSV, or as a FITS table when the name ends in .fits/.fit."""
    catalogue_table(rows).write(Path(path), format=catalogue_format(path), overwrite=True)
