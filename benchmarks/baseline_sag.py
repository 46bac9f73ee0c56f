"""The training-step baseline: the same Shatter-and-Gather math as sgmodel, written the plain eager way.

This is how the public implementation computes the step, and what sgmodel's step is measured against:
- every attention (ViT, BERT, slot group self-attention, gather) is an einsum for the logits, a full
  softmax and an einsum for the output (no fused scaled-dot-product attention kernel);
- the reconstruction decoder broadcasts every slot to every position at the input width
  ((B, K, N, d): slot + position), runs the whole MLP per (slot, position) including the output layer
  ((B, K, N, C + 1)), and mixes the K predictions afterwards.
Parameters have the same shapes as sgmodel's (`load_from_sgmodel` copies them), so with dropout off and
the same slot noise both compute the same loss; `check_equivalence` asserts it before any timing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sgmodel.config import Config


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
              dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """q (..., H, Q, hd), k/v (..., H, K, hd) -> (..., H, Q, hd) with an explicit (..., H, Q, K) softmax."""
    logits = torch.einsum("...qd,...kd->...qk", q, k) * q.shape[-1] ** -0.5  # (..., H, Q, K)
    if bias is not None:
        logits = logits + bias
    probs = F.dropout(logits.softmax(dim=-1), dropout, training)
    return torch.einsum("...qk,...kd->...qd", probs, v)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, H*hd) -> (B, H, L, hd)"""
    b, length, inner = x.shape
    return x.view(b, length, heads, inner // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, hd) -> (B, L, H*hd)"""
    b, h, length, hd = x.shape
    return x.transpose(1, 2).reshape(b, length, h * hd)


class FeedForward(nn.Sequential):
    """Linear -> GELU -> dropout -> Linear -> dropout (indices 0 and 3 hold the weights, as in sgmodel)."""

    def __init__(self, dim: int, ratio: float, dropout: float):
        hidden = max(1, int(round(dim * ratio)))
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout))


# ---- encoders ----------------------------------------------------------------------------------------


class EncoderBlock(nn.Module):
    """One transformer layer: pre-norm (ViT) or post-norm (BERT), LayerNorm eps 1e-12 as both configs use."""

    def __init__(self, dim: int, heads: int, pre_norm: bool, dropout: float):
        super().__init__()
        self.heads, self.pre_norm, self.drop = heads, pre_norm, dropout
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-12), nn.LayerNorm(dim, eps=1e-12)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def attend(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        q, k, v = (split_heads(proj(x), self.heads) for proj in (self.q, self.k, self.v))  # (B, H, L, hd)
        out = merge_heads(attention(q, k, v, bias, self.drop, self.training))  # (B, L, C)
        return F.dropout(self.o(out), self.drop, self.training)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.fc2(F.gelu(self.fc1(x))), self.drop, self.training)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attend(self.norm1(x), bias)
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attend(x, bias))
        return self.norm2(x + self.mlp(x))


class EagerViT(nn.Module):
    """images (B, 3, H, W) -> patch tokens (B, N, C), class token dropped."""

    def __init__(self, cfg: Config):
        super().__init__()
        c, p = cfg.vit_hidden, cfg.vit_patch
        grid = (cfg.image_size[0] // p) * (cfg.image_size[1] // p)
        self.patch = nn.Conv2d(3, c, p, stride=p)
        self.cls_token = nn.Parameter(torch.randn(1, 1, c) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, grid + 1, c) * 0.02)
        self.blocks = nn.ModuleList(EncoderBlock(c, cfg.vit_heads, pre_norm=True, dropout=0.0) for _ in range(cfg.vit_layers))
        self.norm = nn.LayerNorm(c, eps=1e-12)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch(images).flatten(2).transpose(1, 2)  # (B, N, C)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (B, 1+N, C)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1:]


