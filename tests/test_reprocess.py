"""``specserve reprocess``: an archive of real LAMOST files (plus corrupt ones) through the shipped
models on real Dask clusters, a local one and one started with ``dask scheduler`` / ``dask worker``,
with a worker killed by SIGKILL mid-run: every readable file in the catalogue exactly once,
every corrupt one in the rejects table, and a rerun that skips what is done."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("distributed", reason="the archive extra (dask distributed) is part of `make test`")

from specserve.runtime.archive.reprocess import Job, done_files, parts_folder, rejects_path, reprocess  # noqa: E402
from specserve.runtime.catalogue import read_catalogue  # noqa: E402

BIN = Path(sys.executable).parent
ENV = {**os.environ, "ORT_DISABLE_TELEMETRY": "1"}
MODELS = ("rbm", "physformer")


@pytest.fixture(scope="module")
def archive(kit, tmp_path_factory):
    """An archive in nested folders: every kit LAMOST DR1 file (links) and three corrupt files."""
    root = tmp_path_factory.mktemp("archive")
    sources = sorted((kit / "lamost_dr1" / "fits").glob("*.fits"))
    assert len(sources) >= 100
    readable = []
    for i, source in enumerate(sources):
        folder = root / f"night-{i % 4}" / f"plate-{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / source.name).symlink_to(source)
        readable.append(str(folder / source.name))
    corrupt = [root / "night-0" / "truncated.fits", root / "night-1" / "notfits.fits", root / "night-2" / "empty.fits"]
    corrupt[0].write_bytes(sources[0].read_bytes()[:5000])
    corrupt[1].write_bytes(b"SIMPLE  = this is not a FITS file")
    corrupt[2].write_bytes(b"")
    return root, sorted(readable), sorted(str(p) for p in corrupt)


def _kill_when_parts(parts: Path, pid: int, after: int, deadline: float, record: dict) -> threading.Thread:
    """SIGKILL ``pid`` once ``after`` part files exist (the run is then under way, not done)."""

    def run():
        while time.monotonic() < deadline:
            if parts.is_dir() and len(list(parts.glob("part-*.parquet"))) >= after:
                record["parts_at_kill"] = len(list(parts.glob("*.parquet")))
                os.kill(pid, signal.SIGKILL)
                record["killed"] = True
                return
            time.sleep(0.02)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _check_exactly_once(out: Path, readable: list[str], corrupt: list[str]) -> None:
    table = read_catalogue(out)
    counts = Counter(str(f) for f in table["file"])
    assert sorted(counts) == readable, set(readable) ^ set(counts)
    assert max(counts.values()) == 1, [f for f, n in counts.items() if n > 1]
    rejects = read_catalogue(rejects_path(out))
    assert sorted(str(f) for f in rejects["file"]) == corrupt
    assert all(len(str(reason)) > 5 for reason in rejects["reason"])
    # the values are real: nearly every LAMOST spectrum got the CV probability, and a row without
    # one says why; units came along
    p_cv = np.asarray(table["p_cv"].filled(np.nan) if hasattr(table["p_cv"], "filled") else table["p_cv"], dtype=float)
    assert np.isfinite(p_cv).mean() > 0.9
    assert all(str(note) for note, p in zip(table["notes"], p_cv) if not np.isfinite(p))
    assert str(table["teff"].unit) == "K" and table.meta["MODELS"] == "physformer:1, rbm:1"
    assert table.meta["NSPECTRA"] == len(readable) and table.meta["NFILES"] == len(readable)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_on_a_dask_scheduler_with_a_worker_killed_mid_run(archive, tmp_path):
    """The issue's "done when": `dask scheduler`, two `dask worker` processes, one SIGKILLed while
    the run is under way; the catalogue holds every readable file exactly once, the rejects table
    every corrupt one; a rerun does nothing more."""
    root, readable, corrupt = archive
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for _ in range(2):
            procs.append(subprocess.Popen([str(BIN / "dask"), "worker", address, "--nthreads", "1", "--no-nanny",
                                           "--no-dashboard"], env=ENV, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        from distributed import Client

        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=120)
        out = tmp_path / "dr1.fits"
        record: dict = {}
        killer = _kill_when_parts(parts_folder(out), procs[2].pid, 3, time.monotonic() + 300, record)
        done = subprocess.run([str(BIN / "specserve"), "reprocess", str(root), "--out", str(out), "--scheduler",
                               address, "--batch-files", "2", "--models", ",".join(MODELS)],
                              capture_output=True, text=True, timeout=600, env=ENV)
        killer.join(timeout=1)
        assert done.returncode == 0, done.stderr[-3000:]
        assert record.get("killed"), "the run ended before a worker could be killed"
        total_parts = len(list(parts_folder(out).glob("*.parquet")))
        assert record["parts_at_kill"] < total_parts, (record, total_parts)  # killed mid-run, not after
        assert procs[2].wait(timeout=10) == -signal.SIGKILL
        _check_exactly_once(out, readable, corrupt)
        assert f"{len(readable)} rows" in done.stdout and f"{len(corrupt)} files" in done.stdout, done.stdout
        # the rerun finds everything done (on the one worker left)
        again = subprocess.run([str(BIN / "specserve"), "reprocess", str(root), "--out", str(out), "--scheduler",
                                address, "--models", ",".join(MODELS)], capture_output=True, text=True, timeout=300,
                               env=ENV)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "0 files (0 spectra) analysed" in again.stdout and f"{len(readable) + len(corrupt)} already done" in (
            again.stdout), again.stdout
        _check_exactly_once(out, readable, corrupt)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_local_cluster_worker_killed_then_resume_with_new_files(archive, tmp_path):
    """A LocalCluster (nannies restart a killed worker): a worker SIGKILLed mid-run loses nothing;
    the Parquet catalogue keeps units and provenance; a rerun with more inputs analyses only the
    new files, and a corrupt file listed twice is rejected once."""
    from distributed import Client

    from specserve.runtime.archive.reprocess import local_cluster

    root, readable, corrupt = archive
    first = readable[: len(readable) * 2 // 3]
    out = tmp_path / "dr1.parquet"
    with local_cluster(2) as cluster, Client(cluster) as client:
        pids = list(client.run(os.getpid).values())
        record: dict = {}
        killer = _kill_when_parts(parts_folder(out), pids[0], 2, time.monotonic() + 300, record)
        summary = reprocess(first + corrupt + corrupt[:1], out, Job(models=MODELS), batch_files=2, client=client,
                            progress=False)
        killer.join(timeout=1)
        assert record.get("killed")
        assert summary.files == len(first) and summary.rejected == len(corrupt) and summary.failed_batches == 0
        _check_exactly_once(out, first, corrupt)
        assert done_files(parts_folder(out)) == set(first) | set(corrupt)
        table = read_catalogue(out)
        assert str(table["logg"].unit) == "dex" and "probability of class cv" in table["p_cv"].description
        assert table["id"].dtype.kind == "U" and table.meta["SPECSERV"]

        # resume: everything listed again plus the rest of the archive (a folder, read recursively)
        summary = reprocess([root], out, Job(models=MODELS), batch_files=8, client=client, progress=False)
        assert summary.skipped == len(first) + len(corrupt)
        assert summary.files == len(readable) - len(first) and summary.rejected == 0
        _check_exactly_once(out, readable, corrupt)
        # the memory of each worker is reported from its batches
        assert summary.max_rss_mb and all(50 < mb < 4000 for mb in summary.max_rss_mb.values())


def test_cli_errors_are_clear(tmp_path):
    run = [str(BIN / "specserve"), "reprocess", "--out", str(tmp_path / "c.fits")]
    none = subprocess.run(run, capture_output=True, text=True, timeout=60, env=ENV)
    assert none.returncode == 2 and "needs spectrum files" in none.stderr
    bad = subprocess.run(run + [str(tmp_path), "--batch-files", "0"], capture_output=True, text=True, timeout=60,
                         env=ENV)
    assert bad.returncode == 1 and "--batch-files must be >= 1" in bad.stderr
    port = _free_port()  # nothing listens there
    absent = subprocess.run(run + [str(tmp_path), "--scheduler", f"tcp://127.0.0.1:{port}"], capture_output=True,
                            text=True, timeout=120, env=ENV)
    assert absent.returncode == 1 and "cannot reach the Dask scheduler" in absent.stderr, absent.stderr[-2000:]
    assert "Traceback" not in absent.stderr
