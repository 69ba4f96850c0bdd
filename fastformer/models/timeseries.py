"""A causal transformer forecaster for dynamical systems ``x_t = f(x_{t-1}, ..., x_{t-W})``.

Each position of a window reads the values up to it (causal attention) and
predicts the next one, so one window of ``W`` values gives ``W`` training
targets. ``forecast`` rolls the model forward, feeding its predictions back.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..nn import Block, LayerNorm


class TimeSeriesTransformer(nn.Module):
    """``forward(x (B, T, n_features))``, ``T <= window`` → next-value predictions
    ``(B, T, n_features)``: output ``t`` estimates ``x[:, t + 1]`` from ``x[:, :t + 1]``.

    Values are standardised with ``mean``/``std`` buffers (set them from the
    training data with :meth:`set_scale`) and predictions are returned unscaled.
    """

    def __init__(self, n_features: int = 1, window: int = 32, d_model: int = 64, num_heads: int = 4,
                 num_layers: int = 2, mlp_ratio: float = 4.0, dropout: float = 0.0, use_checkpoint: bool = False):
        super().__init__()
        self.window = window
        self.use_checkpoint = use_checkpoint
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.embed = nn.Linear(n_features, d_model)
        self.pos_embed = nn.Parameter(torch.randn(1, window, d_model) * 0.02)
        self.blocks = nn.ModuleList([
            Block(d_model, num_heads, mlp_ratio, norm_first=True, eps=1e-5, act="gelu", drop=dropout,
                         attn_drop=dropout)
            for _ in range(num_layers)
        ])
        self.norm = LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_features)

    @torch.no_grad()
    def set_scale(self, series: Tensor) -> None:
        """Standardise with the mean/std of ``series (..., n_features)``."""
        flat = series.reshape(-1, series.shape[-1]).float()
        self.mean.copy_(flat.mean(0))
        self.std.copy_(flat.std(0).clamp(min=1e-8))

    def forward(self, x: Tensor) -> Tensor:
        """One-step-ahead predictions at every position (causal attention).

        Args:
            x: ``(B, T, n_features)`` in the data's units, ``T <= window``; standardised with the
                ``mean`` / ``std`` buffers inside.

        With ``use_checkpoint``, in training, each block is recomputed in the backward pass.

        Returns:
            ``(B, T, n_features)`` in the data's units: output ``t`` estimates ``x[:, t + 1]`` from
            ``x[:, :t + 1]``.

        Raises:
            ValueError: ``x`` is not 3-D, or ``T`` exceeds ``window``.
        """
        if x.dim() != 3:
            raise ValueError(f"x must be (B, T, n_features), got shape {tuple(x.shape)}")
        T = x.shape[1]
        if T > self.window:
            raise ValueError(f"window of {T} values exceeds the model's window {self.window}")
        h = self.embed((x - self.mean) / self.std) + self.pos_embed[:, :T]
        for block in self.blocks:
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, None, True, use_reentrant=False)
            else:
                h = block(h, None, True)
        return self.head(self.norm(h)) * self.std + self.mean

    def predict_next(self, context: Tensor) -> Tensor:
        """``x_{t}`` from the last ``window`` values of ``context (B, T, n_features)`` → ``(B, n_features)``."""
        return self(context[:, -self.window:])[:, -1]

    @torch.no_grad()
    def forecast(self, context: Tensor, steps: int) -> Tensor:
        """Multi-step rollout: ``(B, steps, n_features)``, each prediction fed back as input."""
        out = []
        hist = context
        for _ in range(steps):
            nxt = self.predict_next(hist)
            out.append(nxt)
            hist = torch.cat([hist[:, -(self.window - 1):], nxt[:, None]], dim=1)
        return torch.stack(out, dim=1)


def make_windows(series: Tensor, window: int, stride: int = 1):
    """Training pairs from ``series (N, n_features)``: inputs ``(M, window, F)`` and the
    one-step-ahead targets ``(M, window, F)``."""
    x = series.unfold(0, window + 1, stride).permute(0, 2, 1)  # (M, window + 1, F)
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def persistence_forecast(context: Tensor, steps: int) -> Tensor:
    """The baseline: the last observed value repeated ``(B, steps, n_features)``."""
    return context[:, -1:].expand(-1, steps, -1)


__all__ = ["TimeSeriesTransformer", "make_windows", "persistence_forecast"]
