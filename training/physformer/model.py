"""PhysFormer (Wang, Zhang, Bu & Mou 2026, arXiv:2603.01459): a generative model of normalised
stellar spectra whose decoder ends in the radiative flux layer of :mod:`.flux_layer`, and an
encoder that inverts spectra to (Teff, logg, [Fe/H]) inside their physical box.

Model only (no I/O). Shapes: B spectra, P pixels, D depth layers, R opacity components.

Encoder: ``flux - 1`` in patches of ``patch_size`` pixels -> tokens (linear map + learned
positions) -> ``depth`` pre-norm dot-product attention blocks -> mean over tokens -> LayerNorm ->
MC dropout -> MLP -> raw (3 + n_latent). The parameters are squashed into the box by a sigmoid:
``log10 Teff`` in [log10 teff_min, log10 teff_max], ``logg`` and ``[Fe/H]`` in theirs, so no input
(noise, a flat line, a quasar) can give a parameter outside it. The latent (``tanh``, in [-1, 1])
carries what the parameters do not explain.

Decoder: standardised parameters and latent -> MLP -> per atmosphere

- a temperature structure: ``T_d = Teff * (3/4 (tau_ref_d + 2/3))^(1/4) * exp(c_d)``, the grey
  Eddington atmosphere on a fixed reference depth grid ``tau_ref`` (log-spaced) times a learned
  correction ``c_d = cumsum(softplus(raw))`` scaled by ``temperature_scale``; both factors grow
  with depth, so T is monotone;
- continuum optical thicknesses ``dtau_cont_d = dtau_ref_d * exp(s_d)`` (grey);
- line optical thicknesses ``dtau_line[d, p] = dtau_ref_d sum_r A[d, r] Phi[r, p]`` with
  ``A = exp(...)`` from the decoder (B, D, R) and ``Phi = exp(phi)`` a learned positive "line list"
  (R, P) shared by all stars, so kappa >= 0 everywhere; exponentials because line opacities span
  orders of magnitude (with softplus the reconstruction learned several times slower);

then ``flux_layer.normalised_spectrum`` (Gauss-Legendre flux, line over continuum, Gaussian
broadening to the grid's resolving power). ``decoder="plain"`` is the ablation: an MLP straight to
the P pixels (``1 + tanh``, positive), no physics.

``forward(flux, seed) -> (parameters (B, 3), latent (B, L), model spectrum (B, P))`` with one MC
dropout sample; :meth:`PhysFormer.generate` maps parameters (and latent) to a spectrum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from specserve.training.layers import Block, MCDropout, TileSamples, encode_patches
from specserve.training.physformer import flux_layer as fl

__all__ = ["PhysFormerConfig", "PhysFormer", "PhysFormerEnsemble", "PhysFormerInference", "PhysFormerGenerator", "PARAMETER_NAMES",
           "PARAMETER_UNITS", "reduced_chi2"]

PARAMETER_NAMES = ("teff", "logg", "feh")
NOISE_UNIT = 0.2
"""The noise feature's unit: a normalised sigma of 0.2 (S/N 5) is 1."""
NOISE_MASKED = 2.0
"""The noise feature of a masked pixel (ivar 0), and its ceiling."""
STD_KNOTS_SNR = (5.0, 10.0, 20.0, 50.0, 100.0, 200.0)
"""S/N knots of the uncertainty calibration: the MC spread is multiplied by a factor per parameter
interpolated (linearly in log10 S/N, constant beyond the end knots) from a table at these S/N."""
PARAMETER_UNITS = ("K", "dex", "dex")
LEGACY_DEFAULTS = {"noise_input": "none", "blind_ivar_fraction": 0.0, "calibration": "constant"}
"""What a checkpoint written before these fields existed was trained with (the defaults then)."""


