"""The main job, as `make serve` runs it: with an empty cache, serve the default models shipped in
the package (nothing is trained), and analyse real spectra through the server and embedded; the
numbers a user gets are the ones the shipped cards and manifest promise. And `make models`:
`specserve models build` trains, evaluates and exports into a repository.

The build here trains the default RBM on the real cv set (about 1.5 minutes on 2 cores) and the
SPT and PhysFormer with their smoke configurations (`--quick`): their default trainings take
about 6 and 16 minutes on 2 cores, more than this suite may spend. The default SPT and PhysFormer
are the shipped ones, whose served accuracy is checked here on raw test spectra.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

from specserve.runtime.client import Client
from specserve.runtime.defaults import SHIPPED, read_manifest
from specserve.training import common
from specserve.training.benchsets import raw_spectra

SPECSERVE = str(Path(sys.executable).with_name("specserve"))

# the build fixture trains the default RBM and the smoke SPT and PhysFormer (about 3 minutes on 2
# idle cores): more than the suite's per-test limit of 600 s on a busy machine
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def empty_cache(tmp_path_factory) -> dict[str, str]:
    """The environment of a user whose cache is empty (no `make models` build)."""
    cache = tmp_path_factory.mktemp("empty-cache")
    return {**os.environ, "SPECSERVE_CACHE": str(cache), "ORT_DISABLE_TELEMETRY": "1"}


@pytest.fixture(scope="module")
def server(empty_cache):
    """`specserve serve` as `make serve` runs it, with an empty cache: (address, what it said on stderr)."""
    proc = subprocess.Popen([SPECSERVE, "serve", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=empty_cache)
    line = proc.stdout.readline()
    assert "serving" in line, proc.stderr.read()
    said = proc.stderr.readline()
    yield line.strip().rsplit(" on ", 1)[1], said
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def _headline(name: str) -> dict:
    return read_manifest()["models"][name]["headline"]


@pytest.mark.slow
def test_make_serve_serves_the_shipped_models_without_training(server):
    import tritonclient.grpc as triton

    address, said = server
    assert f"repository {SHIPPED}: the shipped models (built " in said and "there is no" in said
    client = triton.InferenceServerClient(address)
    for name in read_manifest()["models"]:
        assert client.is_model_ready(name), name


def _mape(estimate: np.ndarray, truth: np.ndarray) -> float:
    return float(100 * np.mean(np.abs(estimate - truth) / truth))


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["", "int8"])
def test_served_spt_reproduces_its_card_on_raw_giants(server, variant):
    """Raw test giants (The Payne's native pixels, their own noise) sent to the shipped SPT: the
    ages and masses a user gets are its card's served numbers, within MC noise; so for its int8 twin."""
    promised = _headline(f"spt-{variant}" if variant else "spt")
    promised_coverage = promised["coverage_age"] if variant else promised["coverage_1sigma"]["age"]
    bench = common.load_set("giants")
    test = bench.split_indices("test")
    with Client(server[0]) as client:
        rows = client.analyze(raw_spectra(bench, test), models=["spt"], variant=variant)
    age = np.array([r.values["age"] for r in rows])
    mass = np.array([r.values["mass"] for r in rows])
    truth = bench.arrays["targets"][test]
    assert _mape(age, truth[:, 0]) == pytest.approx(promised["mape_age"], rel=0.03)
    assert _mape(mass, truth[:, 1]) == pytest.approx(promised["mape_mass"], rel=0.03)
    err = np.array([r.values["age_err"] for r in rows])
    coverage = np.mean(np.abs(age - truth[:, 0]) <= err)
    assert np.all(err > 0) and abs(coverage - promised_coverage) < 0.05


@pytest.mark.slow
def test_served_rbm_reproduces_its_card_on_raw_cv_spectra(server):
    promised = _headline("rbm")
    bench = common.load_cv()
    test = bench.split_indices("test")
    with Client(server[0]) as client:
        rows = client.analyze(raw_spectra(bench, test), models=["rbm"])
    p_cv = np.array([r.values.get("p_cv", np.nan) for r in rows])
    labels = bench.arrays["label"][test]
    accuracy = np.mean((p_cv > 0.5) == (labels == 1))
    assert accuracy == pytest.approx(promised["accuracy"], abs=0.005) and accuracy >= 0.99


@pytest.mark.slow
def test_analyze_real_lamost_spectra_with_the_shipped_models(server, kit, tmp_path):
    files = sorted(str(p) for p in (kit / "lamost_dr1/fits").glob("*.fits"))
    out = tmp_path / "lamost.fits"
    result = subprocess.run([SPECSERVE, "analyze", "--server", server[0], "--out", str(out), *files],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "ORT_DISABLE_TELEMETRY": "1"})
    assert result.returncode == 0, result.stderr
    table = Table.read(out)
    assert len(table) == len(files) and list(table["file"]) == files
    p_cv = np.asarray(table["p_cv"], dtype=float)
    scored = np.isfinite(p_cv)
    assert scored.sum() >= 0.9 * len(files)
    # the LAMOST DR1 files of the kit are ordinary stars: at most 1 % may be called CVs
    assert np.sum(p_cv[scored] > 0.5) <= 0.01 * scored.sum()
    notes = [str(n) for n, ok in zip(table["notes"], scored) if not ok]
    assert all("covers" in n for n in notes)
    # every model applicable to these optical spectra answered: PhysFormer's parameters are
    # inside its physical box with positive uncertainties
    teff = np.asarray(table["teff"], dtype=float)
    fitted = np.isfinite(teff)
    assert fitted.sum() >= 0.9 * len(files)
    assert np.all((teff[fitted] >= 2500) & (teff[fitted] <= 50000))
    assert np.all(np.asarray(table["teff_err"], dtype=float)[fitted] >= 0)
    logg = np.asarray(table["logg"], dtype=float)[fitted]
    assert np.all((logg >= -1) & (logg <= 6))


