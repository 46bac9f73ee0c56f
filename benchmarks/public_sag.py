"""The public Shatter-and-Gather implementation, built from a local checkout for the GPU step benchmark.

Nothing of the public code ships here: `--public-sag DIR` names a checkout of github.com/kdwonn/SaG
(the figures in docs/benchmarks.md name the commit). Its own modules build the model, its own loss
computes the contrastive term, and its own argument parser reads the published recipe
(train_eval_unc.sh: ViT-S/16 at 384 px, BERT-base, 36 slots in 18 groups, 6 iterations, d = 512, fp16
autocast with a GradScaler, clip 0.1, AdamW). The step below is the body of its training loop
(train_cma_recon.py) with the logging left out.

The shims, the fewest that let it build with no network (each replaces a name in its module):
- `BertModel.from_pretrained('bert-base-uncased')` (a hub download) -> a BertModel with random
  weights built from BertConfig(), whose defaults are bert-base-uncased's architecture;
- timm's `load_custom_pretrained` (downloads ViT weights) -> does nothing: random weights, as
  sgmodel's side of the benchmark has;
- timm's `default_cfgs` -> an empty dict, so the code takes its own branch for configurations timm
  does not list (newer timm keys them by tagged names and makes them read-only).
Its code needs what the checkout's README lists (timm, einops, torchvision, transformers, pyyaml).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types
from pathlib import Path
from typing import Any

import torch

# train_eval_unc.sh, the training command of the published RefCOCO run (data, logging and evaluation flags dropped)
PUBLISHED_FLAGS = (
    "--data_name coco --img_num_embeds 36 --txt_num_embeds 1 --img_finetune --txt_finetune --batch_size 32 "
    "--warm_epoch 0 --num_epochs 50 --optimizer adamw --lr_scheduler cosine --warm_img --agg_pos_enc sine --lr 1e-5 "
    "--txt_lr_scale 1 --img_spm_lr_scale 1 --img_lr_scale 0.1 --amp --agg_activation gelu --agg_query_self_attns 0 "
    "--agg_latent_head 4 --agg_latent_dim 128 --agg_ff_mult 4 --agg_last_fc --agg_last_ln --agg_pre_norm "
    "--agg_cross_head 4 --agg_cross_dim 256 --agg_depth 6 --agg_weight_sharing --agg_input_dim 512 "
    "--agg_query_dim 512 --embed_dim 512 --agg_self_per_cross_attn 1 --recon_weight 1 --agg_query_type entity "
    "--cascade_factor 3 --agg_cross_attn_type slot --grad_clip 0.1 --dropout 0.1 --txt_pooling cls "
    "--weight_decay 1e-4 --crop_size 384 --cma_heads 4 --cma_head_dim 256 --cma_criterion info_nce "
    "--cma_detach_target --seed 1 --num_layers 12 --agg_var_scaling 1 --decoder_normalizer softmax --no_wandb"
).split()

MODULES = ("option", "model.encoders", "model.cross_modal_attention", "loss.cma_loss")


def import_checkout(root: str | Path) -> dict[str, types.ModuleType]:
    """The public code's modules, imported from `root` (which must hold its option.py and model/)."""
    root = Path(root).resolve()
    if not (root / "option.py").is_file() or not (root / "model" / "cross_modal_attention.py").is_file():
        raise FileNotFoundError(f"{root} is not a checkout of the public Shatter-and-Gather code (no option.py or model/)")
    sys.path.insert(0, str(root))
    return {name: importlib.import_module(name) for name in MODULES}


def random_bert_standin(bert_config: dict[str, Any] | None = None):
    """Stands in for transformers.BertModel where the public code calls from_pretrained: random weights, no hub."""
    from transformers import BertConfig, BertModel

    def from_pretrained(name: str, *args, **kwargs):
        return BertModel(BertConfig(**(bert_config or {})))  # BertConfig() is bert-base-uncased's shape

    return types.SimpleNamespace(from_pretrained=from_pretrained)


def apply_shims(modules: dict[str, types.ModuleType], bert_config: dict[str, Any] | None = None) -> None:
    encoders = modules["model.encoders"]
    encoders.BertModel = random_bert_standin(bert_config)
    encoders.load_custom_pretrained = lambda *args, **kwargs: None
    encoders.default_cfgs = {}


class PublicSide:
    """The public model, loss, optimizer and fp16 scaler on `device`, and its training step."""

    def __init__(self, checkout: str | Path, device: torch.device, extra_flags: list[str] | None = None,
                 bert_config: dict[str, Any] | None = None):
        modules = import_checkout(checkout)
        apply_shims(modules, bert_config)
        option = modules["option"]
        args = option.verify_input_args(option.parser.parse_args(PUBLISHED_FLAGS + list(extra_flags or [])))
        self.args, self.device = args, device
        encoders = modules["model.encoders"].ImageTextEncodersRecon(args)
        self.model = modules["model.cross_modal_attention"].CrossModalAttentionRecon(encoders, args.embed_dim, args).to(device)
        self.model.train()
        torch.backends.cudnn.benchmark = True  # as its main() sets
        self.criterion = modules["loss.cma_loss"].CMA_Loss(
            margin=args.margin, criterion=args.cma_criterion, mining=args.cma_mining, detach_target=args.cma_detach_target,
            detach_img_target=args.cma_detach_img_target, i_t_loss=None, i_t_weight=args.i_t_weight,
            temperature=args.info_temperature, cm_i_weight=args.cm_i_weight, size_p_loss=None,
            size_p_weight=args.size_p_weight,
        )
        m = self.model
        img = m.encoders.img_enc
        groups = [  # its five parameter groups, learning-rate scales as its main() builds them
            {"params": m.cma.parameters(), "lr": args.lr},
            {"params": m.decoder.parameters(), "lr": args.lr},
            {"params": list(set(img.parameters()).difference(set(img.img_backbone.parameters()))), "lr": args.lr * args.img_spm_lr_scale},
            {"params": img.img_backbone.parameters(), "lr": args.lr * args.img_lr_scale},
            {"params": list(set(m.encoders.txt_enc.parameters())), "lr": args.lr * args.txt_lr_scale},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=100000)
        amp = bool(args.amp) and device.type == "cuda"
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp)
        self.autocast = torch.autocast("cuda", dtype=torch.float16) if amp else contextlib.nullcontext()

    def batch(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple:
        """Its input from the shared random batch: float images normalised with mean = std = 0.5 (its
        transform), token ids with 0 as padding, and the phrase lengths."""
        pixels = images.float().div(127.5).sub(1.0) if images.dtype == torch.uint8 else images.float()
        ids = input_ids * attention_mask
        return pixels.to(self.device), ids.to(self.device), attention_mask.sum(1).to(self.device)

    def forward_loss(self, batch: tuple) -> torch.Tensor:
        img, txt, txt_len = batch
        with self.autocast:
            cm_feat, img_emb, txt_emb, img_feat_recon, img_feat, txt_bert = self.model(img, txt, txt_len)
            loss, _ = self.criterion(cm_feat, txt_emb, img_emb, txt_bert=txt_bert)
            loss = loss + self.args.recon_weight * torch.nn.functional.mse_loss(img_feat_recon, img_feat.detach())
        return loss

    def step(self, batch: tuple) -> torch.Tensor:
        loss = self.forward_loss(batch)
        if torch.isnan(loss).any():  # its loop checks every step (a host sync, kept: it is part of its step)
            raise RuntimeError("the public code's loss is NaN")
        self.optimizer.zero_grad()
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach()
