"""Shatter: entity discovery by slot attention over the image tokens (docs/method.md).

K = Kg x Ks slots start as Ks samples of each of Kg learned Gaussians. For L iterations with shared
weights, slots compete for tokens (softmax over the *slot* axis), each slot takes the mean of the
tokens it won (weights renormalised over tokens), then slots of the same Gaussian exchange
information by self-attention. The last iteration's competition weights, averaged over heads, are
the entity maps A (B, K, N): for every token they sum to 1 over slots, so they read as a soft
partition of the image — the masks that inference combines. (The renormalised weights would
instead sum to 1 over tokens per slot, a per-slot distribution that makes slot sizes incomparable.)
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from sgdata.format.errors import UserError
from sgmodel.config import SlotConfig

RENORM_EPS = 1e-7
MAX_POSITION_FREQUENCY = 32.0  # cycles per image side of the highest sine channel: resolves 64-cell grids


@lru_cache(maxsize=64)
def _sine_table(h: int, w: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    quarter = dim // 4
    if quarter == 0:
        return torch.zeros(h * w, dim, device=device, dtype=dtype)
    steps = torch.arange(quarter, dtype=torch.float64) / max(quarter - 1, 1)
    freqs = math.pi * MAX_POSITION_FREQUENCY**steps  # (q,) from half a cycle to 32 cycles per side
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h  # cell centres in (0, 1)
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    y_angles = ys[:, None, None] * freqs  # (h, 1, q)
    x_angles = xs[None, :, None] * freqs  # (1, w, q)
    table = torch.cat(
        [
            torch.sin(y_angles).expand(h, w, quarter),
            torch.cos(y_angles).expand(h, w, quarter),
            torch.sin(x_angles).expand(h, w, quarter),
            torch.cos(x_angles).expand(h, w, quarter),
        ],
        dim=-1,
    ).reshape(h * w, 4 * quarter)
    return F.pad(table, (0, dim - 4 * quarter)).to(device=device, dtype=dtype)  # (N, dim), zero channels if dim % 4


def sine_position_encoding(grid: tuple[int, int], dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Fixed 2-D sine encoding (h*w, dim) on normalised coordinates, so it means the same at any grid size.

    Cached per grid, device and dtype (built once, never copied to the device again); built outside
    inference mode so a table first made during evaluation can still serve training.
    """
    args = (int(grid[0]), int(grid[1]), int(dim), torch.device(device or "cpu"), dtype)
    if torch.compiler.is_compiling():  # traced once into the graph as a constant: no cache to consult
        return _sine_table.__wrapped__(*args)
    with torch.inference_mode(False):
        return _sine_table(*args)


class FeedForward(nn.Sequential):
    """Linear -> GELU -> dropout -> Linear -> dropout (the transformer MLP, width × ratio)."""

    def __init__(self, dim: int, ratio: float, dropout: float):
        hidden = max(1, int(round(dim * ratio)))
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout))


