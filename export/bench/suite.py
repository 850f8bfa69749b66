"""``make bench`` and ``make gpu-check``: every benchmark of the serving engine, written to
BENCHMARKS.md with the machine it ran on.

``run_all`` measures these, side by side in one run:

- ONNX Runtime against torch eager for each model at batch 1 and 64. It uses the same weights (the
  training run whose export is in the repository, found by the file's hash), the same inputs and the
  same thread count. The calls alternate, and the median of each is taken;
- MC sampling: one graph run drawing T samples against T runs of one sample;
- the serving rows of :mod:`specserve.export.bench.serving`.

``gpu_check`` does the same on a CUDA device. It runs the CUDA-vs-CPU parity checks, including the
MC randomness under the CUDA provider: two runs differ, and the sample statistics agree with the
CPU's. It then runs the serving benchmarks with ``--device cuda`` and writes the "CUDA" section of
BENCHMARKS.md. Run on the CPU (``--device cpu``), it exercises the same code, IO binding
included.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from specserve.export.bench import serving as sb
from specserve.export.onnx_export import load_run
from specserve.runtime.contract import N_SAMPLES, ModelCard
from specserve.runtime.datakit import cache_dir, data_dir
from specserve.runtime.embedded.providers import Device, resolve_device
from specserve.runtime.engine.repository import LoadedModel, load_model_dir
from specserve.runtime.errors import SpecserveError
from specserve.runtime.layout import model_folders

CUDA_BEGIN = "<!-- cuda: begin -->"
CUDA_END = "<!-- cuda: end -->"
KIND_LABELS = {"rbm": "an RBM", "spt": "an SPT", "physformer": "a PhysFormer"}


# ------------------------------------------------------------------ models and inputs


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def find_run(model: LoadedModel, runs: Path) -> Path | None:
    """The training run whose exported ONNX file is byte-identical to the served ``model``."""
    want = _sha(model.path)
    for onnx_file in sorted(runs.glob("*/onnx/**/model.onnx"), reverse=True):
        if onnx_file.stat().st_size == model.path.stat().st_size and _sha(onnx_file) == want:
            return runs / onnx_file.relative_to(runs).parts[0]
    return None


def torch_module(model: LoadedModel, run_dir: Path) -> torch.nn.Module:
    """The torch module that was exported into ``model``, with the run's weights."""
    kind = model.card.kind
    base = "physformer" if kind.startswith("physformer") else kind
    checkpoint, _ = load_run(run_dir, base, KIND_LABELS[base])
    if kind == "rbm":
        from specserve.training.rbm.model import RBMClassifier

        return RBMClassifier.from_checkpoint(checkpoint).eval()
    if kind == "spt":
        from specserve.training.spt.model import SpectralTransformer

        return SpectralTransformer.from_checkpoint(checkpoint).eval()
    from specserve.training.physformer.model import PhysFormer, PhysFormerGenerator, PhysFormerInference

    net = PhysFormer.from_checkpoint(checkpoint)
    return (PhysFormerGenerator(net) if kind == "physformer-generate" else PhysFormerInference(net)).eval()


