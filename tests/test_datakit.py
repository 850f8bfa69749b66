"""The kit inventory (`specserve data inspect`) and the runtime's independence from torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from astropy.io import fits

from specserve.export.cli import main
from specserve.runtime.datakit import inspect_kit

SPECTRAL_FOLDERS = ("lamost_dr1/fits", "lamost_dr6_formats", "miles/fits", "stelib", "sdss_dr12",
                    "sdss_boss_templates", "redrock_templates")


def test_every_kit_file_is_read(kit):
    entries = inspect_kit(kit)
    files = sorted(p for p in kit.rglob("*") if p.is_file())
    assert [e.path for e in entries] == [str(p.relative_to(kit)) for p in files]
    failures = [(e.path, e.error) for e in entries if not e.ok]
    assert failures == []
    by_path = {e.path: e for e in entries}
    fits_files = [p for p in files if p.name.endswith((".fits", ".fit", ".fits.gz"))]
    assert len(fits_files) > 1200
    for path in fits_files:
        rel = str(path.relative_to(kit))
        expected = "catalogue" if rel.startswith("seismic/") else "spectrum"
        assert by_path[rel].kind == expected, rel
        if expected == "spectrum":
            assert by_path[rel].n_spectra >= 1 and by_path[rel].wave_min < by_path[rel].wave_max
    formats = {e.detail for e in entries if e.kind == "spectrum"}
    assert {"lamost_lrs_dr1", "lamost_lrs_image", "lamost_mrs", "sdss_spec", "miles_1d", "stelib_1d",
            "boss_template", "sdss_eigen", "redrock_template", "wave_flux_table",
            "payne_apogee_npz"} <= formats
    assert sum(1 for e in entries if e.detail == "lamost_lrs_dr1") == 139
    assert sum(1 for e in entries if e.detail == "miles_1d") == len(list((kit / "miles/fits").glob("*.fits")))


def test_cli_inspect_lists_every_file(kit, capsys):
    assert main(["data", "inspect", "--data", str(kit)]) == 0
    out = capsys.readouterr().out.splitlines()
    n_files = sum(1 for p in kit.rglob("*") if p.is_file())
    assert sum(1 for line in out if line.startswith("ok ")) == n_files
    assert out[-1].startswith(f"{n_files} files") and out[-1].endswith("0 unreadable")


def test_cli_inspect_fails_on_unreadable_file(kit, tmp_path, capsys):
    broken = tmp_path / "broken.fits"
    broken.write_bytes((kit / "lamost_dr1/fits/spec-55862-B6212_sp06-003.fits").read_bytes()[:5000])
    fits.PrimaryHDU(np.zeros((3, 3, 3))).writeto(tmp_path / "cube.fits")
    good = kit / "sdss_dr12/spec-0618-52049-0372.fits"
    assert main(["data", "inspect", str(broken), str(tmp_path / "cube.fits"), str(good)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  broken.fits" in out and "FAIL  cube.fits" in out and "ok    spec-0618" in out
    assert "2 unreadable" in out


def test_cli_reports_missing_kit(tmp_path, capsys):
    assert main(["data", "inspect", "--data", str(tmp_path / "nowhere")]) == 1
    assert "data kit not found" in capsys.readouterr().err


def test_runtime_does_not_import_torch():
    code = (
        "import sys\n"
        "import specserve.runtime, specserve.runtime.io, specserve.runtime.preprocess\n"
        "import specserve.export.cli, specserve.runtime.datakit, specserve.export.bench.engine\n"
        "import specserve.runtime.contract, specserve.runtime.dtypes, specserve.runtime.engine.repository\n"
        "import specserve.runtime.embedded.analysis, specserve.runtime.serving.server, specserve.runtime.client\n"
        "specserve.export.cli._parser()  # builds every subcommand, train/export/models included\n"
        "bad = sorted(m for m in ('torch', 'onnx', 'matplotlib', 'sklearn') if m in sys.modules)\n"
        "print(','.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"runtime imported {result.stdout.strip()} {result.stderr[-500:]}"


def test_console_script_is_installed():
    exe = Path(sys.executable).with_name("specserve")
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "data" in result.stdout and "bench" in result.stdout


def test_cli_preprocess_benchmark_reports_figures(kit, capsys):
    assert main(["bench", "preprocess", "--n", "150", "--data", str(kit)]) == 0
    out = capsys.readouterr().out
    assert "150 LAMOST spectra" in out and "3011 px grid" in out
    assert "total:" in out and ("PASS" in out or "FAIL" in out)
