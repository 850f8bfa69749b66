"""The benchmark sets: sizes, contents, splits, determinism, and The Payne emulator."""

from __future__ import annotations

import json

import numpy as np
import pytest

from specserve.export.cli import main
from specserve.runtime.errors import DatasetError
from specserve.training import benchsets
from specserve.training.payne import APOGEE_GRID, PayneEmulator

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(kit, tmp_path_factory):
    """Each set built twice with the documented seed into two caches."""
    caches = [tmp_path_factory.mktemp("cache_a"), tmp_path_factory.mktemp("cache_b")]
    out = {}
    for name in ("giants", "stars", "cv"):
        first, folder = benchsets.build(name, data=kit, cache=caches[0])
        second, folder_b = benchsets.build(name, data=kit, cache=caches[1], plot=False)
        out[name] = (first, folder, second, folder_b)
    return out


@pytest.mark.parametrize("name", ["giants", "stars", "cv"])
def test_build_is_deterministic(built, name):
    first, folder, second, folder_b = built[name]
    assert first.meta["content_hash"] == second.meta["content_hash"]
    for key in first.arrays:
        assert (folder / f"{key}.npy").read_bytes() == (folder_b / f"{key}.npy").read_bytes(), key
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["content_hash"] == benchsets.content_hash(benchsets.load(name, folder.parent).arrays)
    png = (folder / "examples.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.parametrize("name", ["giants", "stars", "cv"])
def test_splits_and_arrays(built, name):
    bench = built[name][0]
    n = bench.size
    split = bench.arrays["split"]
    assert set(np.unique(split)) == {0, 1, 2}
    fractions = np.bincount(split, minlength=3) / n
    np.testing.assert_allclose(fractions, [0.70, 0.15, 0.15], atol=0.02)
    sizes = bench.meta["split_sizes"]
    assert sizes["train"] + sizes["validation"] + sizes["test"] == n
    flux, ivar, mask = bench.arrays["flux"], bench.arrays["ivar"], bench.arrays["mask"]
    assert flux.shape == ivar.shape == mask.shape and flux.shape[0] == n
    assert flux.shape[1] == bench.preprocessing.grid.length
    assert np.isfinite(flux).all() and np.isfinite(ivar).all() and (ivar >= 0).all()
    assert (ivar[mask] == 0).all()
    coverage = 1.0 - mask.mean(axis=1)
    assert coverage.min() >= benchsets.MIN_GRID_COVERAGE - (0.15 if name == "giants" else 0.0)
    median = np.nanmedian(np.where(mask, np.nan, flux))
    assert 0.9 < median < 1.03  # normalised: continuum at 1, lines below


def test_giants_contents(built):
    bench = built["giants"][0]
    assert 1800 <= bench.size <= 2000  # Miglio 2021 x APOKASC-3 gives ~1,900 giants
    kic = bench.arrays["kic"]
    assert np.unique(kic).size == bench.size
    payne = PayneEmulator.load(benchsets.data_dir() / "payne_kurucz")
    assert payne.in_range(bench.arrays["labels"].astype(np.float64)).all()
    age, mass = bench.arrays["targets"].T
    assert (age > 0).all() and (age < 20).all() and (mass > 0.5).all() and (mass < 4).all()
    snr = bench.arrays["snr"]
    assert snr.min() >= 50 and snr.max() <= 300
    stats = bench.meta["statistics"]["targets"]["age"]["all"]
    assert stats["n"] == bench.size and stats["min"] == pytest.approx(float(age.min()))
    # Measured noise of continuum-normalised pixels follows the injected S/N.
    ivar = bench.arrays["ivar"]
    ratio = np.median(np.sqrt(ivar[ivar > 0]))
    assert 30 < ratio < 400


def test_stars_contents(built):
    bench = built["stars"][0]
    assert bench.size >= 800
    assert set(bench.meta["sources"]) == {"miles", "lamost"}
    assert bench.meta["sources"]["lamost"] >= 80
    teff, logg, feh = bench.arrays["labels"].T
    assert np.isfinite(bench.arrays["labels"]).all()
    assert teff.min() > 2500 and teff.max() < 50000 and logg.min() > -1 and logg.max() < 6
    assert feh.min() > -4 and feh.max() < 2.0  # MILES lists a few chemically peculiar stars
    for source in ("miles", "lamost"):  # every source is in every split
        sel = bench.arrays["source"] == source
        assert set(np.unique(bench.arrays["split"][sel])) == {0, 1, 2}
    assert bench.meta["preprocessing"]["grid"]["resolution"] == 1800.0
    wave = bench.preprocessing.grid.wavelength
    assert 3695 < wave[0] < 3705 and 7390 < wave[-1] <= 7400


def test_cv_contents(built):
    bench = built["cv"][0]
    label = bench.arrays["label"]
    assert bench.meta["n_real_negatives"] >= 1000
    assert abs(int(label.sum()) - int((label == 0).sum())) <= 1
    sources = set(bench.arrays["source"][label == 0].tolist())
    assert {"lamost", "miles", "stelib", "sdss", "boss_template", "sdss_star_template", "qso_template"} <= sources
    assert set(bench.arrays["source"][label == 1].tolist()) == {"cv_sdss_eigen", "cv_desi_redrock"}
    test = bench.arrays["split"] == 2
    assert sources <= set(bench.arrays["source"][test & (label == 0)].tolist())
    # CVs show Balmer emission: H-alpha peaks above the continuum far more often than in non-CVs.
    wave = bench.preprocessing.grid.wavelength
    ha = (wave > 6555) & (wave < 6575)
    peak = bench.arrays["flux"][:, ha].max(axis=1)
    assert np.mean(peak[label == 1] > 1.1) > 0.5 > np.mean(peak[label == 0] > 1.1)


def test_other_seed_changes_the_set(kit, built, tmp_path):
    other, _ = benchsets.build("stars", data=kit, cache=tmp_path, seed=1, plot=False)
    assert other.meta["content_hash"] != built["stars"][0].meta["content_hash"]
    assert other.size == built["stars"][0].size


def test_load_detects_tampering(built, tmp_path):
    folder = built["stars"][3]
    flux = np.load(folder / "flux.npy")
    flux[0, 0] += 1.0
    np.save(folder / "flux.npy", flux)
    with pytest.raises(DatasetError, match="content hash"):
        benchsets.load("stars", folder.parent, verify=True)
    with pytest.raises(DatasetError, match="not built"):
        benchsets.load("giants", tmp_path)


def test_cli_build_prints_size_and_hash(kit, tmp_path, capsys):
    assert main(["data", "build", "stars", "--data", str(kit), "--cache", str(tmp_path), "--no-plot"]) == 0
    out = capsys.readouterr().out
    meta = json.loads((tmp_path / "stars" / "meta.json").read_text())
    assert f"stars: {meta['size']} spectra" in out and meta["content_hash"] in out


def test_payne_emulator_matches_documented_spectrum(kit):
    payne = PayneEmulator.load(kit / "payne_kurucz")
    flux = payne(np.array([[4750.0, 2.7, 0.0, 0.0]]))[0]
    assert flux.shape == (7214,)
    assert 5.6 < np.median(flux) < 6.2 and 2.5 < flux.min() < 3.5 and 6.0 < flux.max() < 6.6
    # Lines weaken at low metallicity: line depth below the upper envelope shrinks.
    poor = payne(np.array([[4750.0, 2.7, -0.9, 0.0]]))[0]
    depth = lambda f: np.mean(1 - f / np.percentile(f, 95))  # noqa: E731
    assert depth(poor) < 0.7 * depth(flux)
    full, mask = payne.full_grid(flux[None, :])
    assert full.shape == (1, APOGEE_GRID.length) and mask.sum() == APOGEE_GRID.length - 7214 + payne.bad_pixels.sum()
    np.testing.assert_allclose(APOGEE_GRID.wavelength[payne.grid_index()], payne.wavelength, rtol=1e-9)
