"""ShatterAndGather: encoders -> shatter (slots, entity maps) -> gather (text-conditioned fusion).

forward(batch) returns the training losses, infer(batch) the response maps. The batch format is the
table in docs/architecture.md: B images (or their cached tokens), T phrases (or their cached
features), and `text_image_index` tying each phrase to its image.

Switches measured to matter at small scale (docs/method.md; defaults stay the paper's):
standardize_features (per-channel standardised tokens, input and reconstruction target),
normalize_text + learn_logit_scale/logit_scale, gather_query_residual=False (z from the slots only),
drop_duplicate_negatives (other images carrying the identical phrase are not negatives) and
drop_entailed_negatives (nor those described with every content word of the phrase).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sgdata.format.errors import UserError
from sgmodel import distributed
from sgmodel.batch import Batch
from sgmodel.config import Config
from sgmodel.decoder import SpatialBroadcastDecoder
from sgmodel.encoders import build_image_encoder, build_text_encoder, build_tokenizer
from sgmodel.gather import TextGather, slot_geometry
from sgmodel.inference import combine_slot_maps
from sgmodel.refine import refine_maps
from sgmodel.losses import coreference_loss, coreference_teachers, contrastive_loss, duplicate_phrase_mask, reconstruction_loss
from sgmodel.shatter import EntitySlotAttention

MAX_LOGIT_SCALE = 100.0
NO_DECAY_NAMES = ("slot_mu", "slot_logvar", "log_logit_scale")  # slot Gaussians, temperature
NO_DECAY_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.Embedding)


class ShatterAndGather(nn.Module):
    def __init__(self, cfg: Config, tokenizer=None):
        super().__init__()
        self.cfg = cfg
        seed = cfg.run.seed  # random encoder weights depend on it alone
        tokenizer = tokenizer if tokenizer is not None else build_tokenizer(cfg.text)
        self.image_encoder = build_image_encoder(cfg.image, seed)
        self.text_encoder = build_text_encoder(cfg.text, tokenizer, seed)
        channels = self.image_encoder.out_dim
        self.register_buffer("feature_mean", torch.zeros(channels))
        self.register_buffer("feature_std", torch.ones(channels))
        self.shatter = EntitySlotAttention(cfg.slots, channels)
        self.text_proj = nn.Linear(self.text_encoder.out_dim, cfg.slots.dim)  # "[CLS] -> linear layer to d"
        if cfg.text.text_word_embedding:  # a trainable vector per word piece beside the encoder's phrase vector
            self.word_embedding = nn.Embedding(len(tokenizer), cfg.slots.dim)
            nn.init.normal_(self.word_embedding.weight, std=0.02)
            self.word_norm = nn.LayerNorm(cfg.slots.dim)  # its scale matches the projected phrase vector's at once
            self.register_buffer("special_token_ids", torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long), persistent=False)
        self.gather = TextGather(cfg.gather, cfg.slots.dim, cfg.slots.mlp_ratio, cfg.slots.dropout)
        self.decoder = SpatialBroadcastDecoder(cfg.decoder, cfg.slots.dim, channels) if cfg.loss.recon_weight > 0 else None
        if cfg.loss.contrastive_warmup_steps > 0 or cfg.loss.contrastive_ramp_steps > 0 or cfg.loss.coreference_start > 0:
            # training steps seen, kept in the state dict so a resumed run continues the schedule
            self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))
        log_scale = torch.tensor(math.log(cfg.loss.logit_scale))
        if cfg.loss.learn_logit_scale:
            self.log_logit_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_logit_scale", log_scale)

    # ---- inputs --------------------------------------------------------------------------------

    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-channel statistics of the raw encoder tokens (from the data), used when standardize_features."""
        mean, std = torch.as_tensor(mean).flatten(), torch.as_tensor(std).flatten()
        channels = self.feature_mean.numel()
        if mean.numel() != channels or std.numel() != channels:
            raise UserError(f"feature statistics have {mean.numel()} channels but the image encoder gives {channels}")
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std.clamp(min=1e-6))

    def image_tokens(self, batch: dict) -> torch.Tensor:
        """(B, N, C): cached tokens when the batch has them, else the encoder on the images; standardised if configured."""
        if "image_tokens" in batch:
            tokens = batch["image_tokens"].to(self.feature_mean.device, self.feature_mean.dtype)
        else:
            tokens = self.image_encoder(batch["images"])
        if self.cfg.image.standardize_features:
            tokens = (tokens - self.feature_mean.to(tokens.dtype)) / self.feature_std.to(tokens.dtype)
        return tokens

    def token_grid(self, batch: dict, num_tokens: int) -> tuple[int, int]:
        """The (h, w) grid of the tokens: from the images' size, or the configured size for cached tokens."""
        size = tuple(batch["images"].shape[-2:]) if "images" in batch else tuple(self.cfg.image.image_size)
        grid = self.image_encoder.grid_size(size)
        if grid[0] * grid[1] != num_tokens:
            raise UserError(
                f"the image tokens hold {num_tokens} positions but {self.image_encoder.identity()} gives a "
                f"{grid[0]}x{grid[1]} grid; the cached features were made for another encoder or image size"
            )
        return grid

    def text_features(self, batch: dict) -> torch.Tensor:
        """(T, Ct): cached phrase features when the batch has them, else the text encoder."""
        if "text_feats" in batch:
            return batch["text_feats"].to(self.text_proj.weight.device, self.text_proj.weight.dtype)
        ids, mask = batch["input_ids"], batch["attention_mask"]  # (T, L) each
        if self.text_encoder.training:
            return self.text_encoder(ids, mask)
        # Without dropout identical phrases give identical vectors, and a batch repeats many phrases
        # ("the red circle"): encode each distinct one once and copy the vector to its places.
        rows, inverse = torch.unique(torch.cat([ids, mask], dim=1), dim=0, return_inverse=True)  # (U, 2L), (T,)
        length = ids.shape[1]
        return self.text_encoder(rows[:, :length], rows[:, length:])[inverse]  # (T, Ct)

    def text_embedding(self, batch: dict) -> torch.Tensor:
        t = self.text_proj(self.text_features(batch))  # (T, d)
        if hasattr(self, "word_embedding"):
            ids = batch["input_ids"].to(t.device)  # (T, L)
            words = batch["attention_mask"].to(t.device).bool() & ~torch.isin(ids, self.special_token_ids)  # (T, L)
            summed = (self.word_embedding(ids) * words.unsqueeze(-1).to(t.dtype)).sum(dim=1)  # (T, d)
            t = t + self.word_norm(summed / words.sum(dim=1, keepdim=True).clamp(min=1).to(t.dtype))
        return nn.functional.normalize(t, dim=-1) if self.cfg.loss.normalize_text else t

    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    # ---- training ------------------------------------------------------------------------------

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The training losses of a batch, in two tensor-only stages around the choice of negatives.

        The stages see the batch's tensors only; the negatives (phrase strings, and collectives
        under DDP) and the loss-weight schedule (Python state) are worked out between them. That
        split is what lets `compile_stages` compile the step without recompiling per batch.
        """
        tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        tokens, grid, slots, attn, text = self._encode(tensors)  # (B, N, C), (h, w), (B, K, d), (B, K, N), (T, d)
        geometry = slot_geometry(attn, grid) if self.gather.geometry is not None else None  # (B, K, 4)
        # the geometry travels with the slots to the other ranks' texts, as one tensor
        keyed = torch.cat([slots, geometry.to(slots.dtype)], dim=-1) if geometry is not None else slots
        negatives, offset, excluded = self._negatives(keyed, batch)  # (B_all, K, d[+4]), int, (T, B_all) or None
        step = self._schedule_step()
        weight = torch.tensor(self.contrastive_weight(step), dtype=torch.float32)  # () on the CPU
        teachers = None
        if self.cfg.loss.coreference_weight > 0:
            ref_index = tensors.get("text_ref_index", torch.full((len(batch["texts"]),), -1, dtype=torch.long))
            teachers = coreference_teachers(batch["texts"], ref_index).to(text.device)  # (T, T)
        started = step >= self.cfg.loss.coreference_start
        coref_weight = torch.tensor(self.cfg.loss.coreference_weight if started else 0.0, dtype=torch.float32)
        out = self._losses(tokens, grid, slots, attn, geometry, text, tensors["text_image_index"], negatives, offset,
                           excluded, weight, teachers, coref_weight)
        if hasattr(self, "steps_seen"):
            out["contrastive_weight"] = weight
        return out

    def _encode(self, tensors: dict) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stage 1: image tokens (B, N, C) on their (h, w) grid, slots (B, K, d), entity maps (B, K, N), phrase embeddings (T, d)."""
        tokens = self.image_tokens(tensors)  # (B, N, C)
        grid = self.token_grid(tensors, tokens.shape[1])
        slots, attn = self.shatter(tokens, grid)  # (B, K, d), (B, K, N)
        return tokens, grid, slots, attn, self.text_embedding(tensors)

    def _losses(self, tokens, grid, slots, attn, geometry, text, index, negatives, offset, excluded, weight,
                teachers=None, coref_weight=None) -> dict[str, torch.Tensor]:
        """Stage 2: the contrastive loss over the negatives, the reconstruction and co-reference losses, their weighted sum."""
        d = slots.shape[-1]
        negative_geometry = negatives[..., d:] if geometry is not None else None  # (B_all, K, 4)
        z, _ = self.gather(text, negatives[..., :d], geometry=negative_geometry)  # (B_all, T, d)
        scale = self.logit_scale()
        contrastive, accuracy = contrastive_loss(text, z, index.to(text.device), scale, excluded, offset)
        if self.decoder is not None:
            recon, _ = self.decoder(slots, grid)
            reconstruction = reconstruction_loss(recon, tokens)
        else:
            reconstruction = contrastive.new_zeros(())
        # weight: a 0-dim CPU tensor, not a float, so a changing schedule never recompiles; it multiplies a
        # tensor on any device without a copy to it
        loss = weight * contrastive + self.cfg.loss.recon_weight * reconstruction
        out = {"contrastive": contrastive.detach(), "reconstruction": reconstruction.detach(), "accuracy": accuracy,
               "logit_scale": scale.detach()}
        if teachers is not None:
            index = index.to(text.device)
            _, weights = self.gather(text, slots, text_image_index=index, return_weights=True, geometry=geometry)  # (T, K)
            maps = (weights.unsqueeze(-1) * attn.detach()[index].to(weights.dtype)).sum(dim=1)  # (T, N): each phrase on its image
            coreference = coreference_loss(maps.float(), teachers, self.cfg.loss.coreference_level)
            loss = loss + coref_weight * coreference
            out["coreference"] = coreference.detach()
        out["loss"] = loss
        return out

    def compile_stages(self, **options) -> None:
        """torch.compile the two stages of the training forward (config `compile`); inference stays eager.

        Whole-step graphs (forward and backward) cut the per-operation overhead that dominates small
        models (docs/benchmarks.md). Compiling takes minutes on a small CPU the first time (Inductor
        caches the kernels on disk for later runs) and needs a C++ compiler there; batches of a new
        size cost one more compile, after which sizes are treated as dynamic.
        """
        self._encode = torch.compile(self._encode, **options)
        self._losses = torch.compile(self._losses, **options)

    def _schedule_step(self) -> int:
        """This training step's number for the loss schedules (counted here: one forward per step).

        The count lives in the `steps_seen` buffer (saved with the model, so a resumed run continues the
        schedules) and in a host copy read from it once after building or loading: reading the buffer
        each step would make the step wait for the GPU. Without a schedule there is no count: 0.
        """
        if not hasattr(self, "steps_seen"):
            return 0
        if getattr(self, "_host_steps_seen", None) is None:
            self._host_steps_seen = int(self.steps_seen)
        step = self._host_steps_seen
        if self.training:
            self.steps_seen += 1
            self._host_steps_seen += 1
        return step

    def contrastive_weight(self, step: int) -> float:
        """1, or the warm-up schedule's weight at training step `step`."""
        warm, ramp = self.cfg.loss.contrastive_warmup_steps, self.cfg.loss.contrastive_ramp_steps
        if step < warm:
            return 0.0
        return min(1.0, (step - warm + 1) / ramp) if ramp > 0 else 1.0

    def _load_from_state_dict(self, *args, **kwargs):
        self._host_steps_seen = None  # re-read from the loaded buffer on the next step
        super()._load_from_state_dict(*args, **kwargs)

    def _negatives(self, slots: torch.Tensor, batch: dict) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        """The images every local text is contrasted with: (slots (B_all, K, d), local offset, excluded mask).

        With gather_negatives under DDP, every rank's slots join (ranks padded to the same B; padding
        columns are excluded). The excluded mask (T, B_all) also drops duplicate-phrase negatives.
        """
        b = slots.shape[0]
        dedup = self.cfg.loss.drop_duplicate_negatives or self.cfg.loss.drop_entailed_negatives
        entailed = self.cfg.loss.drop_entailed_negatives
        image_texts = _texts_per_image(batch, b) if dedup else []
        if not (self.cfg.loss.gather_negatives and distributed.get_world_size() > 1):
            excluded = duplicate_phrase_mask(batch["texts"], image_texts, entailed).to(slots.device) if dedup else None
            return slots, 0, excluded
        sizes = [int(s) for s in distributed.all_gather_object(b)]
        padded_b = max(sizes)
        padded = torch.cat([slots, slots.new_zeros(padded_b - b, *slots.shape[1:])]) if padded_b > b else slots
        gathered, _ = distributed.all_gather_with_grad(padded)
        offset = distributed.get_rank() * padded_b
        valid = torch.zeros(len(sizes) * padded_b, dtype=torch.bool)
        for rank, size in enumerate(sizes):
            valid[rank * padded_b : rank * padded_b + size] = True
        excluded = ~valid.expand(len(batch["texts"]), -1)  # (T, B_all)
        if dedup:
            all_texts: list[list[str]] = []
            for rank_texts in distributed.all_gather_object(image_texts):
                all_texts += list(rank_texts) + [[]] * (padded_b - len(rank_texts))
            excluded = excluded | duplicate_phrase_mask(batch["texts"], all_texts, entailed)
        return gathered, offset, excluded.to(slots.device)

    # ---- inference -----------------------------------------------------------------------------

    @torch.no_grad()
    def infer(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Response maps: maps (T, h, w) = Σ_k w[t,k]·A[img(t),k] on the token grid, slot_maps (B, K, h, w), weights (T, K).

        With `refine_iterations` and images in the batch, maps are refined at the input size instead
        (T, H_in, W_in): upsampled, normalised and sharpened along the picture's edges (sgmodel/refine.py).

        Runs in eval mode with the fixed slot noise, so a phrase's map does not depend on the batch it
        came in or on the call: evaluation is reproducible.
        """
        was_training = self.training
        self.eval()
        try:
            tokens = self.image_tokens(batch)  # (B, N, C)
            grid = self.token_grid(batch, tokens.shape[1])
            slots, attn = self.shatter(tokens, grid, deterministic=True)  # (B, K, d), (B, K, N)
            text = self.text_embedding(batch)  # (T, d)
            index = batch["text_image_index"].to(text.device)
            geometry = slot_geometry(attn, grid) if self.gather.geometry is not None else None
            _, weights = self.gather(text, slots, text_image_index=index, return_weights=True, geometry=geometry)  # (T, K)
        finally:
            self.train(was_training)
        slot_maps = attn.float().view(attn.shape[0], attn.shape[1], *grid)  # (B, K, h, w)
        maps = combine_slot_maps(weights.float(), slot_maps, index)  # (T, h, w)
        if self.cfg.inference.refine_iterations > 0 and "images" in batch:
            maps = refine_maps(maps, batch["images"], index, self.cfg.inference.refine_iterations)  # (T, H_in, W_in)
        return {"maps": maps, "slot_maps": slot_maps, "weights": weights.float()}

    # ---- optimiser -----------------------------------------------------------------------------

    def param_groups(self) -> list[dict]:
        """AdamW groups: encoders at backbone_lr_scale × lr; no weight decay on biases, norms,
        embeddings, the slot Gaussians and the temperature. Frozen parameters are left out."""
        encoder_ids = {id(p) for enc in (self.image_encoder, self.text_encoder) for p in enc.parameters()}
        no_decay_ids = set()
        for module_name, module in self.named_modules():
            for name, p in module.named_parameters(recurse=False):
                full = f"{module_name}.{name}" if module_name else name
                if (
                    p.ndim <= 1
                    or isinstance(module, NO_DECAY_MODULES)
                    or "embedding" in full
                    or full.endswith(("cls_token", "mask_token"))
                    or name in NO_DECAY_NAMES
                ):
                    no_decay_ids.add(id(p))
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for p in self.parameters():
            if p.requires_grad:
                groups.setdefault((id(p) in encoder_ids, id(p) in no_decay_ids), []).append(p)
        out = []
        for (is_encoder, no_decay), params in sorted(groups.items()):
            scale = self.cfg.optim.backbone_lr_scale if is_encoder else 1.0
            out.append(
                {
                    "name": f"{'encoders' if is_encoder else 'head'}{'_no_decay' if no_decay else ''}",
                    "params": params,
                    "lr": self.cfg.optim.lr * scale,
                    "lr_scale": scale,
                    "weight_decay": 0.0 if no_decay else self.cfg.optim.weight_decay,
                }
            )
        return out


def _texts_per_image(batch: dict, num_images: int) -> list[list[str]]:
    """The phrases of each image in this batch."""
    out: list[list[str]] = [[] for _ in range(num_images)]
    for text, image in zip(batch["texts"], batch["text_image_index"].tolist()):
        out[image].append(text)
    return out
