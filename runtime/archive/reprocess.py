"""``specserve reprocess INPUT... --out CATALOGUE``: a survey archive through every model on Dask
distributed, with no gRPC server.

    from specserve.runtime.archive.reprocess import Job, reprocess

    summary = reprocess(["/data/lamost/dr9/"], "dr9.parquet", Job(models=("rbm", "physformer")),
                        workers=8, batch_files=32)

The pieces:

- **Inputs** are streamed (:func:`~specserve.runtime.io.iter_inputs`: files, folders read
  recursively, globs, ``--files-from``); batches of ``batch_files`` files are submitted as they are
  listed, with at most a few batches per worker thread in flight, so an archive's list is never held
  whole on the command line or in the scheduler.
- **Workers** load the models once, in a worker plugin (:class:`SpecserveModels`, registered with
  the cluster, so workers that join later get it too), and run the embedded runtime
  (:class:`~specserve.runtime.embedded.local.LocalRuntime`: the readers, each card's
  preprocessing, ONNX Runtime sessions) on their batches. The files and the repository must be
  readable at the same paths on every worker (a shared file system).
- **Part files.** Each batch writes its rows to ``CATALOGUE.parts/part-KEY.parquet`` and the files it
  could not read, with the reason, to ``rejects-KEY.parquet``; KEY is a hash of the batch's file
  list, and each file is written to a temporary name then renamed. A batch that runs again (its
  worker died, or the scheduler thought so) rewrites the same names with the same rows, so no file
  is ever counted twice, and a batch that never finished leaves nothing.
- **Resume.** The part folder is the run's state: a rerun reads it and skips every file in a part
  (rows or rejects). Delete it (or pass ``fresh=True``) to start over.
- **Merge.** At the end every part is read and the catalogue written in its suffix's format
  (:mod:`specserve.runtime.catalogue`: units, descriptions, provenance), and the rejects table
  beside it (``NAME.rejects.SUFFIX``: file, reason).

A batch whose task fails (a reader or model bug, or a file that kills every worker it is given:
Dask gives up after ``distributed.scheduler.allowed-failures``) has its files written as rejects
with the error, and the run goes on.
"""

from __future__ import annotations

import hashlib
import logging
import os
import resource
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from distributed.diagnostics.plugin import WorkerPlugin

from specserve.runtime.catalogue import (
    Provenance,
    Row,
    catalogue_format,
    catalogue_table,
    describe,
    read_catalogue,
    write_table,
)
from specserve.runtime.errors import SpecserveError
from specserve.runtime.io import iter_inputs

log = logging.getLogger(__name__)

PLUGIN = "specserve-models"
PARTS_SUFFIX = ".parts"
CONNECT_TIMEOUT_S = 10.0
WAIT_FOR_WORKERS_S = 60.0
IN_FLIGHT_PER_THREAD = 3
"""Batches submitted ahead per worker thread: enough to keep every worker busy, few enough that a
long list is read as it is worked through."""


@dataclass(frozen=True)
class Job:
    """What every worker runs: the models (all applicable ones when empty) of a repository (the
    worker's default one when None), their variant, MC samples, ONNX Runtime threads per session."""

    repository: str | None = None
    models: tuple[str, ...] = ()
    variant: str | None = None
    mc_samples: int = 0
    threads: int = 1
    spectra_per_run: int = 64
    """Spectra analysed together (one ONNX Runtime run per model)."""


class SpecserveModels(WorkerPlugin):
    """The Dask worker plugin: loads the job's models once per worker, on the worker (ONNX
    Runtime sessions cannot travel between processes). Its name says which job it serves, and it
    is idempotent: registering the same job again (a second run on the same cluster) keeps the
    models already loaded."""

    idempotent = True

    def __init__(self, job: Job):
        self.job = job
        self.name = plugin_name(job)
        self.runtime = None
        self.provenance: Provenance | None = None

    def setup(self, worker=None) -> None:
        from specserve.runtime.embedded.local import LocalRuntime

        repository = self.job.repository
        if repository is None:
            from specserve.runtime.defaults import default_repository

            repository = default_repository().path
        self.runtime = LocalRuntime(repository, threads=self.job.threads, variant=self.job.variant)
        self.provenance = Provenance.from_models(self.runtime.models)

    def teardown(self, worker=None) -> None:
        self.runtime = None


def plugin_name(job: Job) -> str:
    return f"{PLUGIN}-{hashlib.sha256(repr(job).encode()).hexdigest()[:12]}"


