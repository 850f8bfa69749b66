"""Catalogues: every format round-trips with its dtypes, units, descriptions and provenance; rows
are appended as they arrive (never the whole file rewritten per batch), and a writer stopped
without closing (a crash) is resumed from what it wrote; ``analyze`` killed mid-run keeps the
rows it had."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from specserve.runtime.catalogue import CatalogueWriter, Provenance, Row, read_catalogue, write_catalogue

FORMATS = (".csv", ".ecsv", ".fits", ".parquet")
PROVENANCE = Provenance(("physformer:2", "rbm:1"), {
    "p_cv": ("", "probability of class cv"), "teff": ("K", "teff: estimate"), "feh": ("dex", "feh: estimate")})
SPECSERVE = str(Path(sys.executable).with_name("specserve"))


def _rows(start: int, n: int, values=("p_cv", "teff", "feh")) -> list[tuple[str, Row]]:
    rows = []
    for i in range(start, start + n):
        row = Row(str(359910161 + i), {k: 0.1 * i + j for j, k in enumerate(values)}, ["rbm:1", "physformer:2"],
                  [] if i % 2 else [f"note {i}, with a comma"])
        row.identity = {"obsid": str(359910161 + i), "ra": 10.0 + i, "dec": -5.0 - i, "snr": 20.0 + i}
        rows.append((f"/archive/{i:03d}.fits", row))
    return rows


def _check(table, rows, units: bool) -> None:
    assert list(table["file"]) == [f for f, _ in rows]
    assert list(table["id"]) == [r.id for _, r in rows] and table["id"].dtype.kind == "U"
    assert list(table["obsid"]) == [r.identity["obsid"] for _, r in rows] and table["obsid"].dtype.kind == "U"
    assert table["notes"].dtype.kind == "U" and list(table["notes"]) == ["; ".join(r.notes) for _, r in rows]
    for name in ("p_cv", "teff", "feh"):
        expected = [r.values.get(name, np.nan) for _, r in rows]
        got = np.asarray(table[name].filled(np.nan) if hasattr(table[name], "filled") else table[name], dtype=float)
        np.testing.assert_allclose(got, expected, rtol=1e-12, equal_nan=True)
        assert table[name].dtype.kind == "f"
    if not units:
        return
    assert str(table["teff"].unit) == "K" and str(table["feh"].unit) == "dex" and str(table["ra"].unit) == "deg"
    assert table["p_cv"].description == "probability of class cv"
    assert "right ascension" in table["ra"].description
    assert table.meta["MODELS"] == "physformer:2, rbm:1" and table.meta["NSPECTRA"] == len(rows)
    assert table.meta["NFILES"] == len(rows) and table.meta["SPECSERV"] and table.meta["DATE"].startswith("20")
    assert not any(key.startswith("TCOMM") for key in table.meta)  # descriptions live on their columns


@pytest.mark.parametrize("suffix", FORMATS)
def test_every_format_round_trips_with_units_and_provenance(tmp_path, suffix):
    rows = _rows(0, 5)
    out = tmp_path / f"cat{suffix}"
    write_catalogue(out, rows, PROVENANCE)
    _check(read_catalogue(out), rows, units=suffix != ".csv")


def test_parquet_is_plain_parquet_for_other_readers(tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "cat.parquet"
    write_catalogue(out, _rows(0, 3), PROVENANCE)
    data = pq.read_table(out)
    assert data.column("obsid").to_pylist() == ["359910161", "359910162", "359910163"]
    assert data.schema.field("teff").metadata[b"unit"] == b"K"


@pytest.mark.parametrize("suffix", FORMATS)
def test_writer_appends_and_resumes_after_a_crash(tmp_path, suffix):
    out = tmp_path / f"night{suffix}"
    first = CatalogueWriter(out, PROVENANCE)
    first.add(_rows(0, 3))
    journal = first.journal
    size = journal.stat().st_size
    head = journal.read_bytes()
    first.add(_rows(3, 2))
    # appended, not rewritten: the bytes written before are still the file's beginning
    assert journal.stat().st_size > size and journal.read_bytes()[:size] == head
    if suffix in (".fits", ".parquet"):
        assert not out.exists()  # written once, at close, from the journal beside it
    # no close(): the process died. A new writer resumes from what is on disk
    resumed = CatalogueWriter(out, PROVENANCE, resume=True)
    assert resumed.files == {f for f, _ in _rows(0, 5)} and resumed.n_rows == 5
    resumed.add(_rows(5, 2))
    resumed.close()
    _check(read_catalogue(out), _rows(0, 7), units=suffix != ".csv")
    assert not (tmp_path / f".night{suffix}.rows.ecsv").exists()
    # a second resumed run adds to the finished catalogue
    again = CatalogueWriter(out, PROVENANCE, resume=True)
    assert again.n_rows == 7
    again.add(_rows(7, 1))
    again.close()
    _check(read_catalogue(out), _rows(0, 8), units=suffix != ".csv")


@pytest.mark.parametrize("suffix", (".csv", ".ecsv"))
def test_a_line_cut_short_is_dropped_on_resume(tmp_path, suffix):
    out = tmp_path / f"night{suffix}"
    writer = CatalogueWriter(out, PROVENANCE)
    writer.add(_rows(0, 4))
    with open(out, "ab") as f:
        f.write(b"/archive/999.fits,3599")  # a machine that stopped mid-write
    resumed = CatalogueWriter(out, PROVENANCE, resume=True)
    assert resumed.n_rows == 4 and "/archive/999.fits" not in resumed.files
    resumed.close()
    _check(read_catalogue(out), _rows(0, 4), units=suffix == ".ecsv")


@pytest.mark.parametrize("suffix", (".csv", ".fits"))
def test_a_column_seen_late_widens_the_catalogue_once(tmp_path, suffix):
    out = tmp_path / f"night{suffix}"
    with CatalogueWriter(out, PROVENANCE) as writer:
        writer.add(_rows(0, 2, values=("p_cv",)))
        writer.add(_rows(2, 2))  # teff and feh appear
        writer.add(_rows(4, 1, values=("p_cv",)))
    table = read_catalogue(out)
    _check(table, _rows(0, 2, values=("p_cv",)) + _rows(2, 2) + _rows(4, 1, values=("p_cv",)),
           units=suffix == ".fits")


def test_a_resumed_fits_close_cut_after_the_rename_counts_no_row_twice(tmp_path):
    """close() writes the catalogue, then removes the journal; stopped between the two, the next
    writer finds the journal's rows in the catalogue already and drops them from the journal."""
    out = tmp_path / "night.fits"
    writer = CatalogueWriter(out, PROVENANCE)
    writer.add(_rows(0, 3))
    kept = writer.journal.read_bytes()
    writer.close()
    writer.journal.write_bytes(kept)  # as if the unlink never happened
    resumed = CatalogueWriter(out, PROVENANCE, resume=True)
    assert resumed.n_rows == 3
    resumed.add(_rows(3, 1))
    resumed.close()
    _check(read_catalogue(out), _rows(0, 4), units=True)


def test_analyze_killed_mid_run_keeps_the_rows_it_had(kit, tmp_path):
    """`analyze --local` appends each batch as it is answered: SIGKILLed halfway, the catalogue
    holds whole rows of real results, and only those."""
    files = sorted((kit / "lamost_dr1" / "fits").glob("*.fits"))
    out = tmp_path / "cat.csv"
    proc = subprocess.Popen([SPECSERVE, "analyze", "--local", "--models", "rbm,physformer", "--batch", "4",
                             *map(str, files), "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "ORT_DISABLE_TELEMETRY": "1"})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_text().count("\n") >= 13:  # header + 3 batches
                break
            time.sleep(0.02)
        assert proc.poll() is None, "analyze finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    table = read_catalogue(out)
    assert 12 <= len(table) < len(files)
    assert list(table["file"]) == [str(f) for f in files[: len(table)]]
    assert np.isfinite(np.asarray(table["p_cv"], dtype=float)).mean() > 0.8
