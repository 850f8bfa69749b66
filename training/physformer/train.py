"""The PhysFormer training recipe on the ``stars`` set: :func:`train_physformer`.

AdamW with warm-up and cosine decay, gradient clipping at 1, the loss of
:meth:`~specserve.training.physformer.model.PhysFormer.loss` (reduced chi-square of the reconstruction
from the encoded parameters and from the catalogue parameters, plus the MSE of the standardised
parameters). Every epoch a fraction of the training spectra is augmented on the raw spectrum
(noise at S/N ``augment_snr_min``-``augment_snr_max``, constant or photon-like, a radial-velocity
residual, a flux-calibration tilt, masked pixel runs) and goes through the serving pipeline
(:func:`specserve.training.inputs.training_pool`), so the encoder learns what a served noisy
spectrum looks like after normalisation; the reconstruction is scored against that spectrum with
its own ivar. The kept epoch has the lowest validation parameter loss.

With ``unlabelled_sources`` (semi-supervised, issue 20) every batch also carries
``unlabelled_batch`` of the kit's unlabelled spectra (:mod:`.unlabelled`), scored by their
reconstruction chi-square only. :func:`build_ensemble` combines finished runs into one
:class:`~specserve.training.physformer.model.PhysFormerEnsemble` and calibrates it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from specserve.runtime.errors import SpecserveError
from specserve.runtime.preprocess import estimated_ivar
from specserve.training.inputs import observed, training_pool
from specserve.training.physformer.model import PhysFormer, PhysFormerConfig

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from specserve.training.benchsets import BenchmarkSet
    from specserve.training.trainer import Trainer


def inputs(bench: BenchmarkSet, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Model input flux (masked pixels filled) and ivar (masked 0) of spectra ``idx`` as built."""
    prepared = observed(bench, idx)
    return prepared.model_flux(), prepared.model_ivar()


