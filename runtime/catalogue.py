"""Catalogue rows: one spectrum's results flattened (:class:`Row`), the file each spectrum came
from (:class:`Sources`), and catalogue tables written as CSV, ECSV or FITS. Shared by the gRPC client
(``specserve analyze``, ``specserve watch``) and the embedded runtime (``specserve analyze --local``),
so both write the same catalogue, and by ``specserve reprocess`` (its part files are Parquet).

A catalogue made with a :class:`Provenance` carries each value column's unit and description from
the model cards (FITS: ``TUNITn``/``TCOMMn``; ECSV: its header; Parquet: each field's metadata) and, in its
metadata, the
specserve version, each model's ``name:version``, the date, and the numbers of files and spectra.
CSV keeps only the values.

:class:`CatalogueWriter` writes rows as they arrive: a CSV or ECSV catalogue is appended to, a
FITS or Parquet one (formats that cannot grow in place) gets its rows in an appended journal beside
it, and is written once from it when the writer closes."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from specserve.runtime.errors import SpecserveError
from specserve.runtime.kinds import KINDS
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
    identity: dict[str, str | float] = field(default_factory=dict)
    """The spectrum's identity from its file (:data:`IDENTITY` columns), set by :meth:`Sources.pair`."""

    @property
    def ok(self) -> bool:
        return not self.error


IDENTITY: dict[str, tuple[str, str]] = {
    "designation": ("", "the survey's designation of the object, from the file"),
    "obsid": ("", "the survey's observation id, from the file"),
    "ra": ("deg", "right ascension, from the file"),
    "dec": ("deg", "declination, from the file"),
    "mjd": ("d", "modified Julian date of the observation, from the file"),
    "lmjd": ("d", "LAMOST local modified Julian date of the observation, from the file"),
    "snr": ("", "signal-to-noise ratio per pixel, from the file (LAMOST: g band)"),
}
"""Columns that say which spectrum a row is, where its file has them: (unit, description)."""
TEXT_IDENTITY = ("designation", "obsid")


def identity_of(meta) -> dict[str, str | float]:
    """The :data:`IDENTITY` values a reader found (a SpectrumMeta); absent ones are left out."""
    extra = meta.extra
    found = {
        "designation": extra.get("designation"),
        "obsid": extra.get("obsid"),
        "ra": meta.ra,
        "dec": meta.dec,
        "mjd": extra.get("mjd"),
        "lmjd": extra.get("lmjd"),
        "snr": extra.get("snr", extra.get("snr_g")),
    }
    out: dict[str, str | float] = {}
    for key, value in found.items():
        if value in (None, ""):
            continue
        try:
            out[key] = str(value).strip() if key in TEXT_IDENTITY else float(value)
        except (TypeError, ValueError):
            continue  # a header value that is not a number: left out, not guessed
    return out


class Sources:
    """Which file each spectrum of one stream came from, by spectrum id. Ids are made unique within
    the stream (a repeated object id gets ``#2``, ``#3``...), so every result finds its file by its
    own id, never by its position; the file name itself is not sent."""

    def __init__(self) -> None:
        self._files: dict[str, str] = {}
        self._identity: dict[str, dict[str, str | float]] = {}
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
        self._identity[sid] = identity_of(spectrum.meta)
        return SpectrumInput.from_spectrum(spectrum, id=sid)

    def pair(self, rows: Sequence[Row]) -> list[tuple[str, Row]]:
        """``(file, row)`` for each result, found by the result's id; each row gets its spectrum's
        identity from the file."""
        try:
            pairs = [(self._files[row.id], row) for row in rows]
        except KeyError as exc:
            raise SpecserveError(f"the server answered for spectrum {exc.args[0]!r}, which was not sent") from None
        for _, row in pairs:
            row.identity = self._identity[row.id]
        return pairs


TEXT_DESCRIPTIONS = {
    "file": "the file the spectrum was read from",
    "id": "the spectrum's identifier in its file (designation, obsid or object name)",
    "models": "the models that gave values for this spectrum",
    "notes": "why a model gave no values (coverage, ...), or why the spectrum was rejected",
}