class EagerBert(nn.Module):
    """input_ids, attention_mask (T, L) -> [CLS] vector (T, C)."""

    def __init__(self, cfg: Config, vocab_size: int, dropout: float = 0.1):
        super().__init__()
        c = cfg.bert_hidden
        self.word = nn.Embedding(vocab_size, c)
        self.position = nn.Embedding(max(512, cfg.max_text_length), c)
        self.token_type = nn.Embedding(2, c)
        self.emb_norm = nn.LayerNorm(c, eps=1e-12)
        self.drop = dropout
        self.blocks = nn.ModuleList(EncoderBlock(c, cfg.bert_heads, pre_norm=False, dropout=dropout) for _ in range(cfg.bert_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        x = self.word(input_ids) + self.position.weight[:length] + self.token_type.weight[0]  # (T, L, C)
        x = F.dropout(self.emb_norm(x), self.drop, self.training)
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min  # (T, 1, 1, L)
        for block in self.blocks:
            x = block(x, bias)
        return x[:, 0]


# ---- shatter, gather, decoder ------------------------------------------------------------------------


def sine_table(h: int, w: int, dim: int) -> torch.Tensor:
    """The fixed 2-D sine encoding (h*w, dim) sgmodel uses (same frequencies, same channel order)."""
    quarter = dim // 4
    steps = torch.arange(quarter, dtype=torch.float64) / max(quarter - 1, 1)
    freqs = math.pi * 32.0**steps
    ys = ((torch.arange(h, dtype=torch.float64) + 0.5) / h)[:, None, None] * freqs  # (h, 1, q)
    xs = ((torch.arange(w, dtype=torch.float64) + 0.5) / w)[None, :, None] * freqs  # (1, w, q)
    table = torch.cat([ys.sin().expand(h, w, quarter), ys.cos().expand(h, w, quarter),
                       xs.sin().expand(h, w, quarter), xs.cos().expand(h, w, quarter)], dim=-1)
    return F.pad(table.reshape(h * w, 4 * quarter), (0, dim - 4 * quarter)).float()  # (N, dim)


class EagerShatter(nn.Module):
    """Slot attention with the slot-axis softmax; attribute names as in sgmodel.shatter (weights load 1:1)."""

    def __init__(self, cfg: Config, in_dim: int):
        super().__init__()
        d = self.dim = cfg.dim
        self.groups, self.per_group, self.iters = cfg.slot_groups, cfg.slots_per_group, cfg.slot_iters
        self.cross_heads, self.self_heads = cfg.slot_cross_heads, cfg.slot_self_heads
        cross, selfw = cfg.slot_cross_heads * cfg.slot_cross_head_dim, cfg.slot_self_heads * cfg.slot_self_head_dim
        self.input_proj, self.input_norm = nn.Linear(in_dim, d), nn.LayerNorm(d)
        self.slot_mu = nn.Parameter(torch.randn(self.groups, d))
        self.slot_logvar = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.groups, d)))
        noise = torch.randn((self.groups, self.per_group, d), generator=torch.Generator().manual_seed(cfg.eval_seed))
        self.register_buffer("eval_noise", noise, persistent=False)
        self.norm_slots = nn.LayerNorm(d)
        self.to_q, self.to_k, self.to_v = (nn.Linear(d, cross, bias=False) for _ in range(3))
        self.cross_out, self.norm_cross_ffn = nn.Linear(cross, d), nn.LayerNorm(d)
        self.cross_ffn = FeedForward(d, cfg.mlp_ratio, cfg.dropout)
        self.norm_self, self.self_qkv, self.self_out = nn.LayerNorm(d), nn.Linear(d, 3 * selfw, bias=False), nn.Linear(selfw, d)
        self.norm_self_ffn, self.self_ffn = nn.LayerNorm(d), FeedForward(d, cfg.mlp_ratio, cfg.dropout)
        self.norm_out, self.out = nn.LayerNorm(d), nn.Linear(d, d)
        self.drop = cfg.dropout

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = tokens.shape
        k_slots = self.groups * self.per_group
        x = self.input_norm(self.input_proj(tokens))  # (B, N, d)
        keys = split_heads(self.to_k(x + sine_table(*grid, self.dim)), self.cross_heads)  # (B, H, N, hd)
        values = split_heads(self.to_v(x), self.cross_heads)  # (B, H, N, hd)
        eps = torch.randn(b, self.groups, self.per_group, self.dim) if self.training else self.eval_noise.expand(b, -1, -1, -1)
        slots = (self.slot_mu[:, None] + torch.exp(0.5 * self.slot_logvar)[:, None] * eps).reshape(b, k_slots, self.dim)
        for _ in range(self.iters):
            q = split_heads(self.to_q(self.norm_slots(slots)), self.cross_heads)  # (B, H, K, hd)
            logits = torch.einsum("bhkd,bhnd->bhkn", q, keys) * q.shape[-1] ** -0.5  # (B, H, K, N)
            attn = logits.softmax(dim=2)  # slots compete for each token
            weights = attn / (attn.sum(dim=-1, keepdim=True) + 1e-7)  # weighted mean over tokens
            update = merge_heads(torch.einsum("bhkn,bhnd->bhkd", weights, values))  # (B, K, H*hd)
            slots = slots + F.dropout(self.cross_out(update), self.drop, self.training)
            slots = slots + self.cross_ffn(self.norm_cross_ffn(slots))
            qkv = self.self_qkv(self.norm_self(slots)).view(b * self.groups, self.per_group, 3, -1)
            q, k, v = (split_heads(t, self.self_heads) for t in qkv.unbind(2))  # (B*Kg, Hs, Ks, hs)
            grouped = merge_heads(attention(q, k, v, dropout=self.drop, training=self.training))  # (B*Kg, Ks, inner)
            slots = slots + F.dropout(self.self_out(grouped.reshape(b, k_slots, -1)), self.drop, self.training)
            slots = slots + self.self_ffn(self.norm_self_ffn(slots))
        return self.out(self.norm_out(slots)), attn.mean(dim=1)  # (B, K, d), (B, K, N)


