"""Gather: a phrase picks the entities it is about (docs/method.md).

One pre-norm cross-attention layer: the text embedding is the query, an image's K slots are keys and
values; then a GELU feed-forward, a final LayerNorm and L2 normalisation give the fused vector
z(I, T). The attention weights w (K,), averaged over heads, say which slots the phrase selects;
inference combines the slot maps with them.

Training needs z for every (image, text) pair of the batch: each text query attends to each image
independently, so all B x T pairs are one fused SDPA call with queries (B, H, T, hd) against keys
(B, H, K, hd) — no B*T-sized copy of the slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sgmodel.config import GatherConfig
from sgmodel.shatter import FeedForward


GEOMETRY_FEATURES = 4


def slot_geometry(attn: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Entity maps A (B, K, N) on an (h, w) grid -> (B, K, 4) per slot: centroid x and y (image
    centre 0, edges +-0.5), log of its share of the image, and spread (rms distance from the centroid).

    Detached: the geometry describes the maps, it does not train them. Relational phrases compare
    entities by exactly these ("on the left", "the bigger one").
    """
    h, w = grid
    attn = attn.detach().float()
    ys = ((torch.arange(h, device=attn.device) + 0.5) / h - 0.5).repeat_interleave(w)  # (N,) row-major tokens
    xs = ((torch.arange(w, device=attn.device) + 0.5) / w - 0.5).repeat(h)  # (N,)
    mass = attn.sum(dim=-1, keepdim=True) + 1e-6  # (B, K, 1)
    cx = (attn * xs).sum(dim=-1, keepdim=True) / mass
    cy = (attn * ys).sum(dim=-1, keepdim=True) / mass
    spread = ((attn * ((xs - cx) ** 2 + (ys - cy) ** 2)).sum(dim=-1, keepdim=True) / mass).sqrt()
    return torch.cat([cx, cy, torch.log(mass / attn.shape[-1]), spread], dim=-1)


class TextGather(nn.Module):
    """Its own section plus the widths it shares with the slots: joint width `dim`, feed-forward
    `mlp_ratio` and `dropout` (config section `slots`)."""

    def __init__(self, cfg: GatherConfig, dim: int, mlp_ratio: float, dropout: float):
        super().__init__()
        d = dim
        self.heads, self.head_dim = cfg.gather_heads, cfg.gather_head_dim
        inner = self.heads * self.head_dim
        self.query_residual = cfg.gather_query_residual
        self.norm_query = nn.LayerNorm(d)
        self.norm_slots = nn.LayerNorm(d)
        self.to_q = nn.Linear(d, inner, bias=False)
        self.to_k = nn.Linear(d, inner, bias=False)
        self.to_v = nn.Linear(d, inner, bias=False)
        self.out = nn.Linear(inner, d)
        self.dropout = nn.Dropout(dropout)
        self.norm_ffn = nn.LayerNorm(d)
        self.ffn = FeedForward(d, mlp_ratio, dropout)
        self.norm_final = nn.LayerNorm(d)
        # where each slot's entity is and how large (slot_geometry): added to the keys only, so it
        # decides which slots a phrase picks, not what the fused vector says
        self.geometry = nn.Linear(GEOMETRY_FEATURES, inner, bias=False) if cfg.slot_geometry else None
        self.geometry_scale = cfg.geometry_scale

    def forward(
        self,
        text: torch.Tensor,
        slots: torch.Tensor,
        text_image_index: torch.Tensor | None = None,
        return_weights: bool = False,
        geometry: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """text (T, d), slots (B, K, d), geometry (B, K, 4) from `slot_geometry` (needed when configured).

        text_image_index None (training): every pair -> z (B, T, d), w (B, T, K) or None.
        text_image_index (T,) given (inference): each text with its own image only -> z (T, d), w (T, K).
        Weights are computed explicitly (same math as SDPA) only when asked for.
        """
        t, b, k = text.shape[0], slots.shape[0], slots.shape[1]
        h, hd = self.heads, self.head_dim
        q = self.to_q(self.norm_query(text)).view(t, h, hd)  # (T, H, hd)
        kv = self.norm_slots(slots)
        keys = self.to_k(kv)  # (B, K, inner)
        if self.geometry is not None:
            keys = keys + self.geometry(geometry.to(keys.dtype) * self.geometry_scale)
        keys = keys.view(b, k, h, hd).transpose(1, 2)  # (B, H, K, hd)
        values = self.to_v(kv).view(b, k, h, hd).transpose(1, 2)  # (B, H, K, hd)
        if text_image_index is None:
            q = q.transpose(0, 1).unsqueeze(0).expand(b, h, t, hd)  # (B, H, T, hd): all pairs
        else:
            q = q.unsqueeze(2)  # (T, H, 1, hd)
            keys, values = keys[text_image_index], values[text_image_index]  # (T, H, K, hd)

        weights = None
        if return_weights:
            probs = ((q @ keys.transpose(-1, -2)) * hd**-0.5).float().softmax(dim=-1)  # (.., H, Tq, K)
            fused = probs.to(values.dtype) @ values  # (.., H, Tq, hd)
            weights = probs.mean(dim=1)  # (B, T, K) or (T, 1, K)
        else:
            fused = F.scaled_dot_product_attention(q, keys, values)  # (.., H, Tq, hd)
        fused = fused.transpose(1, 2).reshape(fused.shape[0], fused.shape[2], h * hd)  # (B, T, inner) | (T, 1, inner)

        x = self.dropout(self.out(fused))  # (B, T, d) | (T, 1, d)
        if text_image_index is not None:
            x = x.squeeze(1)  # (T, d)
            weights = weights.squeeze(1) if weights is not None else None  # (T, K)
        if self.query_residual:
            x = x + text  # broadcasts over B in the all-pairs case
        x = x + self.ffn(self.norm_ffn(x))
        z = F.normalize(self.norm_final(x), dim=-1)
        return z, weights