def _plugin(name: str) -> SpecserveModels:
    from distributed import get_worker

    plugin = get_worker().plugins.get(name)
    if plugin is None or plugin.runtime is None:
        raise SpecserveError("this worker has no specserve models (the worker plugin was not registered)")
    return plugin


@dataclass
class BatchResult:
    key: str
    files: int
    spectra: int
    rejected: int
    seconds: float
    max_rss_mb: float
    provenance: Provenance | None
    worker: str = ""


def batch_key(files: Sequence[str]) -> str:
    """A batch's name: a hash of its file list (the same batch run again writes the same parts)."""
    return hashlib.sha256("\n".join(files).encode()).hexdigest()[:20]


def _write_atomic(table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write_table(table, tmp, "parquet")
    os.replace(tmp, path)


def rejects_table(rejects: Sequence[tuple[str, str]]):
    from astropy.table import Table

    table = Table()
    table["file"] = np.array([f for f, _ in rejects], dtype=str) if rejects else np.array([], dtype="U1")
    table["reason"] = np.array([r for _, r in rejects], dtype=str) if rejects else np.array([], dtype="U1")
    table["file"].description = "the file that could not be analysed"
    table["reason"].description = "why"
    return table


def analyse_files(runtime, files: Sequence[str], job: Job) -> tuple[list[tuple[str, Row]], list[tuple[str, str]]]:
    """Rows for every spectrum of the readable ``files`` and ``(file, reason)`` for the others. An
    unexpected error on a batch is narrowed down to the file that raises it, which is rejected with
    the error; the other files still get their rows."""
    rejects: list[tuple[str, str]] = []

    def run(paths: Sequence[str]) -> list[tuple[str, Row]]:
        return runtime.analyze_files(paths, list(job.models), mc_samples=job.mc_samples, batch=job.spectra_per_run,
                                     on_unreadable=lambda path, reason: rejects.append((str(path), reason)))

    try:
        return run(files), rejects
    except Exception:  # noqa: BLE001 - a bug on one file must not lose the batch: find the file
        log.exception("reprocess: a batch failed; its files one by one")
    rows: list[tuple[str, Row]] = []
    rejects.clear()
    for path in files:
        try:
            rows += run([path])
        except Exception as exc:  # noqa: BLE001
            log.exception("reprocess: %s failed", path)
            rejects.append((path, f"error: {type(exc).__name__}: {exc}"))
    return rows, rejects


def process_batch(files: tuple[str, ...], parts: str, plugin: str) -> BatchResult:
    """The Dask task: analyse a batch of files on the models of this worker's ``plugin`` and write
    its part files."""
    t0 = time.perf_counter()
    plugin = _plugin(plugin)
    key = batch_key(files)
    rows, rejects = analyse_files(plugin.runtime, files, plugin.job)
    folder = Path(parts)
    if rows:
        _write_atomic(catalogue_table(rows, plugin.provenance), folder / f"part-{key}.parquet")
    if rejects:
        _write_atomic(rejects_table(rejects), folder / f"rejects-{key}.parquet")
    from distributed import get_worker

    return BatchResult(key, len(files) - len(rejects), len(rows), len(rejects), time.perf_counter() - t0,
                       peak_rss_mb(), plugin.provenance, get_worker().address)


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB): VmHWM, which, unlike ``ru_maxrss``, does not carry
    over the peak of the process a worker was started from."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def parts_folder(out: str | Path) -> Path:
    return Path(str(out) + PARTS_SUFFIX)


def rejects_path(out: str | Path) -> Path:
    out = Path(out)
    suffix = out.suffix if out.suffix.lower() in (".fits", ".fit", ".ecsv", ".csv", ".parquet", ".pq") else ".csv"
    return out.with_name(f"{out.name[: len(out.name) - len(out.suffix)] if out.suffix else out.name}.rejects{suffix}")


def done_files(parts: Path) -> set[str]:
    """The files some part holds (rows or rejects): what a rerun skips."""
    import pyarrow.parquet as pq

    done: set[str] = set()
    for path in sorted(parts.glob("*.parquet")):
        done.update(pq.read_table(path, columns=["file"], use_threads=False).column("file").to_pylist())
    return done


@dataclass
class Summary:
    files: int = 0
    """Files analysed in this run (rows written)."""
    spectra: int = 0
    rejected: int = 0
    """Files rejected in this run."""
    skipped: int = 0
    """Files already done by an earlier run."""
    failed_batches: int = 0
    seconds: float = 0.0
    workers: int = 0
    max_rss_mb: dict[str, float] = field(default_factory=dict)
    """Peak RSS of each worker process (MB), from its batches."""
    catalogue_rows: int = 0
    catalogue_rejects: int = 0
    dashboard: str | None = None

    @property
    def rate(self) -> float:
        return self.spectra / self.seconds if self.seconds > 0 else 0.0