def compete_for_tokens(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (..., K, N) -> (attn, weights), both (..., K, N).

    attn: softmax over the slot axis (slots compete for each token; sums to 1 over K).
    weights: attn renormalised over tokens (each slot's weights sum to ~1 over N), so a slot's
    update is the weighted *mean* of the tokens it won.
    """
    attn = logits.softmax(dim=-2)
    weights = attn / (attn.sum(dim=-1, keepdim=True) + RENORM_EPS)
    return attn, weights


class EntitySlotAttention(nn.Module):
    """tokens (B, N, in_dim) on an (h, w) grid -> slots (B, K, d), entity maps A (B, K, N).

    Built from its own section: EntitySlotAttention(SlotConfig(dim=64, slot_groups=4), in_dim=384).
    """

    def __init__(self, cfg: SlotConfig, in_dim: int):
        super().__init__()
        d = cfg.dim
        self.groups, self.per_group = cfg.slot_groups, cfg.slots_per_group
        self.num_slots = self.groups * self.per_group
        self.iters = cfg.slot_iters
        self.value_position = cfg.slot_value_position
        self.dim = d
        self.cross_heads, self.cross_head_dim = cfg.slot_cross_heads, cfg.slot_cross_head_dim
        self.self_heads, self.self_head_dim = cfg.slot_self_heads, cfg.slot_self_head_dim
        cross_inner = self.cross_heads * self.cross_head_dim
        self_inner = self.self_heads * self.self_head_dim

        # "A linear layer maps the features to the aggregator width."
        self.input_proj = nn.Linear(in_dim, d)
        self.input_norm = nn.LayerNorm(d)

        # Kg learned Gaussians; eval draws one fixed eps so every image sees the same initial slots
        self.slot_mu = nn.Parameter(torch.randn(self.groups, d))
        self.slot_logvar = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.groups, d)))
        eval_noise = torch.randn(
            (self.groups, self.per_group, d), generator=torch.Generator().manual_seed(cfg.eval_seed)
        )
        self.register_buffer("eval_noise", eval_noise, persistent=False)

        # 1. cross-attention slots -> tokens (slot-axis softmax)
        self.norm_slots = nn.LayerNorm(d)
        self.to_q = nn.Linear(d, cross_inner, bias=False)
        self.to_k = nn.Linear(d, cross_inner, bias=False)
        self.to_v = nn.Linear(d, cross_inner, bias=False)
        self.cross_out = nn.Linear(cross_inner, d)
        self.norm_cross_ffn = nn.LayerNorm(d)
        self.cross_ffn = FeedForward(d, cfg.mlp_ratio, cfg.dropout)

        # 2. self-attention within each group of Ks slots
        self.norm_self = nn.LayerNorm(d)
        self.self_qkv = nn.Linear(d, 3 * self_inner, bias=False)
        self.self_out = nn.Linear(self_inner, d)
        self.norm_self_ffn = nn.LayerNorm(d)
        self.self_ffn = FeedForward(d, cfg.mlp_ratio, cfg.dropout)

        self.norm_out = nn.LayerNorm(d)
        self.out = nn.Linear(d, d)
        self.dropout = nn.Dropout(cfg.dropout)
        self.attn_dropout = cfg.dropout

    def initial_slots(self, batch: int, deterministic: bool) -> torch.Tensor:
        """s = mu + exp(logvar / 2) * eps, Ks samples per Gaussian -> (B, K, d), group-major order."""
        if deterministic:
            eps = self.eval_noise.unsqueeze(0).expand(batch, -1, -1, -1)  # (B, Kg, Ks, d)
        else:
            eps = torch.randn(batch, self.groups, self.per_group, self.dim, device=self.slot_mu.device)
        eps = eps.to(self.slot_mu.dtype)
        slots = self.slot_mu[:, None] + torch.exp(0.5 * self.slot_logvar)[:, None] * eps  # (B, Kg, Ks, d)
        return slots.reshape(batch, self.num_slots, self.dim)

    def group_self_attention(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, K, d), already normalised -> update (B, K, d); slots only see their own group."""
        b = x.shape[0]
        qkv = self.self_qkv(x).view(b * self.groups, self.per_group, 3, self.self_heads, self.self_head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B*Kg, Hs, Ks, hs)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(b, self.num_slots, self.self_heads * self.self_head_dim)
        return self.dropout(self.self_out(out))

    def iterate(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One shared-weight iteration. keys/values (B, H, N, hd), keys pre-scaled -> slots, attn (B, H, K, N)."""
        b, k = slots.shape[:2]
        q = self.to_q(self.norm_slots(slots)).view(b, k, self.cross_heads, self.cross_head_dim).transpose(1, 2)  # (B, H, K, hd)
        logits = q @ keys.transpose(-1, -2)  # (B, H, K, N)
        attn, weights = compete_for_tokens(logits.float())
        update = weights.to(values.dtype) @ values  # (B, H, K, hd): weighted mean of the tokens won
        update = update.transpose(1, 2).reshape(b, k, self.cross_heads * self.cross_head_dim)
        slots = slots + self.dropout(self.cross_out(update))
        slots = slots + self.cross_ffn(self.norm_cross_ffn(slots))
        slots = slots + self.group_self_attention(self.norm_self(slots))
        slots = slots + self.self_ffn(self.norm_self_ffn(slots))
        return slots, attn

    def forward(
        self, tokens: torch.Tensor, grid: tuple[int, int], deterministic: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, N, C) -> slots (B, K, d), maps A (B, K, N) (last iteration, mean over heads).

        deterministic: use the fixed eval noise for the initial slots (default: when not training).
        """
        if deterministic is None:
            deterministic = not self.training
        b, n, _ = tokens.shape
        if grid[0] * grid[1] != n:
            raise UserError(f"{n} image tokens do not fill a {grid[0]}x{grid[1]} grid")
        x = self.input_norm(self.input_proj(tokens))  # (B, N, d)
        pos = sine_position_encoding(grid, self.dim, device=x.device, dtype=x.dtype)  # (N, d): keys (and values if configured)
        heads, hd = self.cross_heads, self.cross_head_dim
        keys = self.to_k(x + pos).view(b, n, heads, hd).transpose(1, 2) * hd**-0.5  # (B, H, N, hd)
        values = self.to_v(x + pos if self.value_position else x).view(b, n, heads, hd).transpose(1, 2)  # (B, H, N, hd)
        slots = self.initial_slots(b, deterministic)
        attn = None
        for _ in range(self.iters):
            slots, attn = self.iterate(slots, keys, values)
        return self.out(self.norm_out(slots)), attn.mean(dim=1)  # (B, K, d), (B, K, N)
