"""``specserve bench embedded``: every model and variant of a repository as the embedded runtime
runs it on a small device: one ONNX Runtime thread, one process per model.

Per model: file size, session load time, batch-1 latency p50/p99, spectra/s at batch 64, the peak
resident memory of a process that loads the model and runs one spectrum and then a batch of 64
(``ru_maxrss``; the process's own baseline of numpy and onnxruntime is given too), and the
accuracy against fp32 that the variant's card carries (measured at export on the served test
split, :mod:`specserve.export.variants`). Models are measured one after the other, each in a fresh
process, alternating rounds so that a noisy machine affects every row alike; ratios to the fp32
model of the same family are printed beside.

Then the whole embedded runtime as a small device runs it: one process holding every model of a
precision (``LocalRuntime``, one thread) reads one LAMOST file of the kit and analyses it, with
and without ONNX Runtime's memory arena: its peak resident memory and times.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from specserve.export.bench.report import replace_section
from specserve.runtime.kinds import variant_of
from specserve.runtime.layout import model_folders, model_versions, version_file

BEGIN = "<!-- embedded:begin -->"
END = "<!-- embedded:end -->"

_PROBE = r"""
import json, resource, sys, time
import numpy as np
import onnxruntime as ort
from specserve.export.variants import _example_inputs
from specserve.runtime.contract import ModelCard

path, rounds = sys.argv[1], int(sys.argv[2])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
options = ort.SessionOptions()
options.intra_op_num_threads = 1
options.inter_op_num_threads = 1
t0 = time.perf_counter()
session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
load_s = time.perf_counter() - t0
card = ModelCard.from_metadata_props(session.get_modelmeta().custom_metadata_map)
rng = np.random.default_rng(0)
one, many = _example_inputs(card, rng, 1), _example_inputs(card, rng, 64)
session.run(None, one)
times = []
for _ in range(rounds):
    t = time.perf_counter(); session.run(None, one); times.append(time.perf_counter() - t)
t = time.perf_counter(); session.run(None, many); batch_s = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"load_s": load_s, "p50_ms": 1e3 * float(np.percentile(times, 50)),
                  "p99_ms": 1e3 * float(np.percentile(times, 99)), "per_s_64": 64 / batch_s,
                  "peak_rss_mb": peak / 1024, "baseline_rss_mb": base / 1024,
                  "variant": card.metrics.get("variant")}))
"""


_PIPELINE_PROBE = r"""
import json, resource, sys, time
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
from specserve.runtime.embedded.local import LocalRuntime

repository, path, variant, arena = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
t0 = time.perf_counter()
runtime = LocalRuntime(repository, threads=1, memory_arena=arena, variant=variant or None)
load_s = time.perf_counter() - t0
t = time.perf_counter()
rows = runtime.analyze_files([path])
analyze_s = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
models = sorted({m.split(":")[0] for _, row in rows for m in row.models})
print(json.dumps({"load_s": load_s, "analyze_s": analyze_s, "peak_rss_mb": peak / 1024,
                  "baseline_rss_mb": base / 1024, "models": models, "spectra": len(rows)}))
