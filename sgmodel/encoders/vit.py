"""ViT image encoder (transformers ViTModel): patches -> a token grid, the class token dropped."""

from __future__ import annotations

import torch

from sgdata.format.errors import UserError
from sgmodel.config import ImageEncoderConfig
from sgmodel.encoders.base import ImageEncoder, kaiming_init, seeded
from sgmodel.encoders.weights import describe_weights, load_transformers_folder

class ViTImageEncoder(ImageEncoder):
    """transformers ViTModel; the class token is dropped, position embeddings interpolated when needed.

    Random weights (no `image_encoder_path`) come from `seed` alone.
    """

    def __init__(self, cfg: ImageEncoderConfig, seed: int = 0):
        super().__init__(cfg.freeze_image_encoder)
        from transformers import ViTConfig, ViTModel

        self.image_size = tuple(cfg.image_size)
        if cfg.image_encoder_path:
            self.vit, path = load_transformers_folder(ViTModel, cfg.image_encoder_path, "image encoder", add_pooling_layer=False)
            self.weights = describe_weights(path, cfg.image_encoder_path)
        else:
            config = ViTConfig(
                hidden_size=cfg.vit_hidden,
                num_hidden_layers=cfg.vit_layers,
                num_attention_heads=cfg.vit_heads,
                intermediate_size=4 * cfg.vit_hidden,
                image_size=self.image_size,
                patch_size=cfg.vit_patch,
            )
            with seeded(seed):
                self.vit = ViTModel(config, add_pooling_layer=False)
                kaiming_init(self.vit.embeddings.patch_embeddings)  # the conv stem
            self.weights = (
                f"random(seed={seed},hidden={cfg.vit_hidden},layers={cfg.vit_layers},heads={cfg.vit_heads},"
                f"patch={cfg.vit_patch})"
            )
        self.patch = _pair(self.vit.config.patch_size)
        self.trained_size = _pair(self.vit.config.image_size)
        self.out_dim = self.vit.config.hidden_size
        self.freeze_if_configured()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        size = tuple(images.shape[-2:])
        interpolate = size != self.trained_size
        if interpolate and self.trained_size[0] != self.trained_size[1]:
            raise UserError(
                f"this ViT was built for {self.trained_size[0]}x{self.trained_size[1]} images and cannot take "
                f"{size[0]}x{size[1]}; resize the images to its size"
            )
        hidden = self.vit(pixel_values=images, interpolate_pos_encoding=interpolate).last_hidden_state
        return hidden[:, 1:]  # (B, N, C): class token dropped

    def grid_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        return image_size[0] // self.patch[0], image_size[1] // self.patch[1]

    def identity(self) -> str:
        return f"vit|{self.weights}|block=last|size={self.image_size[0]}x{self.image_size[1]}"


def _pair(value) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (tuple, list)) else (int(value), int(value))

