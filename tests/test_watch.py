"""``specserve watch``: files appearing in a folder are streamed to a real server and appended to a
catalogue; unreadable files go to the rejects file; a restart resumes without duplicates."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table
from test_server import repo, server  # noqa: F401 - the toy-RBM repository and its served port

from specserve.runtime.client.watch import WatchState
from specserve.runtime.errors import SpecserveError

SPECSERVE = str(Path(sys.executable).with_name("specserve"))
ENV = {**os.environ, "ORT_DISABLE_TELEMETRY": "1"}


@pytest.fixture(scope="module")
def lamost(kit):
    return sorted((kit / "lamost_dr1" / "fits").glob("*.fits"))[:8]


def _watch(folder, out, address, *extra, timeout=120):
    return subprocess.run([SPECSERVE, "watch", str(folder), "--out", str(out), "--server", address, "--poll", "0.2",
                           *extra], capture_output=True, text=True, timeout=timeout, env=ENV)


def _files(out: Path) -> list[str]:
    return [str(f) for f in Table.read(out)["file"]]


def test_once_then_resume_appends_only_new_files_and_rejects_bad_ones(server, lamost, tmp_path):  # noqa: F811
    folder = tmp_path / "incoming"
    folder.mkdir()
    for f in lamost[:3]:
        shutil.copy(f, folder)
    (folder / "junk.fits").write_bytes(b"SIMPLE  = this is not a FITS file")
    out = tmp_path / "night.fits"
    first = _watch(folder, out, server, "--once")
    assert first.returncode == 0, first.stderr
    assert "rejected" in first.stderr and "junk.fits" in first.stderr
    done = _files(out)
    assert sorted(done) == sorted(str(folder / f.name) for f in lamost[:3])
    table = Table.read(out)
    p_cv = np.asarray(table["p_cv"], dtype=float)
    scored = np.isfinite(p_cv)  # a spectrum that covers too little of the grid has a note instead
    assert scored.any() and np.all((p_cv[scored] >= 0) & (p_cv[scored] <= 1))
    assert all("covers" in str(n) for n, ok in zip(table["notes"], scored) if not ok)
    rejects = Path(str(out) + ".rejects.tsv").read_text().splitlines()
    assert len(rejects) == 1 and rejects[0].startswith(str(folder / "junk.fits") + "\t")
    # more files arrive; a second run adds exactly those, and does not retry the rejected one
    for f in lamost[3:6]:
        shutil.copy(f, folder)
    second = _watch(folder, out, server, "--once")
    assert second.returncode == 0, second.stderr
    assert "3 rows and 1 rejected files already done" in second.stderr
    files = _files(out)
    assert len(files) == len(set(files)) == 6 and files[:3] == done
    assert len(Path(str(out) + ".rejects.tsv").read_text().splitlines()) == 1


def test_running_watcher_stops_on_sigterm_and_resumes_without_loss(server, lamost, tmp_path):  # noqa: F811
    folder = tmp_path / "incoming"
    folder.mkdir()
    out = tmp_path / "night.csv"
    proc = subprocess.Popen([SPECSERVE, "watch", str(folder), "--out", str(out), "--server", server, "--poll", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        for f in lamost[:4]:
            shutil.copy(f, folder)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (out.exists() and len(Table.read(out, format="ascii.csv")) == 4):
            time.sleep(0.2)
        assert out.exists() and len(Table.read(out, format="ascii.csv")) == 4
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "stopped; catalogue 4 rows" in proc.stderr.read()
    for f in lamost[4:8]:  # these arrive while nothing watches
        shutil.copy(f, folder)
    again = _watch(folder, out, server, "--once")
    assert again.returncode == 0, again.stderr
    files = [str(f) for f in Table.read(out, format="ascii.csv")["file"]]
    assert sorted(files) == sorted(str(folder / f.name) for f in lamost[:8])  # every file once


def test_unreachable_server_leaves_files_to_do(lamost, tmp_path):
    folder = tmp_path / "incoming"
    folder.mkdir()
    shutil.copy(lamost[0], folder)
    out = tmp_path / "night.fits"
    result = _watch(folder, out, "127.0.0.1:1", "--once", timeout=60)
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr
    assert not out.exists()  # nothing marked done: a later run sends the file


def test_bad_arguments_are_clear(tmp_path):
    result = subprocess.run([SPECSERVE, "watch", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c.fits")],
                            capture_output=True, text=True, timeout=60, env=ENV)
    assert result.returncode == 1 and "is not a folder" in result.stderr
    (tmp_path / "c.fits").write_text("not a catalogue")
    with pytest.raises(SpecserveError, match="cannot read the catalogue"):
        WatchState.load(tmp_path / "c.fits")


def test_results_find_their_files_by_id_even_when_object_ids_repeat(kit):
    from specserve.runtime.catalogue import Row, Sources
    from specserve.runtime.io import read_spectra

    path = sorted((kit / "lamost_dr1/fits").glob("*.fits"))[0]
    (spectrum,) = read_spectra(path)
    sources = Sources()
    sent = [sources.add(spectrum, f"copy-{i}.fits") for i in range(3)]  # one object in three files
    base = spectrum.meta.object_id
    assert [s.id for s in sent] == [base, f"{base}#2", f"{base}#3"]
    assert all(s.metadata == {} for s in sent)  # the file name is not sent
    answered = [Row(f"{base}#3"), Row(base), Row(f"{base}#2")]  # in any order
    assert [(f, r.id) for f, r in sources.pair(answered)] == [
        ("copy-2.fits", f"{base}#3"), ("copy-0.fits", base), ("copy-1.fits", f"{base}#2")]
    with pytest.raises(SpecserveError, match="not sent"):
        sources.pair([Row("someone-else")])


@pytest.mark.parametrize("suffix", [".csv", ".ecsv", ".fits"])
def test_resume_keeps_numeric_ids_and_empty_notes_as_text(tmp_path, suffix):
    """LAMOST DR5+ spectra are named by numeric obsids; a CSV read back took them for integers
    (and an all-empty notes column for masked integers), and the next append raised
    TableMergeError. Every format now resumes and appends with the ids as they were."""
    from specserve.runtime.catalogue import Row, read_catalogue

    out = tmp_path / f"night{suffix}"
    state = WatchState.load(out)
    state.append([("a.fits", Row("359910161", {"p_cv": 0.25}, ["rbm"])),
                  ("b.fits", Row("359910162", {"p_cv": 0.75}, ["rbm"]))])
    resumed = WatchState.load(out)
    assert resumed.done == {"a.fits", "b.fits"} and resumed.n_rows == 2
    resumed.append([("c.fits", Row("LAMOST J063715.90+271356.5", {"p_cv": 0.5}, ["rbm"], ["a note"]))])
    resumed.close()  # the first state was never closed, as after a crash: its rows came back from the journal
    table = read_catalogue(out)
    assert list(table["id"]) == ["359910161", "359910162", "LAMOST J063715.90+271356.5"]
    assert table["id"].dtype.kind == "U" and list(table["notes"]) == ["", "", "a note"]
    np.testing.assert_allclose(np.asarray(table["p_cv"], dtype=float), [0.25, 0.75, 0.5])


def test_catalogues_carry_units_descriptions_and_provenance(lamost, tmp_path):
    """``analyze --local`` with the shipped models, written as FITS and ECSV: each value column has
    its card's unit and a description (FITS: TUNITn/TCOMMn), and the metadata names the specserve
    version, every model used as name:version, the date and the counts. CSV keeps values only."""
    from astropy.io import fits

    from specserve.runtime.catalogue import read_catalogue

    files = [str(f) for f in lamost[:4]]
    for suffix in (".fits", ".ecsv", ".csv"):
        out = tmp_path / f"cat{suffix}"
        done = subprocess.run([SPECSERVE, "analyze", "--local", "--models", "rbm,physformer", *files, "--out", str(out)],
                              capture_output=True, text=True, timeout=300, env=ENV)
        assert done.returncode in (0, 1), done.stderr  # 1: a spectrum outside a model's coverage
        table = read_catalogue(out)
        assert len(table) == 4 and table["id"].dtype.kind == "U"
        if suffix == ".csv":
            assert table["teff"].unit is None
            continue
        assert str(table["teff"].unit) == "K" and str(table["logg"].unit) == "dex"
        assert str(table["teff_err"].unit) == "K" and table["p_cv"].unit is None
        assert "probability of class cv" in table["p_cv"].description
        assert "1-sigma" in table["feh_err"].description
        meta = table.meta
        assert meta["MODELS"] == "physformer:1, rbm:1", meta
        assert meta["NSPECTRA"] == 4 and meta["NFILES"] == 4 and meta["SPECSERV"] and meta["DATE"].startswith("20")
        # which spectrum each row is, from its file: LAMOST DR1 headers give the designation,
        # position, local MJD and g-band S/N
        for row in table:
            primary = fits.getheader(row["file"], 0)
            assert row["designation"] == primary["DESIG"]
            np.testing.assert_allclose([row["ra"], row["dec"], row["mjd"], row["lmjd"]],
                                       [primary["RA"], primary["DEC"], primary["MJD"], primary["LMJD"]], rtol=1e-12)
            assert row["snr"] == pytest.approx(primary["SN_G"])
        assert str(table["ra"].unit) == "deg" and str(table["lmjd"].unit) == "d"
        assert table.colnames[:8] == ["file", "id", "designation", "ra", "dec", "mjd", "lmjd", "snr"]
        if suffix == ".fits":
            header = fits.getheader(out, 1)
            column = table.colnames.index("teff") + 1
            assert header[f"TUNIT{column}"] == "K" and "estimate" in header[f"TCOMM{column}"]


def test_watch_catalogue_names_the_served_models_and_keeps_units_when_it_grows(server, lamost, tmp_path):  # noqa: F811
    folder = tmp_path / "incoming"
    folder.mkdir()
    shutil.copy(lamost[0], folder)
    out = tmp_path / "night.ecsv"
    assert _watch(folder, out, server, "--once").returncode == 0
    shutil.copy(lamost[1], folder)
    assert _watch(folder, out, server, "--once").returncode == 0
    from specserve.runtime.catalogue import read_catalogue

    table = read_catalogue(out)
    assert len(table) == 2 and table.meta["NSPECTRA"] == 2 and table.meta["MODELS"] == "rbm:1", table.meta
    assert "probability" in table["p_cv"].description