def train_physformer(config: PhysFormerConfig, run_dir: str | Path, bench: BenchmarkSet, *,
                     train_indices: np.ndarray | None = None, progress: bool | None = None,
                     run_info: Mapping[str, Any] | None = None) -> tuple[PhysFormer, Trainer]:
    from specserve.training.trainer import Phase, Trainer, run_config, seed_everything, update_checkpoint, warmup_cosine

    cfg = config
    a = bench.arrays
    if a["flux"].shape[1] != cfg.n_pixels:
        raise SpecserveError(f"set {bench.name!r} has {a['flux'].shape[1]} pixels, the config {cfg.n_pixels}")
    grid = bench.preprocessing.grid
    if abs(grid.start - cfg.log10_start) > 1e-9 or abs(grid.step - cfg.log10_step) > 1e-12:
        raise SpecserveError("the config's wavelength grid is not the set's")
    train = bench.split_indices("train") if train_indices is None else np.asarray(train_indices)
    val = bench.split_indices("validation")
    labels = torch.from_numpy(a["labels"].astype(np.float32))
    x_val, iv_val = (torch.from_numpy(v) for v in inputs(bench, val))
    y_val = labels[val]
    config_json = run_config("physformer", cfg.to_dict(), bench, train, val.size, train_indices is not None, run_info)
    seed_everything(cfg.seed)  # the initial weights depend on the seed only, not on what ran before
    model = PhysFormer(cfg)
    trainer = Trainer(model, run_dir, config_json, model_kind="physformer", model_config=cfg.to_dict(),
                      seed=cfg.seed, log_every=5, progress=progress)
    with torch.no_grad():
        model.set_standardisation(labels[train])
    rng = np.random.default_rng([cfg.seed, 2])
    pool = training_pool(cfg, bench, train, np.random.default_rng([cfg.seed, 3]))
    unlabelled = unlabelled_inputs(cfg, bench)

    def batches(epoch: int):
        prepared = pool.epoch(epoch)
        x, iv = torch.from_numpy(prepared.model_flux()), torch.from_numpy(prepared.model_ivar())
        seen = iv
        if cfg.blind_ivar_fraction > 0:  # the encoder told only what a spectrum without ivar gets
            blind = rng.random(train.size) < cfg.blind_ivar_fraction
            estimate = torch.from_numpy(estimated_ivar(prepared.flux[blind], prepared.mask[blind]).astype(np.float32))
            seen = iv.clone()
            seen[torch.from_numpy(np.flatnonzero(blind))] = estimate
        order = torch.from_numpy(rng.permutation(train.size))
        n_batches = -(-train.size // cfg.batch_size)
        if unlabelled is not None:  # unlabelled_batch unlabelled spectra per batch, cycling through them
            n_u, want = unlabelled[0].shape[0], n_batches * cfg.unlabelled_batch
            u_order = torch.from_numpy(np.concatenate([rng.permutation(n_u) for _ in range(-(-want // n_u))]))
        for b in range(n_batches):
            j = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            if unlabelled is None:
                yield x[j], iv[j], labels[train][j], x[j], seen[j]
            else:
                k = u_order[b * cfg.unlabelled_batch:(b + 1) * cfg.unlabelled_batch]
                yield x[j], iv[j], labels[train][j], x[j], seen[j], unlabelled[0][k], unlabelled[1][k]

    def validate(m: PhysFormer) -> dict[str, float]:
        out: dict[str, float] = {}
        for lo in range(0, val.size, 64):
            _, metrics = m.loss(x_val[lo:lo + 64], iv_val[lo:lo + 64], y_val[lo:lo + 64])
            for k, v in metrics.items():
                out[k] = out.get(k, 0.0) + v * min(64, val.size - lo) / val.size
        return out

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = warmup_cosine(optimizer, cfg.epochs, -(-train.size // cfg.batch_size), cfg.warmup_epochs)
    trainer.fit(Phase("train", cfg.epochs, optimizer, batches, lambda m, batch: m.loss(*batch),
                      validate=validate, monitor="param", grad_clip=1.0, scheduler=scheduler))
    update_checkpoint(trainer.checkpoint_path, model, calibration=calibrate(model, bench, cfg.mc_samples, cfg.seed))
    return model, trainer


def build_ensemble(run_dirs: list[str | Path], out_dir: str | Path, bench: BenchmarkSet,
                   run_info: Mapping[str, Any] | None = None):
    """Combine trained PhysFormer runs into a :class:`PhysFormerEnsemble` (their encoders as
    branches), calibrate its MC spread on the validation split as a single model's
    (:func:`calibrate`), and write it as a run in ``out_dir`` (``checkpoint.pt`` with
    ``member_configs``, ``config.json``); returns it."""
    import json

    from specserve.training.physformer.model import PhysFormerEnsemble
    from specserve.training.trainer import CHECKPOINT_NAME, load_checkpoint

    checkpoints = []
    for run in map(Path, run_dirs):
        path = run / CHECKPOINT_NAME
        if not path.is_file():
            raise SpecserveError(f"no {CHECKPOINT_NAME} in {run}")
        checkpoint = load_checkpoint(path)
        if checkpoint.get("model_kind") != "physformer" or checkpoint.get("member_configs"):
            raise SpecserveError(f"{path} is not a single PhysFormer run")
        checkpoints.append(checkpoint)
    hashes = {c.get("config", {}).get("data", {}).get("content_hash") for c in checkpoints}
    if len(hashes) != 1 or hashes != {bench.meta.get("content_hash")}:
        raise SpecserveError("the ensemble's members were not all trained on this 'stars' set")
    try:
        ensemble = PhysFormerEnsemble([PhysFormer.from_checkpoint(c) for c in checkpoints]).eval()
    except ValueError as exc:
        raise SpecserveError(str(exc)) from None
    calibration = calibrate(ensemble, bench, ensemble.config.mc_samples, ensemble.config.seed)
    members = [{"run": str(Path(r).resolve()), "seed": c["model_config"].get("seed")} for r, c in zip(run_dirs, checkpoints)]
    config = {**checkpoints[0].get("config", {}), "ensemble": members, **dict(run_info or {})}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {key: value for key, value in checkpoints[0].items() if key not in ("optimizer", "scheduler")}
    state.update(state_dict={k: v.detach().clone() for k, v in ensemble.state_dict().items()},
                 member_configs=[c["model_config"] for c in checkpoints], calibration=calibration, config=config)
    torch.save(state, out_dir / CHECKPOINT_NAME)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return ensemble


def unlabelled_inputs(config: PhysFormerConfig, bench: BenchmarkSet) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Model input flux and ivar of the unlabelled spectra ``config.unlabelled_sources`` asks for
    (:func:`~specserve.training.physformer.unlabelled.unlabelled_spectra`), or None."""
    names = [s.strip() for s in config.unlabelled_sources.split(",") if s.strip()]
    if not names:
        return None
    from specserve.training.physformer.unlabelled import SOURCES, unlabelled_spectra

    try:
        found = unlabelled_spectra(bench, None if names == ["all"] else names)
    except ValueError as exc:  # an unknown source, named
        raise SpecserveError(f"unlabelled_sources: {exc}") from None
    if not found.source.size:
        raise SpecserveError(f"no unlabelled spectra from {', '.join(names)}")
    counts = {s: int((found.source == s).sum()) for s in SOURCES if (found.source == s).any()}
    log.info("semi-supervised: %d unlabelled spectra (%s)", found.source.size, counts)
    return torch.from_numpy(found.prepared.model_flux()), torch.from_numpy(found.prepared.model_ivar())


def physformer_predict(model: PhysFormer, flux: np.ndarray, n_samples: int, seed: int = 0,
                       batch_size: int = 64, ivar: np.ndarray | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MC mean and std (calibrated: times ``model.std_scale``) of the parameters, the mean latent and
    the reconstruction from the mean. ``ivar`` (default: 1 everywhere, i.e. S/N set by the flux
    scale) is what a noise-aware encoder is told."""
    model.eval()
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    means, stds, latents, recon = [], [], [], []
    try:
        with torch.no_grad():
            for lo in range(0, flux.shape[0], batch_size):
                x = torch.from_numpy(np.ascontiguousarray(flux[lo:lo + batch_size]))
                iv = torch.ones_like(x) if ivar is None else torch.from_numpy(np.ascontiguousarray(ivar[lo:lo + batch_size]))
                draws = [model.encode(x, torch.zeros(()), iv) for _ in range(n_samples)]
                p = torch.stack([d[0] for d in draws])              # (T, b, 3)
                z = torch.stack([d[1] for d in draws]).mean(0)
                logt = torch.log10(p[..., :1])
                mean = torch.cat([10 ** logt.mean(0), p[..., 1:].mean(0)], dim=1)
                std = (torch.cat([mean[:, :1] * np.log(10) * logt.std(0), p[..., 1:].std(0)], dim=1)
                       * model.std_scale * model.std_factor(iv))
                means.append(mean.numpy())
                stds.append(std.numpy())
                latents.append(z.numpy())
                recon.append(model.generate(mean, z).numpy())
    finally:
        torch.random.set_rng_state(state)
    return np.concatenate(means), np.concatenate(stds), np.concatenate(latents), np.concatenate(recon)


CALIBRATION_SNR = (5.0, 10.0, 20.0, 50.0, 100.0, 200.0)
"""Raw-noise S/N levels of the validation spectra the S/N-dependent calibration is fitted on (with
the native ones)."""


def calibrate(model: PhysFormer, bench: BenchmarkSet, n_samples: int, seed: int = 0) -> dict[str, Any]:
    """Calibrate the MC spread on the validation split, by the model's ``calibration``:
    :func:`calibrate_constant` or :func:`calibrate_snr`; returns the numbers."""
    if model.config.calibration == "snr":
        return calibrate_snr(model, bench, n_samples, seed)
    return calibrate_constant(model, bench, n_samples, seed)


def calibrate_constant(model: PhysFormer, bench: BenchmarkSet, n_samples: int, seed: int = 0) -> dict[str, Any]:
    """Set ``model.std_scale`` so that on the validation split 68.27 % of the catalogue values lie
    within one calibrated std of the MC mean (per parameter); returns the numbers."""
    from specserve.training.common import ONE_SIGMA

    val = bench.split_indices("validation")
    truth = bench.arrays["labels"][val]
    model.std_scale.fill_(1.0)
    model.std_table.fill_(1.0)
    flux, ivar = inputs(bench, val)
    mean, std, _, _ = physformer_predict(model, flux, n_samples, seed=seed, ivar=ivar)
    ratio = np.abs(truth - mean) / np.maximum(std, 1e-12)
    scale = np.quantile(ratio, ONE_SIGMA, axis=0)
    model.std_scale.copy_(torch.from_numpy(scale.astype(np.float32)))
    return {"std_scale": [float(v) for v in scale], "n_samples": n_samples, "split": "validation",
            "raw_coverage_1sigma": [float(v) for v in np.mean(ratio <= 1.0, axis=0)]}


def calibrate_snr(model: PhysFormer, bench: BenchmarkSet, n_samples: int, seed: int = 0) -> dict[str, Any]:
    """Calibrate the MC spread on the validation split, as a function of S/N (issue 20): the
    validation spectra at native S/N and with raw noise at :data:`CALIBRATION_SNR`, through the
    serving pipeline; at each knot of ``model.std_knots`` the factor per parameter is the weighted
    68.27 % quantile of ``|truth - mean| / raw std``, each spectrum weighted by its hat weight at
    its own S/N (:meth:`PhysFormer.std_factor`), so that 68.27 % of the catalogue values lie within
    one std in every S/N bin. ``std_scale`` is 1. Returns the numbers."""
    from specserve.training.common import ONE_SIGMA
    from specserve.training.inputs import evaluation_variants, torch_inputs

    val = bench.split_indices("validation")
    truth = bench.arrays["labels"][val]
    model.std_scale.fill_(1.0)
    model.std_table.fill_(1.0)
    ratios, weights, log_snr = [], [], []
    for key, raws in evaluation_variants(bench, val, CALIBRATION_SNR, seed + 101, perturbations=False).items():
        if key.startswith("snr_photon"):
            continue
        prepared, ok = torch_inputs(bench, raws)
        flux, ivar = prepared.model_flux()[ok], prepared.model_ivar()[ok]
        mean, std, _, _ = physformer_predict(model, flux, n_samples, seed=seed, ivar=ivar)
        ratios.append(np.abs(truth[ok] - mean) / np.maximum(std, 1e-12))
        with torch.no_grad():
            iv = torch.from_numpy(ivar)
            log_snr.append(model.log_snr(iv).numpy())
            weights.append(_hat_weights(model, iv))
    ratio, weight, x = np.concatenate(ratios), np.concatenate(weights), np.concatenate(log_snr)
    table = np.ones((weight.shape[1], 3))
    support = weight.sum(0)
    for k in range(weight.shape[1]):
        if support[k] < 5.0:  # too few spectra near this knot: filled from its neighbours below
            table[k] = np.nan
            continue
        for j in range(3):
            table[k, j] = _weighted_quantile(ratio[:, j], weight[:, k], ONE_SIGMA)
    for k in range(len(table)):  # a knot without support takes the nearest supported one's factors
        if np.isnan(table[k, 0]):
            supported = [i for i in range(len(table)) if not np.isnan(table[i, 0])]
            table[k] = table[min(supported, key=lambda i: abs(i - k))]
    model.std_table.copy_(torch.from_numpy(table.astype(np.float32)))
    raw_coverage = np.mean(ratio <= 1.0, axis=0)
    return {"std_scale": [1.0, 1.0, 1.0], "std_table": table.tolist(),
            "std_knots_snr": [float(10 ** v) for v in model.std_knots], "n_samples": n_samples,
            "split": "validation", "snr_levels": ["native", *map(float, CALIBRATION_SNR)],
            "knot_support": [float(v) for v in support],
            "log10_snr_range": [float(x.min()), float(x.max())],
            "raw_coverage_1sigma": [float(v) for v in raw_coverage]}


def _hat_weights(model: PhysFormer, ivar: torch.Tensor) -> np.ndarray:
    """Each spectrum's interpolation weight at each knot (B, K), as :meth:`PhysFormer.std_factor` uses them."""
    table = model.std_table.clone()
    try:
        out = []
        for k in range(table.shape[0]):
            model.std_table.zero_()
            model.std_table[k] = 1.0
            out.append(model.std_factor(ivar)[:, 0].numpy())
        return np.stack(out, axis=1)
    finally:
        model.std_table.copy_(table)


def _weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    order = np.argsort(values)
    v, w = values[order], weights[order]
    cumulative = np.cumsum(w)
    return float(np.interp(q * cumulative[-1], cumulative, v))
