"""The SPT training recipe on the ``giants`` set: :func:`train_spt`, :func:`mc_predict` and
:func:`calibrate`.

Training: AdamW with a linear warm-up and a cosine decay of the learning rate (per step), gradient
clipping at 1, the loss of :meth:`SpectralTransformer.loss` on log targets (age in Gyr, mass in
Msun) and, as an auxiliary task, the four atmospheric labels. Every epoch, a fraction of the
training spectra is augmented at the raw level (noise, radial-velocity residual, tilt, masks) and
goes through the serving pipeline (``augment_*``, :func:`specserve.training.inputs.training_pool`). The kept epoch is the one with the
lowest validation MAPE (mean of age and mass, from the MC mean of 16 samples).

Calibration: MC dropout spreads measure the network's own uncertainty only, not the scatter of
the seismic ages it learns from, so the raw 1-sigma intervals are too narrow. After training,
:func:`calibrate` sets the model's ``std_scale`` per target to the factor that puts 68.27 % of
the validation targets inside mean +- std (the test split is never used); the raw coverage is
kept in the report.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from specserve.runtime.errors import SpecserveError
from specserve.training.common import ONE_SIGMA
from specserve.training.inputs import model_inputs, training_pool
from specserve.training.spt.model import SpectralTransformer, SPTConfig

if TYPE_CHECKING:
    from specserve.training.benchsets import BenchmarkSet
    from specserve.training.trainer import Trainer

VALIDATION_SAMPLES = 16


def log_targets(bench: BenchmarkSet, idx: np.ndarray) -> np.ndarray:
    """log(age / Gyr), log(mass / Msun) of the spectra ``idx``: (n, 2) float32."""
    return np.log(bench.arrays["targets"][idx]).astype(np.float32)


def mc_predict(model: SpectralTransformer, flux: np.ndarray, n_samples: int, *, seed: int = 0,
               batch_size: int = 128, samples: bool = False) -> tuple[np.ndarray, ...]:
    """MC mean and std (physical units, (n, 2)) of ``model`` on flux (n, P); with ``samples``
    also the samples (T, n, 2). Reproducible for a given ``seed`` (torch's generator is reseeded)."""
    model.eval()
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    means, stds, draws = [], [], []
    try:
        with torch.no_grad():
            for lo in range(0, flux.shape[0], batch_size):
                x = torch.from_numpy(np.ascontiguousarray(flux[lo:lo + batch_size]))
                m, s, d = model(x, torch.tensor([n_samples]), torch.zeros(1))
                means.append(m.numpy())
                stds.append(s.numpy())
                if samples:
                    draws.append(d.numpy())
    finally:
        torch.random.set_rng_state(gen_state)
    out = (np.concatenate(means), np.concatenate(stds))
    return out + (np.concatenate(draws, axis=1),) if samples else out


def mape(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Mean absolute percentage error per column, in per cent."""
    return 100.0 * np.mean(np.abs(pred - truth) / truth, axis=0)


def coverage(truth: np.ndarray, mean: np.ndarray, std: np.ndarray, k: float = 1.0) -> np.ndarray:
    """Fraction of truths inside mean +- k std, per column."""
    return np.mean(np.abs(truth - mean) <= k * std, axis=0)


def calibrate(model: SpectralTransformer, bench: BenchmarkSet, n_samples: int, seed: int = 0) -> dict[str, Any]:
    """Set ``model.std_scale`` from the validation split (module docstring); returns the numbers."""
    val = bench.split_indices("validation")
    truth = bench.arrays["targets"][val]
    model.std_scale.fill_(1.0)
    mean, std = mc_predict(model, model_inputs(bench, val), n_samples, seed=seed)
    ratio = np.abs(truth - mean) / np.maximum(std, 1e-12)
    scale = np.quantile(ratio, ONE_SIGMA, axis=0)
    model.std_scale.copy_(torch.from_numpy(scale.astype(np.float32)))
    return {"std_scale": [float(s) for s in scale], "n_samples": n_samples, "split": "validation",
            "raw_coverage_1sigma": [float(c) for c in coverage(truth, mean, std)]}


def train_spt(config: SPTConfig, run_dir: str | Path, bench: BenchmarkSet, *,
              train_indices: np.ndarray | None = None, progress: bool | None = None,
              run_info: Mapping[str, Any] | None = None) -> tuple[SpectralTransformer, Trainer]:
    """Train an SPT on ``bench`` (the ``giants`` set) into ``run_dir``, calibrate it, save it.

    ``train_indices`` restricts training to some spectra of the train split.
    """
    from specserve.training.trainer import Phase, Trainer, run_config, seed_everything, update_checkpoint, warmup_cosine

    cfg = config
    a = bench.arrays
    if a["flux"].shape[1] != cfg.n_pixels:
        raise SpecserveError(f"set {bench.name!r} has {a['flux'].shape[1]} pixels, the config {cfg.n_pixels}")
    if "targets" not in a:
        raise SpecserveError(f"set {bench.name!r} has no age/mass targets (SPT trains on 'giants')")
    train = bench.split_indices("train") if train_indices is None else np.asarray(train_indices)
    val = bench.split_indices("validation")
    y_train = torch.from_numpy(log_targets(bench, train))
    aux_train = torch.from_numpy(a["labels"][train].astype(np.float32))
    x_val = model_inputs(bench, val)
    truth_val = a["targets"][val]

    config_json = run_config("spt", cfg.to_dict(), bench, train, val.size, train_indices is not None, run_info)
    seed_everything(cfg.seed)  # the initial weights depend on the seed only, not on what ran before
    model = SpectralTransformer(cfg)
    trainer = Trainer(model, run_dir, config_json, model_kind="spt", model_config=cfg.to_dict(), seed=cfg.seed,
                      log_every=10, progress=progress)
    with torch.no_grad():
        model.set_standardisation(y_train, aux_train)
    data_rng = np.random.default_rng([cfg.seed, 2])
    pool = training_pool(cfg, bench, train, np.random.default_rng([cfg.seed, 3]))

    def batches(epoch: int):
        x = torch.from_numpy(pool.epoch(epoch).model_flux())
        order = torch.from_numpy(data_rng.permutation(train.size))
        for lo in range(0, train.size, cfg.batch_size):
            j = order[lo:lo + cfg.batch_size]
            yield x[j], y_train[j], aux_train[j]

    def validate(m: SpectralTransformer) -> dict[str, float]:
        mean, _ = mc_predict(m, x_val, VALIDATION_SAMPLES, seed=cfg.seed)
        err = mape(truth_val, mean)
        return {"mape_age": float(err[0]), "mape_mass": float(err[1]), "mape": float(err.mean())}

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = warmup_cosine(optimizer, cfg.epochs, -(-train.size // cfg.batch_size), cfg.warmup_epochs)
    trainer.fit(Phase("train", cfg.epochs, optimizer, batches, lambda m, batch: m.loss(*batch),
                      validate=validate, monitor="mape", grad_clip=1.0, scheduler=scheduler))
    calibration = calibrate(model, bench, cfg.mc_samples, seed=cfg.seed)
    update_checkpoint(trainer.checkpoint_path, model, calibration=calibration)
    return model, trainer
