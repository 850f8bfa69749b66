"""RBM classifier of cataclysmic variables (Chen, Wu, Bu & Zhao 2014, PASA, arXiv:1305.0665).

Model only (no I/O): :class:`RBMConfig`, :class:`Binarise` and :class:`RBMClassifier`, with the
model-specific losses (contrastive divergence, discriminative cross-entropy) next to it.

Input: continuum-normalised flux ``(B, P)`` float32 on the model grid, unusable pixels set to 1.0
(the continuum, see :func:`fill_masked`). Inside ``forward`` the flux is binarised into
``V = 2P`` visible units (an "above" bit and a "below" bit per pixel) and scored by one binary RBM
per class (``C`` classes, ``H`` hidden units each):

    F_c(v) = -a_c . v - sum_j softplus(b_cj + W_cj . v) + offset_c          (B, C)
    p(c | v) = softmax_c(-F_c(v))                                           (B, C)

``offset_c`` stands in for the log partition function of RBM c, which is intractable; it is
learned during discriminative fine-tuning. Shapes: W (C, H, V), a (C, V), b (C, H), offset (C,).

Training has two stages: contrastive divergence CD-k on each class's RBM with its own class's
spectra (:meth:`RBMClassifier.cd_loss`; Gibbs sampling with ``torch.bernoulli``), then
fine-tuning of every parameter with cross-entropy on the logits ``-F``
(:meth:`RBMClassifier.classification_loss`). ``forward`` is deterministic and exports to ONNX
with standard operators (Greater, Less, Cast, Concat, MatMul, Softplus, Softmax, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from specserve.runtime.contract import MASKED_PIXEL_FILL, fill_masked

__all__ = ["RBMConfig", "Binarise", "RBMClassifier", "fill_masked", "MASKED_PIXEL_FILL"]


@dataclass(frozen=True)
class RBMConfig:
    """Model and training hyper-parameters.

    The defaults train on the ``cv`` set in about 20 s on 2 CPU cores. Threshold 0.1 made fewer
    validation errors than 0.05 over three seeds; more hidden units or epochs did not help
    consistently. Every training spectrum is noised, at S/N 5-100 (the CVs' own S/N are 10-100),
    so that the noise level does not tell the classes apart (with 25 % clean spectra and S/N up
    to 200, noisy emission-line stars were taken for CVs more often).
    """

    n_pixels: int = 3011
    """Pixels of the model grid (the ``cv`` set's grid: 3700-7400 A, log10 step 1e-4)."""
    n_classes: int = 2
    n_hidden: int = 64
    """Hidden units of each class's RBM."""
    threshold: float = 0.1
    """Binarisation: a pixel's "above" bit is flux > 1 + threshold, its "below" bit flux < 1 - threshold."""
    cd_k: int = 1
    """Gibbs steps of contrastive divergence."""
    cd_epochs: int = 20
    cd_lr: float = 0.01
    cd_momentum: float = 0.5
    finetune_epochs: int = 40
    finetune_lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 1e-4
    init_std: float = 0.01
    """Standard deviation of the initial weights."""
    augment_snr_min: float = 5.0
    augment_snr_max: float = 100.0
    """Training spectra get fresh Gaussian noise every epoch at an S/N drawn log-uniformly from
    [augment_snr_min, augment_snr_max] (never less noise than they have); 0 disables it."""
    augment_fraction: float = 1.0
    """Fraction of the training spectra noised in each epoch (the rest stay as observed)."""
    augment_rv: float = 3.0
    """Raw-level augmentation, described in :func:`specserve.training.inputs.augmentation`."""
    augment_tilt: float = 0.1
    augment_mask: float = 0.03
    augment_pool: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_pixels", "n_classes", "n_hidden", "cd_k", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"RBMConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_classes < 2:
            raise ValueError(f"RBMConfig.n_classes must be >= 2, got {self.n_classes}")
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"RBMConfig.threshold must be in [0, 1), got {self.threshold}")
        if self.cd_epochs < 0 or self.finetune_epochs < 0:
            raise ValueError("RBMConfig epochs must be >= 0")
        if not 0.0 <= self.augment_fraction <= 1.0:
            raise ValueError(f"RBMConfig.augment_fraction must be in [0, 1], got {self.augment_fraction}")
        if self.augment_snr_max and not 0 < self.augment_snr_min <= self.augment_snr_max:
            raise ValueError("RBMConfig needs 0 < augment_snr_min <= augment_snr_max (or augment_snr_max = 0)")

    @property
    def n_visible(self) -> int:
        return 2 * self.n_pixels

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Binarise(nn.Module):
    """Normalised flux (B, P) -> binary visible units (B, 2P), emission and absorption kept apart.

    Rule, per pixel: ``above = flux > 1 + threshold`` (emission: the CV signature in H-alpha,
    H-beta, He II 4686), ``below = flux < 1 - threshold`` (absorption); ``v = concat([above,
    below], -1)`` as float. A pixel at the continuum (and so every unusable pixel, set to 1.0)
    has both bits 0. Exports to ONNX as Greater, Less, Cast and Concat.
    """

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = float(threshold)

    def forward(self, flux: torch.Tensor) -> torch.Tensor:
        above = (flux > 1.0 + self.threshold).to(flux.dtype)  # (B, P)
        below = (flux < 1.0 - self.threshold).to(flux.dtype)  # (B, P)
        return torch.cat([above, below], dim=-1)  # (B, 2P)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"


class RBMClassifier(nn.Module):
    """One binary RBM per class; ``forward(flux) -> (probabilities, free_energy)``, both (B, C)."""

    def __init__(self, config: RBMConfig):
        super().__init__()
        self.config = config
        C, H, V = config.n_classes, config.n_hidden, config.n_visible
        g = torch.Generator().manual_seed(config.seed)
        self.binarise = Binarise(config.threshold)
        self.W = nn.Parameter(torch.randn(C, H, V, generator=g) * config.init_std)  # (C, H, V)
        self.a = nn.Parameter(torch.zeros(C, V))  # (C, V) visible biases
        self.b = nn.Parameter(torch.zeros(C, H))  # (C, H) hidden biases
        self.offset = nn.Parameter(torch.zeros(C))  # (C,) stands in for log Z_c

    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping[str, Any]) -> RBMClassifier:
        """Rebuild from a checkpoint dictionary (``model_config`` and ``state_dict``)."""
        model = cls(RBMConfig(**checkpoint["model_config"]))
        model.load_state_dict(checkpoint["state_dict"])
        return model

    # ------------------------------------------------------------------ inference

    def free_energy(self, v: torch.Tensor) -> torch.Tensor:
        """F_c(v) for every class: v (B, V) -> (B, C), offsets included."""
        C, H, V = self.W.shape
        visible = v @ self.a.T  # (B, C)
        act = (v @ self.W.reshape(C * H, V).T).reshape(-1, C, H) + self.b  # (B, C, H)
        return -visible - F.softplus(act).sum(-1) + self.offset  # (B, C)

    def forward(self, flux: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.binarise(flux)  # (B, V)
        free = self.free_energy(v)  # (B, C)
        return torch.softmax(-free, dim=-1), free  # (B, C), (B, C)

    # ------------------------------------------------------------------ one class's RBM

    def class_free_energy(self, v: torch.Tensor, c: int) -> torch.Tensor:
        """F_c(v) without the offset for RBM ``c`` only: v (B, V) -> (B,)."""
        act = v @ self.W[c].T + self.b[c]  # (B, H)
        return -(v @ self.a[c]) - F.softplus(act).sum(-1)  # (B,)

    def hidden_probability(self, v: torch.Tensor, c: int) -> torch.Tensor:
        return torch.sigmoid(v @ self.W[c].T + self.b[c])  # (B, V) -> (B, H)

    def visible_probability(self, h: torch.Tensor, c: int) -> torch.Tensor:
        return torch.sigmoid(h @ self.W[c] + self.a[c])  # (B, H) -> (B, V)

    @torch.no_grad()
    def gibbs(self, v: torch.Tensor, c: int, k: int) -> torch.Tensor:
        """k steps of block Gibbs sampling v -> h -> v in RBM ``c``: (B, V) -> (B, V) binary."""
        for _ in range(k):
            h = torch.bernoulli(self.hidden_probability(v, c))  # (B, H)
            v = torch.bernoulli(self.visible_probability(h, c))  # (B, V)
        return v

    # ------------------------------------------------------------------ losses

    def cd_loss(self, v: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Contrastive divergence CD-k: each example trains its own class's RBM.

        The loss mean_n [F_y(v_n) - F_y(v_n^(k))], with the negative samples v^(k) from k Gibbs
        steps started at the data and held constant, has as its gradient the CD-k estimate of
        the negative log-likelihood gradient. v (B, V), y (B,) class indices.
        """
        total = v.new_zeros(())
        recon = 0.0
        for c in range(self.config.n_classes):
            sel = y == c
            if not bool(sel.any()):
                continue
            v0 = v[sel]  # (Bc, V)
            vk = self.gibbs(v0, c, self.config.cd_k)  # (Bc, V)
            total = total + (self.class_free_energy(v0, c) - self.class_free_energy(vk, c)).sum()
            with torch.no_grad():
                recon += float(torch.abs(v0 - vk).sum())
        n = max(int(v.shape[0]), 1)
        return total / n, {"cd_gap": float(total.detach()) / n, "recon_error": recon / (n * v.shape[1])}

    def classification_loss(self, flux: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Discriminative fine-tuning: cross-entropy of the logits -F. flux (B, P), y (B,)."""
        free = self.free_energy(self.binarise(flux))  # (B, C)
        loss = F.cross_entropy(-free, y.long())
        accuracy = float((free.argmin(-1) == y).float().mean())
        return loss, {"loss": float(loss.detach()), "accuracy": accuracy}

    @torch.no_grad()
    def init_visible_bias(self, v: torch.Tensor, y: torch.Tensor, eps: float = 1e-3) -> None:
        """a_c = logit of the mean of class c's training data (Hinton 2010, section 8.1)."""
        for c in range(self.config.n_classes):
            sel = y == c
            if bool(sel.any()):
                p = v[sel].mean(0).clamp(eps, 1 - eps)  # (V,)
                self.a[c] = torch.log(p / (1 - p))