@dataclass(frozen=True)
class PhysFormerConfig:
    n_pixels: int = 3011
    log10_start: float = 3.568201724066995
    """log10 of the first wavelength (vacuum A) of the grid; the ``stars`` set's by default."""
    log10_step: float = 1e-4
    resolution: float = 1800.0
    patch_size: int = 32
    d_model: int = 64
    n_heads: int = 4
    depth: int = 2
    ffn: int = 128
    encoder_hidden: int = 128
    pool: str = "mean"
    """How the encoder's tokens become one feature vector: "mean" or "flatten" (a linear map of all
    tokens, as in the SPT)."""
    n_latent: int = 4
    noise_input: str = "sigma"
    """"none": the encoder sees the flux only; "sigma": each token also embeds its pixels' noise,
    ``min(sigma / NOISE_UNIT, NOISE_MASKED)`` from the input ivar (``NOISE_MASKED`` where a pixel
    is masked), so the encoder knows how far to trust each part of the spectrum (issue 20)."""
    blind_ivar_fraction: float = 0.3
    """With ``noise_input="sigma"``: the fraction of training spectra whose encoder is told the
    constant ivar the runtime estimates for a spectrum sent without one
    (:func:`~specserve.runtime.preprocess.estimated_ivar`) instead of their own, so the encoder
    learns that case too; the reconstruction is still scored with their own ivar."""
    unlabelled_sources: str = ""
    """Semi-supervised training (issue 20): comma-separated sources of
    :data:`~specserve.training.physformer.unlabelled.SOURCES` ("all": every one) whose unlabelled
    real spectra join every training batch through the reconstruction chi-square only, from the
    encoder's own estimate (``unlabelled_weight`` times its term); "" (default): none."""
    unlabelled_weight: float = 1.0
    unlabelled_batch: int = 16
    """Unlabelled spectra per training batch (cycling through them); each costs an encoder and a
    generator pass, where a labelled one costs an encoder and two generator passes."""
    calibration: str = "snr"
    """How the MC spread is calibrated on the validation split after training: "constant" (one
    factor per parameter) or "snr" (a factor per parameter and S/N knot, fitted on the validation
    spectra with raw noise added; :func:`~specserve.training.physformer.train.calibrate`)."""
    dropout: float = 0.1
    decoder: str = "physics"
    """"physics" (flux layer) or "plain" (the ablation)."""
    decoder_hidden: int = 256
    n_layers: int = 16
    """Depth layers of the atmosphere."""
    n_components: int = 32
    """Opacity components R of the line list."""
    n_nodes: int = 6
    """Gauss-Legendre nodes of the flux integral."""
    tau_min: float = 1e-4
    tau_max: float = 30.0
    temperature_scale: float = 0.05
    teff_min: float = 2500.0
    teff_max: float = 50000.0
    logg_min: float = -1.0
    logg_max: float = 6.0
    feh_min: float = -4.5
    feh_max: float = 1.0
    # training
    epochs: int = 80
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 3
    train_window: int = 0
    """When > 0, each training batch scores the reconstructions on one random window of this many
    contiguous pixels (its broadening margins excluded) instead of the whole grid: the flux layer is
    almost all of a training step's cost, so a 512-pixel window makes a step several times cheaper
    while every pixel is still fitted over the epochs. Evaluation and the exported graphs always
    use the whole grid."""
    parameter_weight: float = 3.0
    """Weight of the parameter loss (on standardised parameters) against the reduced chi-square
    (3 had the lowest validation parameter loss of 1, 3 and 10; docs/physformer.md)."""
    parameter_loss: str = "mse"
    """"mse" or "huber" (smooth L1 with ``huber_beta``: MAE-like, so the many well-fitted FGK stars
    are not outweighed by the few hot stars with large errors)."""
    huber_beta: float = 0.05
    chi2_weight: float = 1.0
    """Weight of the reconstruction term ``mean log(1 + reduced chi-square)``: the logarithm keeps the few
    spectra no model fits (chi-square ~1e3 with MILES' ivar; median ~40) from dominating the batch."""
    augment_snr_min: float = 5.0
    augment_snr_max: float = 200.0
    augment_fraction: float = 0.5
    augment_rv: float = 3.0
    """Raw-level augmentation, described in :func:`specserve.training.inputs.augmentation`."""
    augment_tilt: float = 0.1
    augment_mask: float = 0.03
    augment_pool: int = 8
    mc_samples: int = 32
    mc_samples_max: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.decoder not in ("physics", "plain"):
            raise ValueError(f"PhysFormerConfig.decoder must be 'physics' or 'plain', got {self.decoder!r}")
        if self.unlabelled_weight < 0:
            raise ValueError(f"PhysFormerConfig.unlabelled_weight must be >= 0, got {self.unlabelled_weight}")
        if not 0.0 <= self.blind_ivar_fraction <= 1.0:
            raise ValueError(f"PhysFormerConfig.blind_ivar_fraction must be in [0, 1], got {self.blind_ivar_fraction}")
        if self.calibration not in ("constant", "snr"):
            raise ValueError(f"PhysFormerConfig.calibration must be 'constant' or 'snr', got {self.calibration!r}")
        if self.noise_input not in ("none", "sigma"):
            raise ValueError(f"PhysFormerConfig.noise_input must be 'none' or 'sigma', got {self.noise_input!r}")
        if self.pool not in ("mean", "flatten"):
            raise ValueError(f"PhysFormerConfig.pool must be 'mean' or 'flatten', got {self.pool!r}")
        if self.parameter_loss not in ("mse", "huber"):
            raise ValueError(f"PhysFormerConfig.parameter_loss must be 'mse' or 'huber', got {self.parameter_loss!r}")
        if self.d_model % self.n_heads:
            raise ValueError("PhysFormerConfig.d_model must be a multiple of n_heads")
        for name in ("n_pixels", "patch_size", "n_layers", "n_components", "n_nodes", "batch_size", "unlabelled_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"PhysFormerConfig.{name} must be >= 1")
        for lo, hi in (("teff_min", "teff_max"), ("logg_min", "logg_max"), ("feh_min", "feh_max"),
                       ("tau_min", "tau_max")):
            if not getattr(self, lo) < getattr(self, hi):
                raise ValueError(f"PhysFormerConfig.{lo} must be < {hi}")

    @property
    def n_tokens(self) -> int:
        return math.ceil(self.n_pixels / self.patch_size)

    @property
    def bounds(self) -> dict[str, list[float]]:
        return {"teff": [self.teff_min, self.teff_max], "logg": [self.logg_min, self.logg_max],
                "feh": [self.feh_min, self.feh_max]}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def reduced_chi2(model: torch.Tensor, flux: torch.Tensor, ivar: torch.Tensor) -> torch.Tensor:
    """Per spectrum ``sum ivar (flux - model)^2 / (number of pixels with ivar > 0)``: (B,)."""
    good = (ivar > 0).to(flux.dtype)
    return (ivar * (flux - model) ** 2).sum(-1) / good.sum(-1).clamp_min(1.0)


class PhysFormer(nn.Module):
    def __init__(self, config: PhysFormerConfig):
        super().__init__()
        c = self.config = config
        # encoder
        self.embed = nn.Linear(c.patch_size, c.d_model)
        if c.noise_input == "sigma":
            self.embed_noise = nn.Linear(c.patch_size, c.d_model)
        self.position = nn.Parameter(torch.zeros(1, c.n_tokens, c.d_model))
        nn.init.normal_(self.position, std=0.02)
        self.blocks = nn.ModuleList(Block(c.d_model, c.n_heads, c.ffn, "dot") for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.d_model)
        if c.pool == "flatten":
            self.pool = nn.Linear(c.n_tokens * c.d_model, c.d_model)
        self.drop1 = MCDropout(c.dropout)
        self.enc_hidden = nn.Linear(c.d_model, c.encoder_hidden)
        self.drop2 = MCDropout(c.dropout)
        self.enc_out = nn.Linear(c.encoder_hidden, 3 + c.n_latent)
        # decoder
        n_in = 3 + c.n_latent
        self.dec = nn.Sequential(nn.Linear(n_in, c.decoder_hidden), nn.GELU(),
                                 nn.Linear(c.decoder_hidden, c.decoder_hidden), nn.GELU())
        if c.decoder == "physics":
            self.dec_temperature = nn.Linear(c.decoder_hidden, c.n_layers)
            self.dec_continuum = nn.Linear(c.decoder_hidden, c.n_layers)
            self.dec_lines = nn.Linear(c.decoder_hidden, c.n_layers * c.n_components)
            self.phi = nn.Parameter(torch.randn(c.n_components, c.n_pixels) - 4.0)
            wave_um = 10.0 ** (c.log10_start + c.log10_step * torch.arange(c.n_pixels, dtype=torch.float64)) / 1e4
            self.register_buffer("wavelength_um", wave_um.to(torch.float32))
            edges = torch.logspace(math.log10(c.tau_min), math.log10(c.tau_max), c.n_layers + 1, dtype=torch.float64)
            self.register_buffer("dtau_ref", (edges[1:] - edges[:-1]).to(torch.float32))
            mid = torch.sqrt(edges[1:] * edges[:-1])
            self.register_buffer("grey", ((0.75 * (mid + 2.0 / 3.0)) ** 0.25).to(torch.float32))
            mu, w = fl.gauss_legendre(c.n_nodes)
            self.register_buffer("mu", mu)
            self.register_buffer("weights", w)
            self.register_buffer("kernel", fl.gaussian_kernel(fl.broadening_fwhm_pixels(c.resolution, c.log10_step)))
        else:
            self.dec_plain = nn.Linear(c.decoder_hidden, c.n_pixels)
        # parameter standardisation (log10 Teff, logg, [Fe/H]), set from the training split
        self.register_buffer("param_mean", torch.tensor([3.75, 3.0, -0.4]))
        self.register_buffer("param_std", torch.tensor([0.15, 1.2, 0.6]))
        # per-parameter factor on the MC spread, fitted on the validation split after training
        # (physformer_train.calibrate): MC dropout alone under-covers
        self.register_buffer("std_scale", torch.ones(3))
        # and by a factor per S/N (the MC spread barely grows with the noise): (knots, 3), ones until calibrated
        self.register_buffer("std_knots", torch.log10(torch.tensor(STD_KNOTS_SNR)))
        self.register_buffer("std_table", torch.ones(len(STD_KNOTS_SNR), 3))
        lo = torch.tensor([math.log10(c.teff_min), c.logg_min, c.feh_min])
        hi = torch.tensor([math.log10(c.teff_max), c.logg_max, c.feh_max])
        self.register_buffer("box_low", lo)
        self.register_buffer("box_high", hi)
        self.register_buffer("box_min", torch.tensor([c.teff_min, c.logg_min, c.feh_min]))
        self.register_buffer("box_max", torch.tensor([c.teff_max, c.logg_max, c.feh_max]))

    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping[str, Any]) -> PhysFormer:
        """The model of a checkpoint; a :class:`PhysFormerEnsemble` (which offers the same inference
        methods) when the checkpoint has ``member_configs``."""
        if checkpoint.get("member_configs"):
            ensemble = PhysFormerEnsemble([cls(PhysFormerConfig(**{**LEGACY_DEFAULTS, **c}))
                                           for c in checkpoint["member_configs"]])
            ensemble.load_state_dict(checkpoint["state_dict"])
            return ensemble.eval()
        model = cls(PhysFormerConfig(**{**LEGACY_DEFAULTS, **checkpoint["model_config"]}))
        state = dict(checkpoint["state_dict"])
        state.setdefault("std_scale", torch.ones(3))  # runs from before the calibration existed
        state.setdefault("std_knots", model.std_knots.clone())  # ... and before it depended on S/N
        state.setdefault("std_table", torch.ones(len(STD_KNOTS_SNR), 3))
        model.load_state_dict(state)
        return model.eval()

    # ---------------------------------------------------------------- encoder
    def encode(self, flux: torch.Tensor, offset: torch.Tensor, ivar: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """flux (B, P) (and its ivar, used with ``noise_input="sigma"``) -> (parameters in physical
        units (B, 3): Teff [K], logg, [Fe/H]; latent (B, L))."""
        return self.encode_head(self.encode_features(flux, ivar), offset)

    def noise_tokens(self, ivar: torch.Tensor) -> torch.Tensor:
        """ivar (B, P) -> the noise embedding of each token (B, N, D)."""
        c = self.config
        sigma = torch.rsqrt(ivar.clamp_min(1e-12)) / NOISE_UNIT
        noise = torch.where(ivar > 0, sigma.clamp_max(NOISE_MASKED), torch.full_like(sigma, NOISE_MASKED))
        pad = c.n_tokens * c.patch_size - c.n_pixels
        if pad:
            noise = F.pad(noise, (0, pad), value=NOISE_MASKED)
        return self.embed_noise(noise.reshape(noise.shape[0], c.n_tokens, c.patch_size))

    def encode_features(self, flux: torch.Tensor, ivar: torch.Tensor | None = None) -> torch.Tensor:
        """The deterministic part of the encoder: flux (B, P) (and ivar) -> pooled features (B, D)."""
        if self.config.noise_input == "sigma":
            if ivar is None:
                raise ValueError("this PhysFormer's encoder needs the ivar (noise_input='sigma')")
            tokens = encode_patches(self, flux, extra=self.noise_tokens(ivar))
        else:
            tokens = encode_patches(self, flux)
        if self.config.pool == "flatten":
            return self.pool(self.norm(tokens).reshape(tokens.shape[0], -1))
        return self.norm(tokens.mean(dim=1))

    def encode_head(self, z: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stochastic part (MC dropout): features (M, D) -> parameters (M, 3), latent (M, L)."""
        boxed, latent = self.encode_head_log(z, offset)
        return self.from_log(boxed), latent

    def encode_head_log(self, z: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`encode_head` with the parameters as (log10 Teff, logg, [Fe/H]) inside the box."""
        raw = self.enc_out(self.drop2(F.gelu(self.enc_hidden(self.drop1(z, offset))), offset))
        unit = torch.sigmoid(raw[:, :3])
        return self.box_low + (self.box_high - self.box_low) * unit, torch.tanh(raw[:, 3:])

    def from_log(self, boxed: torch.Tensor) -> torch.Tensor:
        """(log10 Teff, logg, [Fe/H]) (M, 3) -> physical parameters, clipped to the box (float32
        rounding of 10 ** log10(edge) may step just outside it)."""
        params = torch.cat([10.0 ** boxed[:, :1], boxed[:, 1:]], dim=1)
        return torch.minimum(torch.maximum(params, self.box_min), self.box_max)

    @staticmethod
    def log_snr(ivar: torch.Tensor) -> torch.Tensor:
        """A spectrum's S/N from its ivar (normalised flux ~ 1): log10 of the mean sqrt(ivar) over
        its usable pixels, (B,)."""
        good = (ivar > 0).to(ivar.dtype)
        mean = (torch.sqrt(ivar.clamp_min(0.0)) * good).sum(-1) / good.sum(-1).clamp_min(1.0)
        return torch.log10(mean.clamp_min(1e-3))

    def std_factor(self, ivar: torch.Tensor) -> torch.Tensor:
        """The calibration factor of the MC spread at each spectrum's S/N: (B, 3), linear in
        log10 S/N between the knots (hat weights), constant beyond them."""
        knots = self.std_knots
        x = torch.minimum(torch.maximum(self.log_snr(ivar), knots[0]), knots[-1]).unsqueeze(-1)   # (B, 1)
        width = torch.cat([knots[1:] - knots[:-1], knots[-1:] - knots[-2:-1]])                  # (K,)
        left = torch.cat([knots[1:2] - knots[:1], knots[1:] - knots[:-1]])
        d = x - knots
        weights = torch.clamp(1.0 - torch.where(d >= 0, d / width, -d / left), min=0.0)          # (B, K)
        return weights @ self.std_table / weights.sum(-1, keepdim=True).clamp_min(1e-6)

    def standardise(self, params: torch.Tensor) -> torch.Tensor:
        """(B, 3) physical -> standardised (log10 Teff, logg, [Fe/H])."""
        x = torch.cat([torch.log10(params[:, :1]), params[:, 1:]], dim=1)
        return (x - self.param_mean) / self.param_std

    def set_standardisation(self, params: torch.Tensor) -> None:
        x = torch.cat([torch.log10(params[:, :1]), params[:, 1:]], dim=1)
        self.param_mean.copy_(x.mean(0))
        self.param_std.copy_(x.std(0).clamp_min(1e-3))

    # ---------------------------------------------------------------- decoder
    def atmosphere(self, params: torch.Tensor, latent: torch.Tensor, pixels: slice = slice(None)
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Temperatures (B, D), line and continuum optical thicknesses (B, D, P), (B, D, 1);
        ``pixels`` selects part of the grid (training windows)."""
        c = self.config
        h = self.dec(torch.cat([self.standardise(params), latent], dim=1))
        correction = torch.cumsum(F.softplus(self.dec_temperature(h)), dim=1) * c.temperature_scale
        temperature = params[:, :1] * self.grey * torch.exp(correction - correction[:, :1])
        dtau_cont = (self.dtau_ref * torch.exp(self.dec_continuum(h).clamp(-5.0, 5.0))).unsqueeze(-1)
        strength = torch.exp(self.dec_lines(h).clamp(-12.0, 6.0)).reshape(-1, c.n_layers, c.n_components)
        dtau_line = (strength @ torch.exp(self.phi[:, pixels].clamp(-12.0, 8.0))) * self.dtau_ref.reshape(1, -1, 1)
        return temperature, dtau_line, dtau_cont

    def generate(self, params: torch.Tensor, latent: torch.Tensor | None = None,
                 pixels: slice = slice(None)) -> torch.Tensor:
        """Parameters (B, 3) in physical units (and latent (B, L), default 0) -> normalised spectrum
        (B, P), or its ``pixels`` (a contiguous slice, broadened with edge padding)."""
        if latent is None:
            latent = params.new_zeros(params.shape[0], self.config.n_latent)
        if self.config.decoder == "plain":
            h = self.dec(torch.cat([self.standardise(params), latent], dim=1))
            return 1.0 + torch.tanh(self.dec_plain(h)[:, pixels])
        temperature, dtau_line, dtau_cont = self.atmosphere(params, latent, pixels)
        return fl.normalised_spectrum(self.wavelength_um[pixels], temperature, dtau_line, dtau_cont,
                                      self.mu, self.weights, self.kernel)

    def training_window(self) -> tuple[slice, slice]:
        """A random window of ``train_window`` pixels to generate, and the part of it to score
        (without the broadening kernel's half-width at each end)."""
        c = self.config
        if not (self.training and 0 < c.train_window < c.n_pixels):
            return slice(None), slice(None)
        start = int(torch.randint(0, c.n_pixels - c.train_window + 1, ()))
        half = (self.kernel.numel() // 2) if c.decoder == "physics" else 0
        return slice(start, start + c.train_window), slice(start + half, start + c.train_window - half)

    def forward(self, flux: torch.Tensor, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        params, latent = self.encode(flux, seed.reshape(1, 1).to(flux.dtype), torch.ones_like(flux))
        return params, latent, self.generate(params, latent)

    def loss(self, flux: torch.Tensor, ivar: torch.Tensor, params_true: torch.Tensor,
             encoder_flux: torch.Tensor | None = None, encoder_ivar: torch.Tensor | None = None,
             unlabelled_flux: torch.Tensor | None = None, unlabelled_ivar: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """Training loss; ``encoder_flux`` and ``encoder_ivar`` (default ``flux``, ``ivar``) are
        what the encoder sees (augmented), ``flux`` with ``ivar`` what the reconstructions are
        scored against. ``unlabelled_flux`` with its ivar (semi-supervised training): spectra
        without labels, which add ``unlabelled_weight`` times the mean ``log1p`` of the reduced
        chi-square of their reconstruction from the encoder's estimate."""
        c = self.config
        params, latent = self.encode(flux if encoder_flux is None else encoder_flux, flux.new_zeros(()),
                                     ivar if encoder_ivar is None else encoder_ivar)
        window, scored = self.training_window()
        inner = slice(scored.start - window.start, scored.stop - window.start) if window.start is not None else scored
        flux, ivar = flux[:, scored], ivar[:, scored]
        model = self.generate(params, latent, window)[:, inner]
        chi2 = reduced_chi2(model, flux, ivar)
        # the decoder also learns from the true parameters (teacher forcing), so it is a generator
        model_true = self.generate(params_true, latent.detach(), window)[:, inner]
        chi2_true = reduced_chi2(model_true, flux, ivar)
        predicted, true = self.standardise(params), self.standardise(params_true)
        if c.parameter_loss == "huber":
            param_loss = F.smooth_l1_loss(predicted, true, beta=c.huber_beta) * 3
        else:
            param_loss = F.mse_loss(predicted, true) * 3
        reconstruction = 0.5 * (torch.log1p(chi2) + torch.log1p(chi2_true)).mean()
        total = c.chi2_weight * reconstruction + c.parameter_weight * param_loss
        extra: dict[str, float] = {}
        if unlabelled_flux is not None and unlabelled_flux.shape[0]:
            params_u, latent_u = self.encode(unlabelled_flux, flux.new_zeros(()), unlabelled_ivar)
            model_u = self.generate(params_u, latent_u, window)[:, inner]
            chi2_u = reduced_chi2(model_u, unlabelled_flux[:, scored], unlabelled_ivar[:, scored])
            total = total + c.unlabelled_weight * torch.log1p(chi2_u).mean()
            extra["chi2_unlabelled_median"] = float(chi2_u.median().detach())
        chi2, chi2_true = chi2.median(), chi2_true.median()
        return total, {"loss": float(total.detach()), "chi2_median": float(chi2.detach()),
                       "chi2_true_params_median": float(chi2_true.detach()), "param": float(param_loss.detach()),
                       **extra}


class PhysFormerEnsemble(nn.Module):
    """Several trained PhysFormers' encoders as branches of one model (issue 20, item 4).

    Every member's encoder sees the spectrum; each MC draw is the mean of the members' draws of
    (log10 Teff, logg, [Fe/H]), so the MC mean is the ensemble mean. The first member's decoder
    generates the spectrum, from the ensemble's parameters and the first member's latent (a latent
    means something to its own decoder only). The ensemble has its own calibration buffers
    (``std_scale``, ``std_table``), fitted like a single model's
    (:func:`~specserve.training.physformer.train.calibrate`). It offers what
    :class:`PhysFormerInference`, :class:`PhysFormerGenerator` and the evaluation use of a
    :class:`PhysFormer`; an encoder costs a few percent of the generator, so a member adds little
    latency.
    """

    def __init__(self, members: list[PhysFormer]):
        super().__init__()
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two members")
        first = members[0].config
        for m in members[1:]:
            c = m.config
            for name in ("n_pixels", "log10_start", "log10_step", "noise_input", "teff_min", "teff_max",
                         "logg_min", "logg_max", "feh_min", "feh_max"):
                if getattr(c, name) != getattr(first, name):
                    raise ValueError(f"ensemble members differ in {name}: {getattr(first, name)} and {getattr(c, name)}")
        self.members = nn.ModuleList(members)
        self.config = first
        self.register_buffer("std_scale", torch.ones(3))
        self.register_buffer("std_knots", members[0].std_knots.clone())
        self.register_buffer("std_table", torch.ones(len(STD_KNOTS_SNR), 3))
        self.register_buffer("box_min", members[0].box_min.clone())
        self.register_buffer("box_max", members[0].box_max.clone())
        self.widths = [m.config.d_model for m in members]

    log_snr = staticmethod(PhysFormer.log_snr)
    std_factor = PhysFormer.std_factor

    def encode_features(self, flux: torch.Tensor, ivar: torch.Tensor | None = None) -> torch.Tensor:
        return torch.cat([m.encode_features(flux, ivar) for m in self.members], dim=1)

    def encode_head(self, z: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        boxed, latent = [], None
        for m, part in zip(self.members, torch.split(z, self.widths, dim=1)):
            b, lat = m.encode_head_log(part, offset)
            boxed.append(b)
            latent = lat if latent is None else latent
        return self.members[0].from_log(torch.stack(boxed).mean(dim=0)), latent

    def encode(self, flux: torch.Tensor, offset: torch.Tensor, ivar: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_head(self.encode_features(flux, ivar), offset)

    def generate(self, params: torch.Tensor, latent: torch.Tensor | None = None,
                 pixels: slice = slice(None)) -> torch.Tensor:
        return self.members[0].generate(params, latent, pixels)

    def standardise(self, params: torch.Tensor) -> torch.Tensor:
        return self.members[0].standardise(params)

    @property
    def param_mean(self) -> torch.Tensor:
        return self.members[0].param_mean

    @property
    def param_std(self) -> torch.Tensor:
        return self.members[0].param_std


class PhysFormerInference(nn.Module):
    """The exported ``physformer`` graph: MC inversion, reconstruction and its chi-square.

    ``forward(flux, ivar, n_samples, seed)``: the encoder body runs once, its head ``T`` times on
    the features tiled ``T`` times (sample-major). Returns ``parameters`` (B, 3): the MC mean (Teff
    as ``10 ** mean log10 Teff``); ``parameters_std`` (B, 3) (Teff first order from the log spread;
    each times ``std_scale``, the calibration on the validation split); the ``samples`` are raw;
    ``reduced_chi2`` (B,) of ``model_spectrum`` (B, P), generated from the mean parameters and
    mean latent, against ``flux`` with ``ivar``; ``samples`` (T, B, 3).
    """

    def __init__(self, model: PhysFormer):
        super().__init__()
        self.model = model

    def forward(self, flux: torch.Tensor, ivar: torch.Tensor, n_samples: torch.Tensor, seed: torch.Tensor):
        m = self.model
        features = TileSamples.apply(m.encode_features(flux, ivar), n_samples)
        params, latent = m.encode_head(features, seed.reshape(1, 1).to(flux.dtype))
        samples = params.reshape(-1, flux.shape[0], 3)                      # (T, B, 3)
        latent = latent.reshape(-1, flux.shape[0], m.config.n_latent).mean(dim=0)
        log_teff = torch.log10(samples[..., :1])
        rest = samples[..., 1:]
        log_mean, rest_mean = log_teff.mean(dim=0), rest.mean(dim=0)
        teff = 10.0 ** log_mean
        mean = torch.cat([teff, rest_mean], dim=1)
        # spreads of the offsets from the first sample: exactly 0 when every sample is the same
        d_teff, d_rest = log_teff - log_teff[:1], rest - rest[:1]
        teff_std = teff * math.log(10.0) * torch.sqrt(((d_teff - d_teff.mean(dim=0)) ** 2).mean(dim=0))
        rest_std = torch.sqrt(((d_rest - d_rest.mean(dim=0)) ** 2).mean(dim=0))
        std = torch.cat([teff_std, rest_std], dim=1) * m.std_scale * m.std_factor(ivar)
        spectrum = m.generate(mean, latent)
        return mean, std, reduced_chi2(spectrum, flux, ivar), spectrum, samples


class PhysFormerGenerator(nn.Module):
    """The exported ``physformer-generate`` graph: parameters (B, 3) -> normalised spectrum (B, P), latent 0."""

    def __init__(self, model: PhysFormer):
        super().__init__()
        self.model = model

    def forward(self, parameters: torch.Tensor) -> torch.Tensor:
        m = self.model  # clipped into the box (the server refuses parameters outside it)
        return m.generate(torch.minimum(torch.maximum(parameters, m.box_min), m.box_max))
