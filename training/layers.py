"""Network layers the models share: multi-head Hadamard (and dot-product) self-attention, the
pre-norm transformer block, patch tokens, MC dropout that survives ONNX export, the sample tiling
of MC heads, and a switch that turns MC dropout off (export checks). The SPT is built from them
(:mod:`specserve.training.spt.model`, whose docstring gives the equations), and so is
PhysFormer's encoder."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


class _Heads(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.proj = nn.Linear(d_model, d_model)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, H, N, d)"""
        b, n, _ = x.shape
        return x.reshape(b, n, self.n_heads, self.head_dim).transpose(1, 2)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, N, d) -> (B, N, D)"""
        b, h, n, d = x.shape
        return self.proj(x.transpose(1, 2).reshape(b, n, h * d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        return self.merge(self.attend(q, k, v))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class HadamardAttention(_Heads):
    """Multi-head Hadamard self-attention (module docstring): O(N d) per head instead of O(N^2 d)."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(q * k / math.sqrt(self.head_dim), dim=-2)  # over tokens
        return weights * v * q.shape[-2]


class DotProductAttention(_Heads):
    """Ordinary multi-head scaled dot-product attention (the ablation)."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1)
        return weights @ v


class Block(nn.Module):
    """Pre-norm transformer block: attention ("hadamard" or "dot") and a GELU feed-forward layer."""

    def __init__(self, d_model: int, n_heads: int, ffn: int, attention: str = "hadamard"):
        super().__init__()
        layer = HadamardAttention if attention == "hadamard" else DotProductAttention
        self.norm1 = nn.LayerNorm(d_model)
        self.attention = layer(d_model, n_heads)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn), nn.GELU(), nn.Linear(ffn, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.ffn(self.norm2(x))


def encode_patches(model: nn.Module, flux: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
    """Shared by the SPT and PhysFormer encoders: ``flux - 1`` zero-padded to whole patches,
    patches -> tokens (``model.embed`` + ``model.position``, + ``extra`` (B, N, D) when given:
    e.g. a noise embedding) -> ``model.blocks``: (B, N, D). ``model.config`` gives ``n_pixels``,
    ``patch_size`` and ``n_tokens``."""
    c = model.config
    x = flux - 1.0
    pad = c.n_tokens * c.patch_size - c.n_pixels
    if pad:
        x = F.pad(x, (0, pad))
    tokens = model.embed(x.reshape(x.shape[0], c.n_tokens, c.patch_size)) + model.position
    if extra is not None:
        tokens = tokens + extra
    for block in model.blocks:
        tokens = block(tokens)
    return tokens


class MCDropout(nn.Module):
    """Always-on dropout whose mask ONNX export keeps random (module docstring).

    ``forward(x, offset)``: ``offset`` is a tensor broadcastable to ``x`` (a scalar shift of the
    uniform draws); any value gives the same distribution. ``active = False`` (see
    :func:`deterministic`) turns it into the identity.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)
        self.active = True

    def forward(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        if not self.active or self.p == 0.0:
            return x + 0.0 * offset  # keeps ``seed`` an input of graphs exported without dropout
        u = torch.rand_like(x) + offset
        keep = (u - torch.floor(u)) >= self.p
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}, active={self.active}"


class TileSamples(torch.autograd.Function):
    """(B, D) features and an int64 ``[T]`` tensor -> (T * B, D), exported as one ONNX Tile."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, n_samples: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return features.repeat(int(n_samples.reshape(-1)[0]), 1)

    @staticmethod
    def symbolic(g, features, n_samples):  # noqa: D102
        one = g.op("Constant", value_t=torch.tensor([1], dtype=torch.int64))
        repeats = g.op("Concat", g.op("Reshape", n_samples, g.op("Constant", value_t=torch.tensor([1]))), one, axis_i=0)
        return g.op("Tile", features, repeats)


@contextmanager
def deterministic(model: nn.Module) -> Iterator[nn.Module]:
    """Switch every :class:`MCDropout` of ``model`` off inside the block (export checks)."""
    layers = [m for m in model.modules() if isinstance(m, MCDropout)]
    before = [m.active for m in layers]
    for m in layers:
        m.active = False
    try:
        yield model
    finally:
        for m, b in zip(layers, before):
            m.active = b
