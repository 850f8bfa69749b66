"""The RBM training recipe: contrastive divergence on each class's RBM, then cross-entropy
fine-tuning, on raw-level augmented spectra."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from specserve.runtime.errors import SpecserveError

if TYPE_CHECKING:
    from specserve.training.benchsets import BenchmarkSet
    from specserve.training.rbm.model import RBMClassifier, RBMConfig
    from specserve.training.trainer import Trainer


def train_rbm(config: RBMConfig, run_dir: str | Path, bench: BenchmarkSet, *,
              train_indices: np.ndarray | None = None, progress: bool | None = None,
              run_info: Mapping[str, Any] | None = None) -> tuple[RBMClassifier, Trainer]:
    """Train an RBM classifier on ``bench`` (the ``cv`` set) into ``run_dir``.

    Contrastive divergence on each class's RBM (``cd_epochs``), then cross-entropy fine-tuning
    of every parameter (``finetune_epochs``), keeping the epoch with the lowest validation loss.
    Training spectra are augmented at the raw level through the serving pipeline (``augment_*``,
    :func:`specserve.training.inputs.training_pool`); the validation set is the validation split
    as observed plus one augmented copy drawn with a fixed seed.
    ``train_indices`` restricts training to some spectra of the train split.
    """
    import torch

    from specserve.training.inputs import model_inputs, training_pool
    from specserve.training.rbm.model import RBMClassifier
    from specserve.training.trainer import Phase, Trainer, run_config, seed_everything

    cfg = config
    a = bench.arrays
    if bench.arrays["flux"].shape[1] != cfg.n_pixels:
        raise SpecserveError(f"set {bench.name!r} has {a['flux'].shape[1]} pixels, the config {cfg.n_pixels}")
    train = bench.split_indices("train") if train_indices is None else np.asarray(train_indices)
    val = bench.split_indices("validation")
    y_train = torch.from_numpy(a["label"][train].astype(np.int64))  # (N,)
    val_rng = np.random.default_rng([cfg.seed, 1])
    x_val = model_inputs(bench, val)  # (Nv, P)
    y_val = a["label"][val].astype(np.int64)
    if cfg.augment_snr_max:
        x_val = np.concatenate([x_val, training_pool(cfg, bench, val, val_rng, 1.0).epoch(0).model_flux()])
        y_val = np.concatenate([y_val, y_val])
    pool = training_pool(cfg, bench, train, np.random.default_rng([cfg.seed, 3]))
    x_val_t, y_val_t = torch.from_numpy(x_val), torch.from_numpy(y_val)

    config_json = run_config("rbm", cfg.to_dict(), bench, train, val.size, train_indices is not None, run_info)
    seed_everything(cfg.seed)  # the initial weights depend on the seed only, not on what ran before
    model = RBMClassifier(cfg)
    trainer = Trainer(model, run_dir, config_json, model_kind="rbm", model_config=cfg.to_dict(), seed=cfg.seed,
                      log_every=5, progress=progress)
    data_rng = np.random.default_rng([cfg.seed, 2])

    def batches(epoch: int):
        x = torch.from_numpy(pool.epoch(epoch).model_flux())  # (N, P)
        order = torch.from_numpy(data_rng.permutation(train.size))
        for lo in range(0, train.size, cfg.batch_size):
            j = order[lo:lo + cfg.batch_size]
            yield x[j], y_train[j]

    def validate(m: RBMClassifier) -> dict[str, float]:
        _, metrics = m.classification_loss(x_val_t, y_val_t)
        return metrics

    with torch.no_grad():
        model.init_visible_bias(model.binarise(torch.from_numpy(model_inputs(bench, train))), y_train)
    cd_params = [model.W, model.a, model.b]
    trainer.fit(Phase(
        "cd", cfg.cd_epochs,
        torch.optim.SGD(cd_params, lr=cfg.cd_lr, momentum=cfg.cd_momentum, weight_decay=cfg.weight_decay),
        batches, lambda m, batch: m.cd_loss(m.binarise(batch[0]), batch[1]), validate=validate))
    trainer.fit(Phase(
        "finetune", cfg.finetune_epochs,
        torch.optim.AdamW(model.parameters(), lr=cfg.finetune_lr, weight_decay=cfg.weight_decay),
        batches, lambda m, batch: m.classification_loss(*batch), validate=validate, monitor="loss"))
    return model, trainer