class EagerGather(nn.Module):
    """Every text against every image's slots, with the (B, H, T, K) softmax written out."""

    def __init__(self, cfg: Config):
        super().__init__()
        d, inner = cfg.dim, cfg.gather_heads * cfg.gather_head_dim
        self.heads = cfg.gather_heads
        self.norm_query, self.norm_slots = nn.LayerNorm(d), nn.LayerNorm(d)
        self.to_q, self.to_k, self.to_v = (nn.Linear(d, inner, bias=False) for _ in range(3))
        self.out, self.norm_ffn, self.norm_final = nn.Linear(inner, d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.ffn = FeedForward(d, cfg.mlp_ratio, cfg.dropout)
        self.drop, self.query_residual = cfg.dropout, cfg.gather_query_residual

    def forward(self, text: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """text (T, d), slots (B, K, d) -> z (B, T, d)"""
        q = split_heads(self.to_q(self.norm_query(text))[None], self.heads)[0]  # (H, T, hd)
        kv = self.norm_slots(slots)
        keys, values = split_heads(self.to_k(kv), self.heads), split_heads(self.to_v(kv), self.heads)  # (B, H, K, hd)
        logits = torch.einsum("htd,bhkd->bhtk", q, keys) * q.shape[-1] ** -0.5  # (B, H, T, K)
        fused = merge_heads(torch.einsum("bhtk,bhkd->bhtd", logits.softmax(dim=-1), values))  # (B, T, inner)
        x = F.dropout(self.out(fused), self.drop, self.training)
        if self.query_residual:
            x = x + text
        x = x + self.ffn(self.norm_ffn(x))
        return F.normalize(self.norm_final(x), dim=-1)


class EagerDecoder(nn.Module):
    """Spatial broadcast: (B, K, N, d) input, the MLP per (slot, position), then alpha-mixing of the K outputs."""

    def __init__(self, cfg: Config, feat_dim: int):
        super().__init__()
        hidden, self.dim = cfg.decoder_hidden, cfg.dim
        self.slot_in = nn.Linear(cfg.dim, hidden)
        self.pos_in = nn.Linear(cfg.dim, hidden, bias=False)
        self.hidden = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(cfg.decoder_layers - 2))
        self.feature_head, self.alpha_head = nn.Linear(hidden, feat_dim), nn.Linear(hidden, 1)

    def forward(self, slots: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, k, d = slots.shape
        n = grid[0] * grid[1]
        broadcast = slots[:, :, None, :].expand(b, k, n, d).contiguous()  # (B, K, N, d)
        x = F.relu(self.slot_in(broadcast) + self.pos_in(sine_table(*grid, self.dim)))  # (B, K, N, hidden)
        for layer in self.hidden:
            x = F.relu(layer(x))
        features = self.feature_head(x)  # (B, K, N, C)
        alphas = self.alpha_head(x).squeeze(-1).softmax(dim=1)  # (B, K, N)
        return torch.einsum("bkn,bknc->bnc", alphas, features)  # (B, N, C)


class BaselineSaG(nn.Module):
    """forward(batch) -> {"loss", "contrastive", "reconstruction"}: the paper's two losses, weight 1 each."""

    def __init__(self, cfg: Config, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.vit = EagerViT(cfg)
        self.bert = EagerBert(cfg, vocab_size)
        self.shatter = EagerShatter(cfg, cfg.vit_hidden)
        self.text_proj = nn.Linear(cfg.bert_hidden, cfg.dim)
        self.gather = EagerGather(cfg)
        self.decoder = EagerDecoder(cfg, cfg.vit_hidden)
        self.register_buffer("log_logit_scale", torch.tensor(math.log(cfg.logit_scale)))

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        tokens = self.vit(batch["images"])  # (B, N, C)
        grid = (batch["images"].shape[-2] // self.cfg.vit_patch, batch["images"].shape[-1] // self.cfg.vit_patch)
        slots, _ = self.shatter(tokens, grid)  # (B, K, d)
        text = self.text_proj(self.bert(batch["input_ids"], batch["attention_mask"]))  # (T, d)
        z = self.gather(text, slots)  # (B, T, d)
        logits = torch.einsum("td,btd->tb", text.detach(), z) * self.log_logit_scale.exp()  # (T, B)
        contrastive = F.cross_entropy(logits, batch["text_image_index"])
        reconstruction = F.mse_loss(self.decoder(slots, grid), tokens.detach())
        return {"loss": contrastive + self.cfg.recon_weight * reconstruction,
                "contrastive": contrastive.detach(), "reconstruction": reconstruction.detach()}

    def param_groups(self) -> list[dict]:
        """AdamW groups as sgmodel's: encoders at backbone_lr_scale x lr; no decay on vectors (biases, norms, slot mu)."""
        encoders = {id(p) for m in (self.vit, self.bert) for p in m.parameters()}
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            no_decay = p.ndim <= 1 or "slot_" in name or name.endswith(("cls_token", "pos_embed")) or ".word." in name \
                or ".position." in name or ".token_type." in name
            groups.setdefault((id(p) in encoders, no_decay), []).append(p)
        return [{"params": ps, "lr": self.cfg.lr * (self.cfg.backbone_lr_scale if enc else 1.0),
                 "weight_decay": 0.0 if nd else self.cfg.weight_decay} for (enc, nd), ps in sorted(groups.items())]


# ---- equivalence with sgmodel ------------------------------------------------------------------------

_ENCODER_NAMES = [  # sgmodel (transformers) name pieces -> baseline name pieces, applied in order
    ("image_encoder.vit.embeddings.patch_embeddings.projection.", "vit.patch."),
    ("image_encoder.vit.embeddings.cls_token", "vit.cls_token"),
    ("image_encoder.vit.embeddings.position_embeddings", "vit.pos_embed"),
    ("image_encoder.vit.layernorm.", "vit.norm."),
    ("image_encoder.vit.layers.", "vit.blocks."),
    (".attention.q_proj.", ".q."), (".attention.k_proj.", ".k."), (".attention.v_proj.", ".v."),
    (".attention.o_proj.", ".o."), (".layernorm_before.", ".norm1."), (".layernorm_after.", ".norm2."),
    (".mlp.fc1.", ".fc1."), (".mlp.fc2.", ".fc2."),
    ("text_encoder.bert.embeddings.word_embeddings.", "bert.word."),
    ("text_encoder.bert.embeddings.position_embeddings.", "bert.position."),
    ("text_encoder.bert.embeddings.token_type_embeddings.", "bert.token_type."),
    ("text_encoder.bert.embeddings.LayerNorm.", "bert.emb_norm."),
    ("text_encoder.bert.encoder.layer.", "bert.blocks."),
    (".attention.self.query.", ".q."), (".attention.self.key.", ".k."), (".attention.self.value.", ".v."),
    (".attention.output.dense.", ".o."), (".attention.output.LayerNorm.", ".norm1."),
    (".intermediate.dense.", ".fc1."), (".output.dense.", ".fc2."), (".output.LayerNorm.", ".norm2."),
]


def load_from_sgmodel(baseline: BaselineSaG, model: nn.Module) -> None:
    """Copy every parameter of a sgmodel ShatterAndGather (ViT image encoder, BERT text encoder) into the baseline."""
    mapped = {}
    for name, value in model.state_dict().items():
        if name.startswith(("feature_mean", "feature_std")):
            continue
        for old, new in _ENCODER_NAMES:
            name = name.replace(old, new)
        mapped[name] = value
    missing, unexpected = baseline.load_state_dict(mapped, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"sgmodel's parameters do not map onto the baseline: missing {missing[:4]}, unexpected {unexpected[:4]}")


def check_equivalence(cfg: Config, vocab_size: int, batch: dict, tolerance: float = 1e-4) -> tuple[float, float]:
    """Same weights, dropout off, fixed slot noise: sgmodel's loss and the baseline's must agree."""
    from sgmodel.model import ShatterAndGather

    model = ShatterAndGather(cfg, tokenizer=VocabOnly(vocab_size)).eval()
    baseline = BaselineSaG(cfg, vocab_size).eval()
    load_from_sgmodel(baseline, model)
    with torch.no_grad():
        ours, theirs = float(model(batch)["loss"]), float(baseline(batch)["loss"])
    if not math.isclose(ours, theirs, rel_tol=tolerance, abs_tol=tolerance):
        raise RuntimeError(f"the baseline does not compute sgmodel's loss: {theirs} vs {ours}")
    return ours, theirs


class VocabOnly:
    """What the text encoder needs from a tokenizer to size its embedding: a length and a pad id."""

    pad_token_id = 0

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size