def _batches(inputs: Iterable[Path], done: set[str], size: int, skipped: list[int]) -> Iterator[tuple[str, ...]]:
    batch: list[str] = []
    seen: set[str] = set()
    for path in inputs:
        name = str(path)
        if name in done or name in seen:
            skipped[0] += name in done
            continue
        seen.add(name)
        batch.append(name)
        if len(batch) == size:
            yield tuple(batch)
            batch = []
    if batch:
        yield tuple(batch)


class _Progress:
    """A progress bar on stderr (a terminal only, unless forced): files done of those listed so far."""

    def __init__(self, on: bool):
        self.on = on
        self._shown = 0.0
        self._t0 = time.monotonic()

    def show(self, done: int, listed: int, spectra: int, final: bool = False) -> None:
        now = time.monotonic()
        if not self.on or (not final and now - self._shown < 0.5):
            return
        self._shown = now
        width = 30
        filled = int(width * done / listed) if listed else 0
        rate = spectra / max(now - self._t0, 1e-9)
        print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{listed} files, {spectra} spectra, "
              f"{rate:,.0f} spectra/s", end="\n" if final else "", file=sys.stderr, flush=True)


def local_cluster(workers: int | None = None, threads: int = 1, **options):
    """A LocalCluster sized to the machine: one single-threaded worker process per core (ONNX
    Runtime gets one intra-op thread per session), or ``workers`` of them."""
    from distributed import LocalCluster

    n = workers or os.cpu_count() or 1
    # the dashboard on a free port (its pages need bokeh; without it the address answers with a note)
    return LocalCluster(n_workers=n, threads_per_worker=max(1, threads), processes=True,
                        dashboard_address=options.pop("dashboard_address", "127.0.0.1:0"), **options)


def reprocess(inputs: Iterable[str | Path], out: str | Path, job: Job = Job(), *, scheduler: str | None = None,
              workers: int | None = None, batch_files: int = 16, files_from: str | Path | None = None,
              fresh: bool = False, progress: bool | None = None,
              say: Callable[[str], None] | None = None, client=None) -> Summary:
    """Reprocess ``inputs`` into the catalogue ``out`` (see the module). ``scheduler``: the address
    of a running Dask scheduler; otherwise a :func:`local_cluster` of ``workers`` processes (or a
    given ``client``)."""
    from distributed import Client, as_completed

    if batch_files < 1:
        raise SpecserveError(f"--batch-files must be >= 1, got {batch_files}")
    if workers is not None and workers < 1:
        raise SpecserveError(f"--workers must be >= 1, got {workers}")
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    out = Path(out)
    parts = parts_folder(out)
    if fresh and parts.exists():
        for path in parts.iterdir():
            path.unlink()
    parts.mkdir(parents=True, exist_ok=True)
    done = done_files(parts)
    summary = Summary()
    bar = _Progress(sys.stderr.isatty() if progress is None else progress)
    cluster = None
    own_client = client is None
    t0 = time.perf_counter()
    try:
        if client is None:
            if scheduler:
                try:
                    client = Client(scheduler, timeout=f"{CONNECT_TIMEOUT_S:.0f}s")
                except (OSError, TimeoutError) as exc:
                    raise SpecserveError(f"cannot reach the Dask scheduler {scheduler}: {exc}") from None
            else:
                cluster = local_cluster(workers, job.threads)
                client = Client(cluster)
        try:
            client.wait_for_workers(1, timeout=WAIT_FOR_WORKERS_S)
        except TimeoutError:
            raise SpecserveError(f"no Dask worker joined the scheduler {client.scheduler.address} within "
                                 f"{WAIT_FOR_WORKERS_S:.0f} s (start some with `dask worker ADDRESS`)") from None
        plugin = SpecserveModels(job)
        client.register_plugin(plugin, name=plugin.name)
        summary.workers = len(client.scheduler_info(n_workers=-1)["workers"])
        summary.dashboard = client.dashboard_link if _has_dashboard(client) else None
        say(f"specserve reprocess: {summary.workers} workers on {client.scheduler.address}"
            + (f", dashboard {summary.dashboard}" if summary.dashboard else "")
            + (f"; {len(done)} files already done in {parts}" if done else ""))
        threads = max(1, sum(w["nthreads"] for w in client.scheduler_info(n_workers=-1)["workers"].values()))
        limit = IN_FLIGHT_PER_THREAD * threads
        skipped = [0]
        listed = 0
        pending = as_completed()
        in_flight: dict = {}
        provenance: Provenance | None = None

        def collect(future) -> None:
            nonlocal provenance
            files = in_flight.pop(future)
            try:
                result: BatchResult = future.result()
            except Exception as exc:  # noqa: BLE001 - a task that failed for good: its files are rejects
                summary.failed_batches += 1
                reason = f"task failed: {type(exc).__name__}: {exc}"
                say(f"specserve reprocess: {len(files)} files rejected: {reason}")
                _write_atomic(rejects_table([(f, reason) for f in files]), parts / f"rejects-{batch_key(files)}.parquet")
                summary.rejected += len(files)
                return
            provenance = provenance or result.provenance
            summary.files += result.files
            summary.spectra += result.spectra
            summary.rejected += result.rejected
            summary.max_rss_mb[result.worker] = max(summary.max_rss_mb.get(result.worker, 0.0), result.max_rss_mb)
            bar.show(summary.files + summary.rejected, listed, summary.spectra)

        for batch in _batches(iter_inputs(inputs, files_from), done, batch_files, skipped):
            listed += len(batch)
            future = client.submit(process_batch, batch, str(parts), plugin.name,
                                   key=f"specserve-batch-{batch_key(batch)}", pure=False)
            in_flight[future] = batch
            pending.add(future)
            while len(in_flight) >= limit:
                collect(next(pending))
        for future in pending:
            collect(future)
        bar.show(summary.files + summary.rejected, listed, summary.spectra, final=True)
        summary.skipped = skipped[0]
        if provenance is None:
            provenance = client.run(_worker_provenance, plugin.name).popitem()[1] if summary.workers else None
    finally:
        if own_client and client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    summary.seconds = time.perf_counter() - t0
    summary.catalogue_rows, summary.catalogue_rejects = merge(parts, out, provenance)
    return summary