def model_feed(card: ModelCard, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Valid inputs of ``batch`` rows; MC models draw their default number of samples."""
    feed = card.contract.dummy_inputs(card.dims, batch=batch, seed=seed)
    if N_SAMPLES in feed:
        feed[N_SAMPLES] = np.array([int(card.normalisation["mc_samples"]["default"])], np.int64)
    return feed


def _median_alternating(calls: dict[str, callable], budget_s: float = 1.5, max_rounds: int = 50) -> dict[str, float]:
    """Median seconds of each call, the calls alternating round by round (after one warm-up each)."""
    t0 = time.perf_counter()
    for call in calls.values():
        call()
    rounds = int(max(3, min(max_rounds, budget_s / max(time.perf_counter() - t0, 1e-6))))
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            t = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t)
    return {name: float(np.median(v)) for name, v in times.items()}


def load_served(repository: Path, device: Device) -> dict[str, LoadedModel]:
    """Every model of the repository on ``device``, with its own session options (as served)."""
    if not repository.is_dir():
        raise SpecserveError(f"no model repository at {repository} (`make models` or `make serve` builds it)")
    models = {d.name: load_model_dir(d, device) for d in model_folders(repository)}
    bad = {n: m.reason for n, m in models.items() if not m.ready}
    if bad:
        raise SpecserveError(f"models not ready: {bad}")
    return models


# ------------------------------------------------------------------ ORT vs torch, MC


def ort_vs_torch(repository: Path, runs: Path, threads: int) -> sb.Section:
    section = sb.Section(f"ONNX Runtime vs torch eager (CPU, {threads} thread(s) each as served, median of "
                         "alternating calls)")
    torch.set_num_threads(threads)
    models = load_served(repository, Device("cpu", intra_threads=threads))
    for name, model in models.items():
        run_dir = find_run(model, runs)
        if run_dir is None:
            section.notes.append(f"{name}: no training run under {runs} exported this file; not timed against torch")
            continue
        module = torch_module(model, run_dir)
        names = model.card.contract.input_names
        for batch in (1, 64):
            feed = model_feed(model.card, batch)
            args = tuple(torch.from_numpy(feed[n]) for n in names)

            def eager() -> None:
                with torch.inference_mode():
                    module(*args)

            t = _median_alternating({"ort": lambda: model.execute(feed), "torch": eager})
            ratio = t["torch"] / t["ort"]
            target = ">= 2x at batch 1" if batch == 1 else ""
            section.rows.append(sb.Row(
                f"{name} batch {batch}" + (f", T = {int(feed[N_SAMPLES][0])}" if N_SAMPLES in feed else ""),
                f"ORT {t['ort'] * 1e3:.2f} ms; torch {t['torch'] * 1e3:.2f} ms",
                f"ORT {ratio:.1f}x faster", target, sb.verdict(ratio >= 2) if batch == 1 else ""))
    return section


def mc_rows(repository: Path, threads: int, batch: int = 64, n_samples: int = 64) -> sb.Section:
    from specserve.export.bench.engine import run_mc

    section = sb.Section("MC dropout: one graph run drawing T samples vs T runs of one sample")
    for folder in model_folders(repository):
        model = load_model_dir(folder)
        if not model.ready or N_SAMPLES not in model.card.contract.input_names:
            continue
        t = min(n_samples, int(model.card.normalisation["mc_samples"]["max"]))
        result = run_mc(model.path, batch=batch, n_samples=t, repeats=3, threads=threads)
        section.rows.append(sb.Row(
            f"{folder.name} batch {batch}, T = {t}",
            f"in-graph {result.seconds_in_graph * 1e3:.1f} ms; loop {result.seconds_loop * 1e3:.1f} ms; "
            f"one sample {result.seconds_single * 1e3:.1f} ms",
            f"loop / in-graph {result.seconds_loop / result.seconds_in_graph:.1f}x"))
    return section


# ------------------------------------------------------------------ the serving rows


# ------------------------------------------------------------------ report


def markdown(sections: list[sb.Section]) -> str:
    lines = []
    for section in sections:
        lines += [f"### {section.title}", "", "| Benchmark | Measured | Ratio | Target | Result |", "|---|---|---|---|---|"]
        lines += [f"| {r.benchmark} | {r.measured} | {r.ratio} | {r.target} | {r.verdict} |" for r in section.rows]
        lines += [""] + [f"- {n}" for n in section.notes] + ([""] if section.notes else [])
    return "\n".join(lines)


def machine_block(info: dict[str, str], device: str) -> str:
    return "\n".join([
        f"- date: {info['date']}",
        f"- CPU: {info['cpu']}, {info['cores']} cores available; memory {info['memory']}",
        f"- {info['os']}, Python {info['python']}; {info['packages']}",
        f"- device: {device}",
    ])


NO_CUDA = ("The CUDA path has not been measured yet: no machine with a CUDA GPU was available. "
           "`make gpu-check` on such a machine runs the CUDA parity checks and these benchmarks there "
           "and writes its numbers into this section.")


def write_report(path: Path, body: str) -> None:
    """Write BENCHMARKS.md, keeping a CUDA section and an Embedded section (`make
    bench-embedded`) already in the file."""
    from specserve.export.bench.embedded import BEGIN as EMBEDDED_BEGIN
    from specserve.export.bench.embedded import END as EMBEDDED_END

    cuda, embedded = f"{CUDA_BEGIN}\n{NO_CUDA}\n{CUDA_END}", ""
    if path.is_file():
        text = path.read_text()
        found = re.search(re.escape(CUDA_BEGIN) + ".*?" + re.escape(CUDA_END), text, re.S)
        if found:
            cuda = found.group(0)
        found = re.search(re.escape(EMBEDDED_BEGIN) + ".*?" + re.escape(EMBEDDED_END), text, re.S)
        if found:
            embedded = "\n\n" + found.group(0)
    path.write_text(body.rstrip() + "\n\n## CUDA\n\n" + cuda + embedded + "\n")


def run_all(repository: Path, out: Path, quick: bool = False, runs: Path | None = None) -> list[sb.Section]:
    """Every benchmark on the CPU; writes ``out`` and returns the sections. ``runs``: where the
    training runs are (default <cache>/runs), for the torch side of ORT vs torch."""
    info = sb.machine()
    threads = int(info["cores"])
    # ORT vs torch at the thread count each session gets when the repository is served
    served_threads = Device().threads_per_session(len(model_folders(repository)))
    root = data_dir()
    spectra = sb.lamost_inputs(root)
    requests = sb.single_requests(repository, spectra)
    print(f"benchmarking {repository} on {info['cpu']} ({threads} cores)", flush=True)
    sections = []
    steps = [
        ("ORT vs torch", lambda: ort_vs_torch(repository, runs or cache_dir() / "runs", served_threads)),
        ("MC", lambda: mc_rows(repository, threads)),
        ("transport", lambda: sb.transport_ceiling(repository, requests,
                                                   per_stream=200 if quick else 1000)),
        ("overhead", lambda: sb.serving_overhead(repository, spectra[: 64 if quick else len(spectra)] * (1 if quick else 4))),
        ("latency", lambda: sb.latency(repository, requests, seconds=1.0 if quick else 3.0,
                                       repeats=1 if quick else 3)),
        ("exposure", lambda: sb.exposure(repository, spectra, n=400 if quick else 4000)),
    ]
    for label, step in steps:
        t0 = time.perf_counter()
        section = step()
        sections.append(section)
        print(markdown([section]), flush=True)
        print(f"({label}: {time.perf_counter() - t0:.0f} s)", flush=True)
    body = "\n".join([
        "# specserve benchmarks", "",
        "Written by `make bench` (`specserve bench all`). Every figure is a ratio or was measured side by side "
        "in the same run; client and servers run on this machine. Serving rows use the default model "
        f"repository ({repository}).", "",
        "## Machine", "", machine_block(info, "CPU (ONNX Runtime CPUExecutionProvider)"), "",
        "## CPU", "", markdown(sections)])
    write_report(out, body)
    return sections


# ------------------------------------------------------------------ GPU check


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _mc_statistics(model: LoadedModel, feed: dict[str, np.ndarray], n_samples: int = 2048
                   ) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean and std over at least ``n_samples`` samples per row (runs with fresh seeds), per row
    and label."""
    rng = np.random.default_rng(1)
    draws = []
    for _ in range(-(-n_samples // int(feed[N_SAMPLES][0]))):
        feed = {**feed, "seed": np.array([rng.random()], np.float32)}
        draws.append(model.execute(feed)["samples"])
    samples = np.concatenate(draws, axis=0)
    return samples.mean(axis=0), samples.std(axis=0), samples.shape[0]


def parity_checks(repository: Path, device: Device) -> list[Check]:
    """Each model on ``device`` against the CPU: deterministic outputs within the export
    tolerances; MC models keep their randomness and their sample statistics."""
    cpu = load_served(repository, Device("cpu"))
    other = load_served(repository, device)
    checks = []
    for name, model in cpu.items():
        dev = other[name]
        checks.append(Check(f"{name}: session on {device.name}", dev.ready and (device.kind == "cpu" or bool(dev.io_binding)),
                            f"providers {dev.session.get_providers()}, IO binding {dev.io_binding or 'off'}"))
        feed = model_feed(model.card, 8, seed=5)
        if N_SAMPLES not in feed:
            a, b = model.execute(feed), dev.execute(feed)
            worst = max(float(np.max(np.abs(a[k] - b[k]) / (1e-4 + 1e-3 * np.abs(a[k])))) for k in a)
            checks.append(Check(f"{name}: outputs match the CPU", worst <= 1.0,
                                f"max |diff| / (1e-4 + 1e-3 |cpu|) = {worst:.3f}"))
            continue
        same_seed = {**feed, "seed": np.array([0.5], np.float32)}
        r1, r2 = dev.execute(same_seed)["samples"], dev.execute(same_seed)["samples"]
        spread = float(np.std(dev.execute(feed)["samples"], axis=0).mean())
        checks.append(Check(f"{name}: MC samples random on {device.name}", spread > 0 and not np.array_equal(r1, r2)
                            if device.kind == "cuda" else spread > 0,
                            f"mean sample std {spread:.4g}; two runs with one seed differ: {not np.array_equal(r1, r2)}"))
        m_cpu, s_cpu, n = _mc_statistics(model, feed)
        m_dev, s_dev, _ = _mc_statistics(dev, feed)
        se = np.sqrt((s_cpu ** 2 + s_dev ** 2) / n)
        z = np.abs(m_cpu - m_dev) / np.maximum(se, 1e-12)
        ratio = s_dev.mean(axis=0) / np.maximum(s_cpu.mean(axis=0), 1e-12)  # per label, over the rows
        checks.append(Check(f"{name}: MC statistics match the CPU", float(z.max()) < 5 and float(np.abs(ratio - 1).max()) < 0.1,
                            f"{n} samples per row; max |z| of the means {z.max():.2f} (< 5); mean std ratio per "
                            f"label {ratio.min():.3f}-{ratio.max():.3f} (within 10 %)"))
    return checks


def device_speed(repository: Path, device: Device, threads: int) -> sb.Section:
    section = sb.Section(f"{device.name} vs CPU ({threads} threads): one session run, median of alternating calls")
    cpu = load_served(repository, Device("cpu", intra_threads=threads))
    other = load_served(repository, device)
    for name, model in cpu.items():
        for batch in (1, 64):
            feed = model_feed(model.card, batch)
            t = _median_alternating({"cpu": lambda: model.execute(feed), "dev": lambda: other[name].execute(feed)})
            section.rows.append(sb.Row(f"{name} batch {batch}", f"{device.name} {t['dev'] * 1e3:.2f} ms; "
                                       f"CPU {t['cpu'] * 1e3:.2f} ms", f"{t['cpu'] / t['dev']:.1f}x"))
    return section


def gpu_check(repository: Path, out: Path | None, device_text: str = "cuda", quick: bool = False) -> bool:
    """Parity on the device, then the serving benchmarks on it; prints a summary, writes the CUDA
    section of ``out`` (when given); True when every check passed."""
    device = resolve_device(device_text)
    if device_text.startswith("cuda") and device.kind != "cuda":
        raise SpecserveError(f"no CUDA device: {device.note}")
    info = sb.machine()
    checks = parity_checks(repository, device)
    print("\n".join(f"{'PASS' if c.ok else 'FAIL'} {c.name}: {c.detail}" for c in checks), flush=True)
    spectra = sb.lamost_inputs(data_dir())
    requests = sb.single_requests(repository, spectra)
    sections = [device_speed(repository, device, int(info["cores"]))]
    sections.append(sb.transport_ceiling(repository, requests, device=device.name,
                                         per_stream=200 if quick else 1000))
    sections.append(sb.latency(repository, requests, device=device.name,
                               seconds=1.0 if quick else 3.0, repeats=1 if quick else 3))
    sections.append(sb.exposure(repository, spectra, n=400 if quick else 4000, device=device.name))
    passed = all(c.ok for c in checks)
    text = "\n".join([
        f"Measured by `make gpu-check` on {device.name}. Parity: {sum(c.ok for c in checks)}/{len(checks)} checks "
        f"passed.", "", machine_block(info, device.name), "",
        "| Check | Result | Detail |", "|---|---|---|",
        *[f"| {c.name} | {'pass' if c.ok else 'FAIL'} | {c.detail} |" for c in checks], "",
        markdown(sections)])
    print(text, flush=True)
    if out is not None:
        body = out.read_text() if out.is_file() else "# specserve benchmarks\n"
        block = f"{CUDA_BEGIN}\n{text}\n{CUDA_END}"
        if CUDA_BEGIN in body:
            body = re.sub(re.escape(CUDA_BEGIN) + ".*?" + re.escape(CUDA_END), lambda _: block, body, flags=re.S)
        else:
            body = body.rstrip() + "\n\n## CUDA\n\n" + block + "\n"
        out.write_text(body)
    print(f"GPU check: {'PASS' if passed else 'FAIL'}", flush=True)
    return passed