"""


def _run_probe(script: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {args[0]} failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _probe(path: Path, rounds: int) -> dict:
    return _run_probe(_PROBE, str(path), str(rounds))


def measure_pipeline(repository: Path, spectrum_file: Path) -> list[dict]:
    """One spectrum file through every model of each precision the repository has, in a fresh
    process each, with the memory arena on and off."""
    precisions = [""] + sorted({variant_of(f.name) for f in model_folders(repository)} - {""})
    return [{"variant": variant or "fp32", "arena": arena,
             **_run_probe(_PIPELINE_PROBE, str(repository), str(spectrum_file), variant, "1" if arena else "0")}
            for variant in precisions for arena in (True, False)]


def pipeline_markdown(rows: list[dict], spectrum_file: Path) -> str:
    lines = [f"One spectrum (`{spectrum_file.name}`) through every model of a precision, in one process "
             "(`LocalRuntime`, one thread; baseline: the probe process before it imports specserve):", "",
             "| Precision | Memory arena | Models that answered | Load s | Analyse s (read + preprocess + run) | "
             "Peak RSS MB |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {'on' if r['arena'] else 'off'} | {', '.join(r['models'])} | "
                     f"{r['load_s']:.2f} | {r['analyze_s']:.2f} | {r['peak_rss_mb']:.0f} "
                     f"(baseline {r['baseline_rss_mb']:.0f}) |")
    return "\n".join(lines)


def measure(repository: Path, rounds: int = 200, repeats: int = 3) -> list[dict]:
    """One row per model folder with a spectrum model (variants included): the median of
    ``repeats`` fresh processes for the timings, the largest peak RSS."""
    rows = []
    for folder in model_folders(repository):
        versions = model_versions(folder)
        if not versions:
            continue
        path = version_file(folder, versions[0])
        rows.append({"name": folder.name, "path": path, "size_mb": path.stat().st_size / 2**20, "runs": []})
    for _ in range(repeats):  # alternating: round r of every model before round r + 1
        for row in rows:
            row["runs"].append(_probe(row["path"], rounds))
    for row in rows:
        runs = row.pop("runs")
        for key in ("load_s", "p50_ms", "p99_ms", "per_s_64"):
            row[key] = sorted(r[key] for r in runs)[len(runs) // 2]
        row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
        row["baseline_rss_mb"] = min(r["baseline_rss_mb"] for r in runs)
        row["variant"] = runs[0]["variant"]
        row["path"] = str(row["path"])
    return rows


def _accuracy(variant: dict | None) -> str:
    if not variant or not variant.get("accuracy"):
        return ""
    acc = variant["accuracy"]
    delta = ", ".join(f"{k} {v:+.3g}" for k, v in acc["delta"].items())
    return f"{delta} ({'within' if acc['within_limits'] else 'OUTSIDE'} limits)"


def markdown(rows: list[dict]) -> str:
    by_name = {r["name"]: r for r in rows}
    lines = ["| Model | File MB | Size vs fp32 | Load s | Batch-1 p50 / p99 ms (1 thread) | p50 vs fp32 | "
             "Spectra/s at 64 | Peak RSS MB | Accuracy vs fp32 (served test split) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = by_name.get(r["name"].rsplit("-", 1)[0]) if variant_of(r["name"]) else None
        size = f"{r['size_mb'] / base['size_mb']:.2f}" if base else ""
        speed = f"{r['p50_ms'] / base['p50_ms']:.2f}" if base else ""
        lines.append(f"| {r['name']} | {r['size_mb']:.2f} | {size} | {r['load_s']:.2f} | {r['p50_ms']:.2f} / "
                     f"{r['p99_ms']:.2f} | {speed} | {r['per_s_64']:.0f} | {r['peak_rss_mb']:.0f} "
                     f"(baseline {r['baseline_rss_mb']:.0f}) | {_accuracy(r['variant'])} |")
    return "\n".join(lines)


def write_section(path: Path, body: str) -> None:
    """Put this section into the report, replacing an earlier one."""
    replace_section(path, BEGIN, END, "Embedded (one thread, one process per model)", body)


def run(repository: Path, out: Path | None, quick: bool = False) -> str:
    from specserve.runtime.datakit import data_dir

    rounds, repeats = (20, 1) if quick else (200, 3)
    rows = measure(repository, rounds=rounds, repeats=repeats)
    spectrum_file = sorted((data_dir() / "lamost_dr1" / "fits").glob("*.fits"))[0]
    pipeline = measure_pipeline(repository, spectrum_file)
    table = (f"Repository `{repository}`. Each row: one fresh process per model (ONNX Runtime CPU, one "
             f"thread), the median of {repeats} such processes of {rounds} batch-1 runs; peak RSS after "
             "loading, one spectrum and one batch of 64 (baseline: the process before the session). "
             "Accuracy: measured at export on the served test split (for the MC models the means of "
             "several MC draws on each side, since each session draws its own dropout masks).\n\n"
             + markdown(rows) + "\n\n" + pipeline_markdown(pipeline, spectrum_file))
    if out is not None:
        write_section(out, table)
    return table