def _worker_provenance(name: str, dask_worker=None) -> Provenance | None:
    plugin = dask_worker.plugins.get(name)
    return plugin.provenance if plugin is not None else None


def _has_dashboard(client) -> bool:
    """Whether the scheduler's dashboard address answers (``dask scheduler --no-dashboard`` still
    lists one)."""
    import socket
    from urllib.parse import urlparse

    try:
        if not client.scheduler_info().get("services", {}).get("dashboard"):
            return False
        link = urlparse(client.dashboard_link)
        with socket.create_connection((link.hostname, link.port), timeout=0.5):
            return True
    except Exception:  # noqa: BLE001 - no dashboard then
        return False


def stack_all(tables: list):
    """Tables with the union of their columns (NaN or empty text where one lacks a column), in one
    vstack."""
    from astropy.table import vstack

    from specserve.runtime.catalogue import column_order

    names: dict[str, str] = {}
    for table in tables:
        for name in table.colnames:
            names.setdefault(name, table[name].dtype.kind)
    order = column_order(names)
    for table in tables:
        for name in order:
            if name not in table.colnames:
                table[name] = np.full(len(table), np.nan) if names[name] == "f" else np.full(len(table), "", dtype="U1")
    return vstack([t[order] for t in tables], join_type="exact", metadata_conflicts="silent")


def merge(parts: Path, out: str | Path, provenance: Provenance | None) -> tuple[int, int]:
    """Every part into the catalogue ``out`` and the rejects table beside it (written to a
    temporary name, then renamed); returns their row counts."""
    out = Path(out)
    tables = [read_catalogue(p) for p in sorted(parts.glob("part-*.parquet"))]
    rejects = [read_catalogue(p) for p in sorted(parts.glob("rejects-*.parquet"))]
    n_rows = n_rejects = 0
    if tables:
        table = stack_all(tables)
        order = np.lexsort((np.asarray(table["id"]), np.asarray(table["file"])))  # file order, whatever the batches
        table = table[order]
        describe(table, provenance)
        tmp = out.with_name(f".{out.name}.tmp")
        write_table(table, tmp, catalogue_format(out))
        os.replace(tmp, out)
        n_rows = len(table)
    target = rejects_path(out)
    if rejects:
        table = stack_all(rejects)
        table = table[np.argsort(np.asarray(table["file"]), kind="stable")]
        tmp = target.with_name(f".{target.name}.tmp")
        write_table(table, tmp, catalogue_format(target))
        os.replace(tmp, target)
        n_rejects = len(table)
    else:
        target.unlink(missing_ok=True)
    return n_rows, n_rejects