@dataclass(frozen=True)
class Provenance:
    """The models a catalogue's values come from (``name:version``) and the unit and description
    of every value column, from their cards (:data:`~.kinds.KINDS`)."""

    models: tuple[str, ...] = ()
    """``name:version`` of each model."""
    columns: dict[str, tuple[str, str]] = field(default_factory=dict)

    @classmethod
    def of(cls, models: Iterable[tuple[str, str, str, Sequence[str], Sequence[str], Sequence[str]]]) -> Provenance:
        """From ``(name, version, kind, class names, label names, label units)`` of each model."""
        names, columns = [], {}
        for name, version, kind, classes, labels, units in models:
            names.append(f"{name}:{version}")
            describe = KINDS[kind].columns if kind in KINDS else None
            if describe is not None:
                columns.update(describe(tuple(classes), tuple(labels), tuple(units)))
        return cls(tuple(sorted(names)), columns)

    @classmethod
    def from_models(cls, models) -> Provenance:
        """From loaded models (name -> a model with ``ready``, ``version`` and ``card``)."""
        return cls.of((name, m.version, m.card.kind, m.card.class_names, m.card.label_names, m.card.label_units)
                      for name, m in models.items() if m.ready)


def specserve_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("specserve")
    except metadata.PackageNotFoundError:
        return "unknown"


def describe(table, provenance: Provenance | None) -> None:
    """Set the units and descriptions of ``table``'s columns and its metadata (FITS-sized keys)."""
    import astropy.units as u

    for name in table.colnames:
        if name in TEXT_DESCRIPTIONS:
            table[name].description = TEXT_DESCRIPTIONS[name]
        elif name in IDENTITY:
            unit, text = IDENTITY[name]
            table[name].unit = u.Unit(unit) if unit else None
            table[name].description = text
        elif provenance is not None and name in provenance.columns:
            unit, text = provenance.columns[name]
            table[name].unit = u.Unit(unit) if unit else None
            table[name].description = text
    if provenance is None:
        return
    models = provenance.models
    if "models" in table.colnames:  # the models that gave values here, not every one served
        used = {m for cell in table["models"] for m in str(cell).split(";") if m}
        models = tuple(m for m in models if m in used)  # the column holds name:version too
    table.meta.update({
        "SPECSERV": specserve_version(),
        "MODELS": ", ".join(models),
        "DATE": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
        "NFILES": len(set(table["file"])) if "file" in table.colnames else 0,
        "NSPECTRA": len(table),
    })


def identity_columns(rows: Sequence[tuple[str, Row]]) -> list[str]:
    """The :data:`IDENTITY` columns some row has, in their order."""
    present = {k for _, row in rows for k in row.identity}
    return [name for name in IDENTITY if name in present]


def column_order(names: Iterable[str]) -> list[str]:
    """A catalogue's column order: file, id, identity, values (sorted), models, notes."""
    names = set(names)
    fixed = {"file", "id", "models", "notes", *IDENTITY}
    return ([n for n in ("file", "id") if n in names] + [n for n in IDENTITY if n in names]
            + sorted(names - fixed) + [n for n in ("models", "notes") if n in names])


def catalogue_table(rows: Sequence[tuple[str, Row]], provenance: Provenance | None = None):
    """``(file, row)`` pairs as an astropy Table: file, id, one float column per value (NaN where a
    row has none), models, notes; described by ``provenance`` when given."""
    from astropy.table import Table

    value_names = sorted({k for _, row in rows for k in row.values})
    table = Table()
    table["file"] = [f for f, _ in rows]
    table["id"] = [row.id for _, row in rows]
    for name in identity_columns(rows):
        if name in TEXT_IDENTITY:
            table[name] = [str(row.identity.get(name, "")) for _, row in rows]
        else:
            table[name] = np.array([row.identity.get(name, np.nan) for _, row in rows], dtype=np.float64)
    for name in value_names:
        table[name] = np.array([row.values.get(name, np.nan) for _, row in rows], dtype=np.float64)
    table["models"] = [";".join(row.models) for _, row in rows]
    table["notes"] = ["; ".join(row.notes + ([row.error] if row.error else [])) for _, row in rows]
    describe(table, provenance)
    return table


