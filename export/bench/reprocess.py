"""``specserve bench reprocess``: ``specserve reprocess`` on Dask against the in-process pipeline on
the same files, measured side by side in one run.

The archive is the kit's LAMOST DR1 files linked under new names as many times as needed (one
spectrum per file), so every size holds real spectra. Rows:

- spectra/s of the in-process pipeline (:class:`~specserve.runtime.embedded.local.LocalRuntime`,
  ONNX Runtime with one thread per core, batches of 64 spectra) and of ``reprocess`` with 1 and 2
  workers, on the same files; each wall time includes loading the models and writing the
  catalogue, and for ``reprocess`` starting the local cluster as well, reported apart;
- cost from 1,000 to 16,000 spectra with 2 workers (wall time per 1,000 spectra at each size, and
  the marginal cost between sizes);
- the peak RSS of each worker process.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from specserve.export.bench.report import replace_section

BEGIN, END = "<!-- reprocess:begin -->", "<!-- reprocess:end -->"
SIZES = (1000, 2000, 4000, 8000, 16000)


def make_archive(root: Path, n: int, sources: list[Path]) -> list[str]:
    """``n`` links to the kit files, spread over folders of 500."""
    files = []
    for i in range(n):
        source = sources[i % len(sources)]
        folder = root / f"d{i // 500:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / f"{i:06d}-{source.name}"
        if not link.exists():
            link.symlink_to(source)
        files.append(str(link))
    return files


def in_process(repository: Path, files: list[str], threads: int) -> dict:
    from specserve.runtime.catalogue import CatalogueWriter, Provenance
    from specserve.runtime.embedded.local import LocalRuntime

    t0 = time.perf_counter()
    runtime = LocalRuntime(repository, threads=threads)
    loaded = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = Path(tempfile.mkdtemp()) / "inprocess.parquet"
    spectra = 0
    with CatalogueWriter(out, Provenance.from_models(runtime.models)) as writer:
        for pairs in runtime.iter_files(files, batch=64):
            writer.add(pairs)
            spectra += len(pairs)
    seconds = time.perf_counter() - t0
    shutil.rmtree(out.parent)
    from specserve.runtime.archive.reprocess import peak_rss_mb

    return {"spectra": spectra, "seconds": seconds, "rate": spectra / seconds, "load_s": loaded,
            "rss_mb": peak_rss_mb()}


def on_dask(repository: Path, files: list[str], workers: int, batch_files: int) -> dict:
    from distributed import Client

    from specserve.runtime.archive.reprocess import Job, SpecserveModels, local_cluster, reprocess

    folder = Path(tempfile.mkdtemp())
    job = Job(repository=str(repository))
    t0 = time.perf_counter()
    with local_cluster(workers) as cluster, Client(cluster) as client:
        started = time.perf_counter() - t0
        t0 = time.perf_counter()
        plugin = SpecserveModels(job)  # the models loaded on every worker, as reprocess would
        client.register_plugin(plugin, name=plugin.name)
        loaded = time.perf_counter() - t0
        summary = reprocess(files, folder / "catalogue.parquet", job, batch_files=batch_files, client=client,
                            progress=False, say=lambda _: None)
    shutil.rmtree(folder)
    assert summary.catalogue_rows == len(files), (summary.catalogue_rows, len(files))
    return {"spectra": summary.spectra, "seconds": summary.seconds, "rate": summary.spectra / summary.seconds,
            "start_s": started, "load_s": loaded, "rss_mb": max(summary.max_rss_mb.values()),
            "workers": summary.workers}


def measure(repository: Path, sizes=SIZES, compare: int = 2000, batch_files: int = 32) -> dict:
    from specserve.runtime.datakit import data_dir

    sources = sorted((data_dir() / "lamost_dr1" / "fits").glob("*.fits"))
    root = Path(tempfile.mkdtemp(prefix="specserve-archive-"))
    try:
        files = make_archive(root, max(max(sizes), compare), sources)
        cores = os.cpu_count() or 1
        result = {"cores": cores, "compare": compare,
                  "in_process": in_process(repository, files[:compare], threads=cores),
                  "dask_1": on_dask(repository, files[:compare], 1, batch_files),
                  "dask_2": on_dask(repository, files[:compare], 2, batch_files),
                  "sizes": [dict(n=n, **on_dask(repository, files[:n], 2, batch_files)) for n in sizes]}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return result


def markdown(r: dict) -> str:
    base = r["in_process"]["rate"]
    ip = r["in_process"]
    lines = [f"{r['compare']:,} LAMOST DR1 spectra (the kit's 139 files linked under new names), every default "
             f"model, on {r['cores']} cores. Spectra/s: from the first file read to the catalogue written (reading, "
             "preprocessing, the models, the catalogue; for `reprocess` also scheduling, the part files and their "
             "merge). Loading the models and starting the local cluster are given apart.", "",
             "| path | spectra/s | vs in-process | peak RSS per process (MB) | loading the models (s) | "
             "cluster start (s) |", "|---|---|---|---|---|---|",
             f"| in-process pipeline (one process, {r['cores']} ORT threads) | {base:.0f} | 1.00x | "
             f"{ip['rss_mb']:.0f} | {ip['load_s']:.1f} | |"]
    for key, name in (("dask_1", "reprocess, 1 worker"), ("dask_2", "reprocess, 2 workers")):
        d = r[key]
        lines.append(f"| {name} | {d['rate']:.0f} | {d['rate'] / base:.2f}x | {d['rss_mb']:.0f} | {d['load_s']:.1f} "
                     f"| {d['start_s']:.1f} |")
    lines += ["", "Target: 2 workers at least 85 % of the in-process throughput: "
              + ("met" if r["dask_2"]["rate"] >= 0.85 * base else "**not met**")
              + f" ({r['dask_2']['rate'] / base:.0%}).", "",
              "| spectra | wall (s) | s per 1,000 spectra | marginal s per 1,000 |", "|---|---|---|---|"]
    previous = None
    for s in r["sizes"]:
        marginal = "" if previous is None else (
            f"{1000 * (s['seconds'] - previous['seconds']) / (s['n'] - previous['n']):.2f}")
        lines.append(f"| {s['n']:,} | {s['seconds']:.1f} | {1000 * s['seconds'] / s['n']:.2f} | {marginal} |")
        previous = s
    sizes = r["sizes"]
    first, last = sizes[0], sizes[-1]
    ratio = (last["seconds"] / last["n"]) / (first["seconds"] / first["n"])
    marginal = [(b["seconds"] - a["seconds"]) / (b["n"] - a["n"]) for a, b in zip(sizes, sizes[1:])]
    spread = max(marginal) / min(marginal)
    fixed = first["seconds"] - marginal[0] * first["n"]
    lines += ["", f"Cost per spectrum at {last['n']:,} against {first['n']:,}: {ratio:.2f}x. The wall time is "
              f"affine: about {fixed:.1f} s of fixed cost (scheduling the first tasks, the merge's set-up) plus "
              f"{1000 * min(marginal):.2f}-{1000 * max(marginal):.2f} s per 1,000 spectra; the marginal cost varies "
              f"{spread:.2f}x between sizes (target: linear within 15 %: "
              f"{'met' if spread <= 1.15 else '**not met**'}, judged on the marginal cost)."]
    return "\n".join(lines)


def write_section(path: Path, body: str) -> None:
    """Put this section into the report, replacing an earlier one."""
    replace_section(path, BEGIN, END, "Reprocess (Dask)", body)


def run(repository: Path, out: Path | None, quick: bool = False) -> str:
    result = measure(repository, sizes=(250, 500, 1000) if quick else SIZES, compare=500 if quick else 2000)
    body = markdown(result)
    if out is not None:
        write_section(out, body)
    return body
