"""Catalogue rows: one spectrum's results flattened (:class:`Row`), the file each spectrum came
from (:class:`Sources`), and catalogue tables written as CSV, ECSV or FITS. Shared by the gRPC client
(``specserve analyze``, ``specserve watch``) and the embedded runtime (``specserve analyze --local``),
so both write the same catalogue.

A catalogue made with a :class:`Provenance` carries each value column's unit and description from
the model cards (FITS: ``TUNITn``/``TCOMMn``; ECSV: its header) and, in its metadata, the
specserve version, each model's ``name:version``, the date, and the numbers of files and spectra.
CSV keeps only the values."""

from __future__ import annotations

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
    """Write ``(file, row)`` pairs as CSV, ECSV (.ecsv) or a FITS table (.fits/.fit)."""
    write_table(catalogue_table(rows, provenance), path, catalogue_format(path))