TEXT_COLUMNS = ("file", "id", "models", "notes", *TEXT_IDENTITY)
"""Catalogue columns that are text whatever they hold (ids may be all digits, notes all empty)."""
FORMATS = {".fits": "fits", ".fit": "fits", ".ecsv": "ascii.ecsv", ".csv": "ascii.csv", ".parquet": "parquet",
           ".pq": "parquet"}


def catalogue_format(path: str | Path) -> str:
    """astropy's format name for a catalogue path: FITS for .fits/.fit, ECSV (units and dtypes kept
    in its header) for .ecsv, Parquet for .parquet/.pq, CSV otherwise."""
    return FORMATS.get(Path(path).suffix.lower(), "ascii.csv")


PARQUET_META = b"specserve"
"""The Parquet schema metadata key holding the table's metadata (JSON)."""


def _write_parquet(table, path: Path) -> None:
    """A catalogue as one Parquet file with pyarrow: each field's unit and description in its
    field metadata, the table's metadata as JSON under :data:`PARQUET_META` (any Parquet reader
    reads the values; :func:`read_catalogue` restores the rest)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    fields, arrays = [], []
    for name in table.colnames:
        column = table[name]
        values = np.asarray(column)
        array = pa.array(values.tolist(), type=pa.string()) if values.dtype.kind in "US" else pa.array(values)
        meta = {}
        if column.unit is not None:
            meta[b"unit"] = column.unit.to_string().encode()
        if column.description:
            meta[b"description"] = str(column.description).encode()
        fields.append(pa.field(name, array.type, metadata=meta or None))
        arrays.append(array)
    schema = pa.schema(fields, metadata={PARQUET_META: json.dumps(dict(table.meta), default=str).encode()})
    pq.write_table(pa.Table.from_arrays(arrays, schema=schema), path)


def _read_parquet(path: Path):
    import json

    import astropy.units as u
    import pyarrow.parquet as pq
    from astropy.table import Table

    # one thread: astropy's own Parquet reader (through pandas) made the interpreter abort at exit
    # with pyarrow 26 ("terminate called without an active exception")
    data = pq.read_table(path, use_threads=False)
    table = Table()
    for column in data.schema:
        values = data.column(column.name).to_numpy(zero_copy_only=False)
        table[column.name] = np.asarray(values, dtype=str) if values.dtype == object else values
        meta = column.metadata or {}
        if b"unit" in meta:
            table[column.name].unit = u.Unit(meta[b"unit"].decode(), parse_strict="silent")
        if b"description" in meta:
            table[column.name].description = meta[b"description"].decode()
    table.meta.update(json.loads((data.schema.metadata or {}).get(PARQUET_META, b"{}")))
    return table


def read_catalogue(path: str | Path):
    """A catalogue written by :func:`write_catalogue` (or appended to by ``watch``), with the text
    columns read as text: a CSV reader would take numeric ids such as LAMOST obsids for integers
    and an all-empty ``notes`` column for masked integers, and the next append would not stack."""
    from astropy.table import MaskedColumn, Table

    fmt = catalogue_format(path)
    if fmt == "parquet":
        table = _read_parquet(Path(path))
    elif fmt == "ascii.csv":
        table = Table.read(Path(path), format=fmt, converters={name: str for name in TEXT_COLUMNS})
    elif fmt == "fits":
        import warnings

        import astropy.units as u
        from astropy.io import fits

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # units outside the FITS standard: restored below
            table = Table.read(Path(path), format=fmt)
        header = fits.getheader(path, 1)
        for i, name in enumerate(table.colnames, start=1):
            if table[name].unit is None and f"TUNIT{i}" in header:
                table[name].unit = u.Unit(header[f"TUNIT{i}"], parse_strict="silent")
            if f"TCOMM{i}" in table.meta:  # the column's description, not the table's metadata
                comment = table.meta.pop(f"TCOMM{i}")
                table[name].description = table[name].description or comment
    else:
        table = Table.read(Path(path), format=fmt)
    for name in TEXT_COLUMNS:
        if name in table.colnames:
            column = table[name]
            text = column.filled("") if isinstance(column, MaskedColumn) else column
            table.replace_column(name, np.asarray(text, dtype=str))
    return table


def write_table(table, path: str | Path, fmt: str) -> None:
    """Write a catalogue table in astropy's format ``fmt``. A FITS table gets ``TUNITn`` for every
    unit (astropy leaves out those outside the FITS standard, such as dex, which catalogues use
    all the same) and a ``TCOMMn`` comment per described column."""
    if fmt == "parquet":
        _write_parquet(table, Path(path))
        return
    if fmt != "fits":
        table.write(Path(path), format=fmt, overwrite=True)
        return
    import warnings

    from astropy.io import fits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "dex could not be saved in native FITS format": written below
        table.write(Path(path), format=fmt, overwrite=True)
    with fits.open(path, mode="update") as hdus:
        header = hdus[1].header
        for i, name in enumerate(table.colnames, start=1):
            if table[name].unit is not None:
                header[f"TUNIT{i}"] = table[name].unit.to_string()
            if table[name].description:
                header[f"TCOMM{i}"] = table[name].description[:68]


def write_catalogue(path: str | Path, rows: Sequence[tuple[str, Row]], provenance: Provenance | None = None) -> None:
    """Write ``(file, row)`` pairs as CSV, ECSV (.ecsv), Parquet (.parquet) or a FITS table (.fits/.fit)."""
    write_table(catalogue_table(rows, provenance), path, catalogue_format(path))


def stack_tables(old, new):
    """``old`` then ``new`` rows with the union of their columns (a value column one side lacks is
    NaN there, a text column empty), in catalogue column order."""
    from astropy.table import vstack

    for a, b in ((old, new), (new, old)):
        for name in b.colnames:
            if name not in a.colnames:
                a[name] = np.full(len(a), np.nan) if b[name].dtype.kind == "f" else [""] * len(a)
    order = column_order(old.colnames)
    return vstack([old[order], new[order]], join_type="exact", metadata_conflicts="silent")


def _body(table, fmt: str) -> str:
    """``table``'s data lines in ``fmt`` (CSV or ECSV) without the header: what an append adds.
    astropy does the quoting."""
    import io

    buffer = io.StringIO()
    table.write(buffer, format=fmt)
    lines = buffer.getvalue().splitlines(keepends=True)
    start = 0
    while start < len(lines) and lines[start].startswith("#"):
        start += 1
    return "".join(lines[start + 1:])  # after the line of column names


def _cut_partial_line(path: Path) -> None:
    """Drop a last line cut short (a machine that stopped mid-write), so the file reads again."""
    with open(path, "rb+") as f:
        size = f.seek(0, 2)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        start = max(0, size - (1 << 20))
        f.seek(start)
        cut = f.read().rfind(b"\n")
        f.truncate(start + cut + 1 if cut >= 0 else 0)


class CatalogueWriter:
    """Catalogue rows written as they arrive, so that a crash loses nothing already answered, and
    never the whole file again per batch (which costs O(N^2) over an archive).

    - CSV and ECSV: each batch is appended to the catalogue itself, in one write, flushed and synced.
    - FITS and Parquet cannot grow in place: each batch is appended to a journal beside the
      catalogue (``.NAME.rows.ecsv``), and :meth:`close` writes the catalogue once (a temporary file
      renamed over it) from its earlier rows and the journal, then removes the journal.
    - An ECSV catalogue is rewritten once at :meth:`close` for its final metadata (counts, date).

    The columns are those of the first batch; a batch with a column not seen yet (a model that had
    not applied so far) rewrites the appended file once with the wider set.

    With ``resume`` the catalogue and journal already there are read: :attr:`files` holds the
    files done, and new rows follow them. Otherwise they are replaced."""

    def __init__(self, path: str | Path, provenance: Provenance | None = None, *, resume: bool = False):
        self.path = Path(path)
        self.fmt = catalogue_format(self.path)
        self.provenance = provenance
        self.in_place = self.fmt in ("ascii.csv", "ascii.ecsv")
        self.journal = self.path if self.in_place else self.path.with_name(f".{self.path.name}.rows.ecsv")
        self._journal_fmt = self.fmt if self.in_place else "ascii.ecsv"
        self.columns: list[str] | None = None
        self.files: set[str] = set()
        self.n_rows = 0
        self._base = None
        """FITS, Parquet: the catalogue's rows from before this writer (resume)."""
        if resume:
            self._resume()
        elif not self.in_place:
            self.journal.unlink(missing_ok=True)

    def _read(self, path: Path):
        try:
            table = read_catalogue(path)
        except Exception as exc:  # noqa: BLE001 - astropy raises many types for a bad file
            raise SpecserveError(f"cannot read the catalogue {path} to resume: {exc}") from exc
        if "file" not in table.colnames:
            raise SpecserveError(f"{path} has no 'file' column: not a specserve catalogue")
        return table

    def _resume(self) -> None:
        if not self.in_place and self.path.exists():
            self._base = self._read(self.path)
            self.files.update(str(f) for f in self._base["file"])
            self.n_rows = len(self._base)
        if self.journal.exists() and self.journal.stat().st_size:
            _cut_partial_line(self.journal)
            rows = self._read(self.journal)
            if self._base is not None:  # a close cut short after the rename: its journal rows are in the base
                keep = np.array([str(f) not in self.files for f in rows["file"]], dtype=bool)
                if not keep.all():
                    rows = rows[keep]
                    write_table(rows, self.journal, self._journal_fmt)
            self.columns = list(rows.colnames)
            self.files.update(str(f) for f in rows["file"])
            self.n_rows += len(rows)

    def add(self, rows: Sequence[tuple[str, Row]]) -> None:
        """Append ``(file, row)`` pairs."""
        if not rows:
            return
        table = catalogue_table(rows, None)
        if self.columns is None:
            self.columns = column_order(table.colnames)
            write_table(table[self.columns], self.journal, self._journal_fmt)
        else:
            new = [name for name in table.colnames if name not in self.columns]
            if new:
                self._widen({name: table[name].dtype.kind for name in new})
            for name in self.columns:
                if name not in table.colnames:
                    table[name] = np.full(len(table), np.nan) if name not in TEXT_COLUMNS and name not in (
                        TEXT_IDENTITY) else [""] * len(table)
            with open(self.journal, "a") as f:
                f.write(_body(table[self.columns], self._journal_fmt))
                f.flush()
                os.fsync(f.fileno())
        self.files.update(f for f, _ in rows)
        self.n_rows += len(rows)

    def _widen(self, kinds: dict[str, str]) -> None:
        """Rewrite the appended file once with new columns (NaN, or empty text, in earlier rows)."""
        table = read_catalogue(self.journal)
        for name, kind in kinds.items():
            table[name] = np.full(len(table), np.nan) if kind == "f" else [""] * len(table)
        self.columns = column_order(table.colnames)
        tmp = self.journal.with_name(f".{self.journal.name}.tmp")
        write_table(table[self.columns], tmp, self._journal_fmt)
        os.replace(tmp, self.journal)

    def table(self):
        """Every row so far, described (units, descriptions, metadata)."""
        parts = [t for t in (self._base, self._read(self.journal) if self.columns is not None else None)
                 if t is not None]
        if not parts:
            table = catalogue_table([], None)
        else:
            table = parts[0] if len(parts) == 1 else stack_tables(*parts)
        describe(table, self.provenance)
        return table

    def close(self) -> None:
        """Write the catalogue's final form (see the class); a CSV is complete already. Without
        any row (none added, none resumed from a journal) nothing is written."""
        if self.fmt == "ascii.csv" or self.columns is None:
            return
        table = self.table()
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        write_table(table, tmp, self.fmt)
        os.replace(tmp, self.path)
        if not self.in_place:
            self.journal.unlink(missing_ok=True)

    def __enter__(self) -> CatalogueWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
