"""Spatial-broadcast decoder: the reconstruction that keeps slots object-like (docs/method.md).

Each slot is broadcast to every grid position, a 2-D position embedding is added, and a ReLU MLP
predicts a feature vector and an alpha logit per (slot, position). Alphas are softmaxed over slots
and the reconstruction is the alpha-weighted sum of the slots' features.

The public code spends most of its step time here. Two exact rewrites of the same math make it cheap:
- the first layer is linear, so W·(slot + pos) = W·slot + W·pos: the K slots and the N positions
  are projected separately and broadcast-added at the hidden width (no (B, K, N, d) input tensor);
- the last layer is linear too, so Σ_k α_k·(W·h_k + b) = W·(Σ_k α_k·h_k) + b: only the alpha logit
  is computed per (slot, position); the hidden states are mixed by the alphas first and the feature
  head then runs once per position instead of K times (no (B, K, N, C) tensor either).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sgmodel.config import DecoderConfig
from sgmodel.shatter import sine_position_encoding


class SpatialBroadcastDecoder(nn.Module):
    """slots of width `dim` -> features of width `feat_dim` (the image tokens they reconstruct)."""

    def __init__(self, cfg: DecoderConfig, dim: int, feat_dim: int):
        super().__init__()
        hidden = cfg.decoder_hidden
        self.dim = dim
        self.slot_in = nn.Linear(dim, hidden)
        # the fixed sine table through a learned linear map = a learned 2-D embedding at any grid size
        self.pos_in = nn.Linear(dim, hidden, bias=False)
        self.hidden = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(cfg.decoder_layers - 2))
        self.feature_head = nn.Linear(hidden, feat_dim)
        self.alpha_head = nn.Linear(hidden, 1)

    def forward(self, slots: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """slots (B, K, d) -> reconstruction (B, N, C), alphas (B, K, N)."""
        b, k = slots.shape[:2]
        n = grid[0] * grid[1]
        pos = sine_position_encoding(grid, self.dim, device=slots.device, dtype=slots.dtype)  # (N, d)
        # (B, N, K, hidden): position-major, so the alpha mixing below is a plain batched matmul
        x = self.slot_in(slots)[:, None] + self.pos_in(pos)[None, :, None]  # first layer, split
        x = F.relu(x, inplace=True).view(b * n * k, -1)
        for layer in self.hidden:  # 2-D inputs: the matmul output is not a view, so ReLU can run in place
            x = F.relu(layer(x), inplace=True)
        alphas = self.alpha_head(x).view(b, n, k).float().softmax(dim=-1)  # (B, N, K): slots compete per position
        mixed = alphas.to(x.dtype).unsqueeze(2) @ x.view(b, n, k, -1)  # (B, N, 1, hidden) = Σ_k α_k h_k
        recon = self.feature_head(mixed.squeeze(2))  # (B, N, C) = Σ_k α_k (W h_k + b) since Σ_k α_k = 1
        return recon, alphas.transpose(1, 2)  # alphas as (B, K, N)
