"""Catalogue rows: one spectrum's results flattened (:class:`Row`), the file each spectrum came
from (:class:`Sources`), and catalogue tables written as CSV or FITS. Shared by the gRPC client
(``specserve analyze``, ``specserve watch``) and the embedded runtime (``specserve analyze --local``),
so both write the same catalogue."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from specserve.runtime.errors import SpecserveError
from specserve.runtime.spectrum import Spectrum, SpectrumInput


@dataclass
class Row:
    """One spectrum's results, flattened for a catalogue."""

    id: str
    values: dict[str, float] = field(default_factory=dict)
    models: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str = ""
    model_spectra: dict[str, np.ndarray] = field(default_factory=dict)
    """Model name -> its reconstruction on its grid (when asked for and produced)."""

    @property
    def ok(self) -> bool:
        return not self.error


class Sources:
    """Which file each spectrum of one stream came from, by spectrum id. Ids are made unique within
    the stream (a repeated object id gets ``#2``, ``#3``...), so every result finds its file by its
    own id, never by its position; the file name itself is not sent."""

    def __init__(self) -> None:
        self._files: dict[str, str] = {}
        self._seen: dict[str, int] = {}

    def add(self, spectrum: Spectrum, path: str | Path) -> SpectrumInput:
        """The request for ``spectrum`` read from ``path``, under an id unique in this stream."""
        base = spectrum.meta.object_id
        n = self._seen.get(base, 0)
        sid = base
        while sid in self._files:
            n += 1
            sid = f"{base}#{n + 1}"
        self._seen[base] = n
        self._files[sid] = str(path)
        return SpectrumInput.from_spectrum(spectrum, id=sid)

    def pair(self, rows: Sequence[Row]) -> list[tuple[str, Row]]:
        """``(file, row)`` for each result, found by the result's id."""
        try:
            return [(self._files[row.id], row) for row in rows]
        except KeyError as exc:
            raise SpecserveError(f"the server answered for spectrum {exc.args[0]!r}, which was not sent") from None


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


TEXT_COLUMNS = ("file", "id", "models", "notes")
"""Catalogue columns that are text whatever they hold (ids may be all digits, notes all empty)."""
FORMATS = {".fits": "fits", ".fit": "fits", ".ecsv": "ascii.ecsv", ".csv": "ascii.csv"}


def catalogue_format(path: str | Path) -> str:
    """astropy's format for a catalogue path: FITS for .fits/.fit, ECSV (units and dtypes kept in
    its header) for .ecsv, CSV otherwise."""
    return FORMATS.get(Path(path).suffix.lower(), "ascii.csv")


def read_catalogue(path: str | Path):
    """A catalogue written by :func:`write_catalogue` (or appended to by ``watch``), with the text
    columns read as text: a CSV reader would take numeric ids such as LAMOST obsids for integers
    and an all-empty ``notes`` column for masked integers, and the next append would not stack."""
    from astropy.table import MaskedColumn, Table

    fmt = catalogue_format(path)
    if fmt == "ascii.csv":
        table = Table.read(Path(path), format=fmt, converters={name: str for name in TEXT_COLUMNS})
    else:
        table = Table.read(Path(path), format=fmt)
    for name in TEXT_COLUMNS:
        if name in table.colnames:
            column = table[name]
            text = column.filled("") if isinstance(column, MaskedColumn) else column
            table.replace_column(name, np.asarray(text, dtype=str))
    return table


def write_catalogue(path: str | Path, rows: Sequence[tuple[str, Row]]) -> None:
    """Write ``(file, row)`` pairs as CSV, or as a FITS table when the name ends in .fits/.fit."""
    catalogue_table(rows).write(Path(path), format=catalogue_format(path), overwrite=True)