def _catalogues(tmp_path: Path, env: dict[str, str], files: list[str], **ways: list[str]) -> dict[str, Table]:
    """``specserve analyze <way> --out ... FILES`` for each named way: the catalogues it wrote
    (exit 1, which reports rejected spectra or unreadable files, is allowed)."""
    tables = {}
    for how, where in ways.items():
        out = tmp_path / f"{how}.fits"
        result = subprocess.run([SPECSERVE, "analyze", *where, "--out", str(out), *files],
                                capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode in (0, 1), result.stderr
        tables[how] = Table.read(out)
    return tables


@pytest.mark.slow
def test_local_analysis_matches_the_server_on_real_lamost_spectra(server, empty_cache, kit, tmp_path):
    """The embedded runtime (``analyze --local``, the shipped models by default) against the
    server: the RBM's deterministic outputs equal, PhysFormer's MC estimates within their spread."""
    files = sorted(str(p) for p in (kit / "lamost_dr1/fits").glob("*.fits"))[:40]
    tables = _catalogues(tmp_path, empty_cache, files, server=["--server", server[0]], local=["--local"])
    remote, local = tables["server"], tables["local"]
    assert list(remote["file"]) == list(local["file"]) == files and list(remote["id"]) == list(local["id"])
    assert list(remote["notes"]) == list(local["notes"])
    p_remote, p_local = (np.asarray(t["p_cv"], dtype=float) for t in (remote, local))
    np.testing.assert_allclose(p_local, p_remote, rtol=1e-5, atol=1e-6)
    teff = [np.asarray(t["teff"], dtype=float) for t in (remote, local)]
    err = [np.asarray(t["teff_err"], dtype=float) for t in (remote, local)]
    fitted = np.isfinite(teff[0])
    assert fitted.sum() >= 0.9 * len(files) and np.array_equal(fitted, np.isfinite(teff[1]))
    # two independent MC draws of the same estimate: their difference has the combined spread
    spread = np.sqrt(err[0][fitted] ** 2 + err[1][fitted] ** 2) / np.sqrt(
        np.asarray(remote["n_samples"], dtype=float)[fitted])
    assert np.mean(np.abs(teff[0][fitted] - teff[1][fitted]) <= 4 * spread + 1e-3) >= 0.95


@pytest.mark.slow
def test_int8_variants_are_served_and_run_embedded(server, empty_cache, kit, tmp_path):
    """The shipped int8 twins: the server and ``analyze --local --variant int8`` run the same graph
    (the RBM's probabilities equal), close to fp32's."""
    files = sorted(str(p) for p in (kit / "lamost_dr1/fits").glob("*.fits"))[:20]
    tables = _catalogues(tmp_path, empty_cache, files, fp32=["--local"], int8=["--local", "--variant", "int8"],
                         served=["--server", server[0], "--variant", "int8"])
    used = [m for row in tables["int8"]["models"] if row is not np.ma.masked for m in str(row).split(";") if m]
    assert used and all(m.startswith(("physformer-int8:", "rbm-int8:", "spt-int8:")) for m in used)
    p = {k: np.asarray(v["p_cv"], dtype=float) for k, v in tables.items()}
    np.testing.assert_allclose(p["served"], p["int8"], rtol=1e-5, atol=1e-6)  # one int8 graph, two runtimes
    scored = np.isfinite(p["fp32"])
    assert scored.sum() >= 0.9 * len(files) and np.all(np.abs(p["int8"][scored] - p["fp32"][scored]) < 0.05)


# `make models`: the build

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("main-job")
    repo = tmp / "models"
    common.load_cv()  # the sets from the shared cache (built there if missing)
    common.load_set("giants")
    common.load_set("stars")
    result = subprocess.run([SPECSERVE, "models", "build", "--repository", str(repo), "--if-missing",
                             "--quick", "spt,physformer", "--variants", "int8"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    return repo, result.stdout


@pytest.mark.slow
def test_models_build_reports_and_exports_the_default_rbm(built):
    repo, out = built
    assert "rbm " in out and "logreg_binarised" in out and "bernoulli_rbm_logreg" in out
    assert (repo / "rbm" / "1" / "model.onnx").is_file() and (repo / "rbm" / "config.pbtxt").is_file()
    run_dir = Path(out.split("training the RBM on 'cv' (")[1].split(" into ")[1].splitlines()[0])
    report = json.loads((run_dir / "report.json").read_text())
    assert report["served_vs_torch"]["failures"] == []
    # The target is accuracy >= 0.99 at S/N >= 20 with <= 1 % false positives on real
    # non-CV spectra; the default seed meets it on this machine (numbers in the issue note). One
    # error in 399 test spectra is 0.25 %, so these looser bounds allow a few more errors from
    # floating-point differences between machines while still failing a model that is clearly worse.
    assert report["target"]["measured_min_accuracy"] >= 0.98
    assert report["target"]["measured_max_fpr_real_non_cv"] <= 0.02
    assert (run_dir / "report.png").stat().st_size > 10_000


@pytest.mark.slow
def test_models_build_reports_and_exports_the_spt(built):
    repo, out = built
    assert "ridge" in out and "gradient_boosting" in out and "label_oracle" in out and "MC check" in out
    assert "smoke configuration" in out.split("training the SPT on 'giants'")[1].splitlines()[0]
    assert (repo / "spt" / "1" / "model.onnx").is_file()
    run_dir = Path(out.split("training the SPT on 'giants' (")[1].split(" into ")[1].splitlines()[0])
    report = json.loads((run_dir / "report.json").read_text())
    assert report["served_vs_torch"]["failures"] == []
    spt = report["served"]
    # a smoke model: its numbers are real but not the default's (docs/spt.md has those)
    assert 0 < spt["mape_age"] < 100 and 0 < spt["mape_mass"] < 100
    assert 0 < spt["coverage_1sigma"]["age"] <= 1 and (run_dir / "report.png").stat().st_size > 10_000


@pytest.mark.slow
def test_models_build_exports_both_physformer_graphs(built):
    repo, out = built
    assert "training PhysFormer on 'stars'" in out and "smoke configuration" in out and "knn" in out
    for name in ("physformer", "physformer-generate"):
        assert (repo / name / "1" / "model.onnx").is_file() and (repo / name / "config.pbtxt").is_file()
    run_dir = Path(out.split("training PhysFormer on 'stars' (")[1].split(" into ")[1].splitlines()[0])
    report = json.loads((run_dir / "report.json").read_text())
    assert report["target"]["in_box_fraction"] == 1.0  # the box holds whatever the training
    assert set(report["rows"]) >= {"physformer", "ridge", "knn", "cannon_quadratic"}




@pytest.mark.slow
def test_models_build_makes_measured_int8_variants(built):
    """``models build --variants int8``: each model's int8 twin in the repository, with its size,
    its parity against fp32 and its accuracy on the served test split in its card."""
    import onnxruntime as ort

    from specserve.runtime.contract import ModelCard
    from specserve.runtime.layout import read_config

    repo, out = built
    for name in ("rbm", "spt", "physformer"):
        fp32 = repo / name / "1" / "model.onnx"
        int8 = repo / f"{name}-int8" / "1" / "model.onnx"
        assert int8.is_file() and read_config(repo / f"{name}-int8").name == f"{name}-int8"
        props = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
        card = ModelCard.from_metadata_props(props)
        variant = card.metrics["variant"]
        assert card.kind == name and variant["of"] == name and variant["precision"] == "int8"
        # measured before the variant's card went into the file: the file grew by less than its metadata
        grown = int8.stat().st_size - variant["size_ratio"] * fp32.stat().st_size
        assert 0 <= grown <= sum(len(k) + len(v) for k, v in props.items())
        assert max(variant["parity"].values()) <= 1.0 and variant["accuracy"]["delta"]
        assert f"{name}-int8: " in out
    # the target, at most 30 % of the fp32 file, on the default RBM (the SPT and PhysFormer here are
    # smoke models, whose small weights are a smaller part of their files)
    rbm_int8 = repo / "rbm-int8" / "1" / "model.onnx"
    assert rbm_int8.stat().st_size <= 0.30 * (repo / "rbm" / "1" / "model.onnx").stat().st_size
