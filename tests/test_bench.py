"""The benchmark and GPU-check code on this machine's CPU: IO binding, the parity checks, and a
quick ``specserve bench all`` writing every section of the report (sizes too small to quote)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from specserve.export.bench.suite import NO_CUDA, parity_checks
from specserve.export.rbm import export_rbm
from specserve.export.spt import export_spt
from specserve.runtime.contract import ModelCard
from specserve.runtime.embedded.providers import Device, run_bound

SPECSERVE = str(Path(sys.executable).with_name("specserve"))


def test_io_binding_gives_the_same_outputs_as_session_run(cv_run, tmp_path):
    _, run_dir, _, _ = cv_run
    folder, _ = export_rbm(run_dir, tmp_path / "repo", served_check=False)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    card = ModelCard.from_metadata_props(session.get_modelmeta().custom_metadata_map)
    feed = card.contract.dummy_inputs(card.dims, batch=5, seed=2)
    names = card.contract.output_names
    plain = session.run(names, feed)
    bound = run_bound(session, feed, names, ("cpu", 0))
    assert len(bound) == len(plain)
    for a, b in zip(plain, bound):
        np.testing.assert_array_equal(a, b)


def test_gpu_check_parity_code_on_the_cpu(cv_run, spt_run, tmp_path):
    export_rbm(cv_run[1], tmp_path / "repo", served_check=False)
    export_spt(spt_run[1], tmp_path / "repo", served_check=False)
    checks = {c.name: c for c in parity_checks(tmp_path / "repo", Device("cpu"))}
    assert set(checks) == {"rbm: session on cpu", "rbm: outputs match the CPU", "spt: session on cpu",
                           "spt: MC samples random on cpu", "spt: MC statistics match the CPU"}
    assert all(c.ok for c in checks.values()), [(c.name, c.detail) for c in checks.values() if not c.ok]
    z = float(re.search(r"max \|z\| of the means ([0-9.]+)", checks["spt: MC statistics match the CPU"].detail).group(1))
    assert z < 5


def test_bench_all_quick_writes_every_section(cv_run, tmp_path):
    _, run_dir, _, _ = cv_run
    export_rbm(run_dir, tmp_path / "repo", served_check=False)
    out = tmp_path / "BENCHMARKS.md"
    # in a subprocess: the benchmark speaks KServe with our protos, which cannot share this
    # process with tritonclient's (see protos/README.md)
    result = subprocess.run([SPECSERVE, "bench", "all", "--quick", "--repository", str(tmp_path / "repo"),
                             "--out", str(out), "--runs", str(Path(run_dir).parent)],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "ORT_DISABLE_TELEMETRY": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    for title in ("ONNX Runtime vs torch eager", "Transport ceiling", "Serving overhead", "Latency of single-spectrum",
                  "One LAMOST exposure", "## Machine", "## CUDA"):
        assert title in text, title
    assert re.search(r"\| rbm batch 1 \| ORT [0-9.]+ ms; torch [0-9.]+ ms \| ORT [0-9.]+x faster \| >= 2x", text)
    assert re.search(r"\| rbm batch 64 \| ORT [0-9.]+ ms; torch [0-9.]+ ms", text)
    assert re.search(r"specserve [0-9,]+ msg/s; echo [0-9,]+ msg/s \| [0-9]+% of echo", text)
    assert re.search(r"no model work \| [0-9,]+ msg/s \| [0-9]+% of echo", text)
    assert re.search(r"\| [0-9.]+ us per request \(mean batch [0-9]+ rows\) \| [0-9,]+ requests/s without gRPC", text)
    assert re.search(r"served [0-9,]+ spectra/s; in-process [0-9,]+ spectra/s", text)
    assert len(re.findall(r"\| rbm at (10|50|90)% of [0-9,]+ req/s", text)) == 3
    assert re.search(r"\| 400 spectra .* \| [0-9.]+ s wall, [0-9,]+ spectra/s \(400 answered\)", text)
    assert re.search(r"\| against its own compute ceiling \| ceiling [0-9.]+ s; wall [0-9.]+ s \| [0-9]+% of the ceiling", text)
    assert re.search(r"\| stage: preprocessing for rbm \(3,011-pixel grid\) \| [0-9.]+ s for [0-9,]+ spectra \| "
                     r"[0-9.]+ ms per spectrum; [0-9]+% of the work", text)
    assert re.search(r"\| stage: rbm session runs \(batches of up to 64\) \| [0-9.]+ s for [0-9,]+ spectra", text)
    assert NO_CUDA in text
    # a second run keeps a CUDA section written by the GPU check
    out.write_text(text.replace(NO_CUDA, "CUDA numbers from a GPU machine")
                   + "\n<!-- embedded:begin -->\nembedded rows\n<!-- embedded:end -->\n")
    from specserve.export.bench.suite import write_report

    write_report(out, "# specserve benchmarks\n\nnew body")
    kept = out.read_text()
    assert "CUDA numbers from a GPU machine" in kept and "new body" in kept and "\nembedded rows\n" in kept


def test_gpu_check_script_runs_end_to_end_on_the_cpu(cv_run, tmp_path):
    """``specserve bench gpu`` is meant for a CUDA machine; with --device cpu the same code runs
    here, so the script is known to work before a GPU is lent. It rewrites only the CUDA section."""
    export_rbm(cv_run[1], tmp_path / "repo", served_check=False)
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# specserve benchmarks\n\n## CPU\n\nthe CPU table\n")
    result = subprocess.run([SPECSERVE, "bench", "gpu", "--device", "cpu", "--quick", "--repository",
                             str(tmp_path / "repo"), "--out", str(out)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "ORT_DISABLE_TELEMETRY": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "PASS rbm: outputs match the CPU" in result.stdout and "GPU check: PASS" in result.stdout
    text = out.read_text()
    assert "the CPU table" in text and "## CUDA" in text and "Parity: 2/2 checks passed" in text
    assert re.search(r"\| rbm batch 1 \| cpu [0-9.]+ ms; CPU [0-9.]+ ms", text)
    assert "Transport ceiling" in text and "One LAMOST exposure" in text


def test_bench_embedded_measures_every_model_and_variant(cv_run, tmp_path):
    import onnxruntime as ort

    from specserve.export.variants import export_variants
    from specserve.runtime.contract import ModelCard

    _, run_dir, _, _ = cv_run
    folder, _ = export_rbm(run_dir, tmp_path / "repo", served_check=False)
    card = ModelCard.from_metadata_props(ort.InferenceSession(
        str(folder / "model.onnx"), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map)
    reports = export_variants(folder, tmp_path / "repo", "rbm", card, None)
    assert [r.name for r in reports] == ["rbm-int8", "rbm-fp16"] and all(r.accuracy is None for r in reports)
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# specserve benchmarks\n\nbody\n")
    for _ in range(2):  # the second run replaces the section
        result = subprocess.run([SPECSERVE, "bench", "embedded", "--quick", "--repository", str(tmp_path / "repo"),
                                 "--out", str(out)], capture_output=True, text=True, timeout=600,
                                env={**os.environ, "ORT_DISABLE_TELEMETRY": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert text.count("<!-- embedded:begin -->") == 1 and "body" in text
    rows = {m.group(1): m for m in re.finditer(
        r"\| (rbm(?:-int8|-fp16)?) \| ([0-9.]+) \| ([0-9.]*) \| [0-9.]+ \| ([0-9.]+) / ([0-9.]+) \|", text)}
    assert set(rows) == {"rbm", "rbm-int8", "rbm-fp16"}
    assert float(rows["rbm-int8"].group(3)) <= 0.30 and 0.45 <= float(rows["rbm-fp16"].group(3)) <= 0.55
    assert all(float(m.group(4)) <= float(m.group(5)) for m in rows.values())  # p50 <= p99
    # one LAMOST file through every model of each precision, arena on and off
    pipeline = re.findall(r"\| (fp32|int8|fp16) \| (on|off) \| ([a-z0-9, -]+) \| [0-9.]+ \| [0-9.]+ \| "
                          r"([0-9]+) \(baseline ([0-9]+)\) \|", text)
    assert {(p, a) for p, a, *_ in pipeline} == {(p, a) for p in ("fp32", "int8", "fp16") for a in ("on", "off")}
    for precision, _, models, peak, base in pipeline:
        assert models == ("rbm" if precision == "fp32" else f"rbm-{precision}") and int(peak) > int(base)


def test_profile_tables_of_the_stages_and_the_graph(cv_run, tmp_path):
    """The tables of docs/performance.md: the stages of the exposure's work and ONNX Runtime's
    per-operator kernel time, on a real export and real LAMOST spectra."""
    from specserve.export.bench import serving as sb
    from specserve.export.bench.profile import graph_table, stages_table
    from specserve.runtime.datakit import data_dir

    folder, _ = export_rbm(cv_run[1], tmp_path / "repo", served_check=False)
    text = stages_table(tmp_path / "repo", sb.lamost_inputs(data_dir())[:40], 80)
    assert re.search(r"\| preprocessing for rbm \(3,011-pixel grid\) \| [0-9.]+ \| [0-9.]+ \| [0-9]+% \|", text)
    assert re.search(r"\| total \(single-core work\) \| [0-9.]+ \| [0-9.]+ \| 100% \|", text)
    graph = graph_table(folder / "model.onnx", batch=8, runs=3)
    assert graph.startswith("rbm at batch 8: ") and re.search(r"\| MatMul \| [0-9.]+ \| [0-9]+% \|", graph)
