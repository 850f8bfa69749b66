"""The main job, as `make serve` runs it: build the default model repository (the full default RBM
training on the real cv set), serve it, and analyse real spectra through the server.

Slow (about 40 s on 2 cores): it is the only test that trains the model users get.
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
from specserve.training import commands

SPECSERVE = str(Path(sys.executable).with_name("specserve"))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("main-job")
    repo = tmp / "models"
    commands.load_cv()  # the set from the shared cache (built there if missing)
    result = subprocess.run([SPECSERVE, "models", "build", "--repository", str(repo), "--if-missing"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    return repo, result.stdout


@pytest.fixture(scope="module")
def server(built):
    proc = subprocess.Popen([SPECSERVE, "serve", "--repository", str(built[0]), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "serving" in line, proc.stderr.read()
    yield line.strip().rsplit(" on ", 1)[1]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


@pytest.mark.slow
def test_models_build_reports_and_exports_the_default_rbm(built):
    repo, out = built
    assert "rbm " in out and "logreg_binarised" in out and "bernoulli_rbm_logreg" in out
    assert (repo / "rbm" / "1" / "model.onnx").is_file() and (repo / "rbm" / "config.pbtxt").is_file()
    run_dir = Path(out.split("training the RBM on 'cv' (")[1].split(" into ")[1].splitlines()[0])
    report = json.loads((run_dir / "report.json").read_text())
    # The target is accuracy >= 0.99 at S/N >= 20 with <= 1 % false positives on real
    # non-CV spectra; the default seed meets it on this machine (numbers in the issue note). One
    # error in 399 test spectra is 0.25 %, so these looser bounds allow a few more errors from
    # floating-point differences between machines while still failing a model that is clearly worse.
    assert report["target"]["measured_min_accuracy"] >= 0.98
    assert report["target"]["measured_max_fpr_real_non_cv"] <= 0.02
    assert (run_dir / "report.png").stat().st_size > 10_000


@pytest.mark.slow
def test_served_default_model_classifies_the_cv_test_split(server):
    bench = commands.load_cv()
    test = bench.split_indices("test")
    wave = bench.preprocessing.grid.wavelength
    items = [(f"t{i}", wave, bench.arrays["flux"][i]) for i in test]  # normalised spectra, sent as they are
    with Client(server) as client:
        rows = client.analyze(items, models=["rbm"])
    assert [r.id for r in rows] == [f"t{i}" for i in test]
    applicable = np.array(["p_cv" in r.values for r in rows])
    assert applicable.mean() > 0.95
    p_cv = np.array([r.values.get("p_cv", np.nan) for r in rows])
    labels = bench.arrays["label"][test]
    accuracy = np.mean((p_cv[applicable] > 0.5) == (labels[applicable] == 1))
    # the server renormalises the already normalised flux and masks nothing, so a few spectra may
    # move; accuracy well above chance (0.5) and near the report's (>= 0.99) shows the whole path works
    assert accuracy >= 0.97, accuracy


@pytest.mark.slow
def test_analyze_real_lamost_spectra_with_the_default_model(server, kit, tmp_path):
    files = sorted(str(p) for p in (kit / "lamost_dr1/fits").glob("*.fits"))
    out = tmp_path / "lamost.fits"
    result = subprocess.run([SPECSERVE, "analyze", "--server", server, "--out", str(out), *files],
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
