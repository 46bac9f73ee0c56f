"""Image and text encoders behind one small interface, plus the tokenizer.

The image encoder turns normalised images into a token grid (B, N, C); the text encoder turns
tokenised phrases into one vector each (T, Ct). Both come either from local pretrained weights (a
folder or file given by path, or a "package:..." spec naming weights shipped by the demo extra) or
from a random config seeded by the run's seed. Each is built from its own config section
(`ImageEncoderConfig`, `TextEncoderConfig`), no training config needed.

    weights.py       where weights come from (paths, packages), offline loading
    base.py          freezing, pixel normalisation, seeded random init
    vit.py           ViT (transformers ViTModel)
    efficientnet.py  EfficientNet-Lite cut after one block; BatchNorm folded for inference
    text.py          BERT-like text encoder, tokenizer, tokenize()
"""

from __future__ import annotations

from sgmodel.config import ImageEncoderConfig
from sgmodel.encoders.base import ImageEncoder, normalize_pixels
from sgmodel.encoders.text import TextEncoder, build_text_encoder, build_tokenizer, tokenize
from sgmodel.encoders.weights import resolve_package_path, resolve_weights_path


def build_image_encoder(cfg: ImageEncoderConfig, seed: int = 0) -> ImageEncoder:
    """The image encoder `cfg.image_encoder` names; random weights come from `seed`."""
    if cfg.image_encoder == "efficientnet_lite":
        from sgmodel.encoders.efficientnet import EfficientNetLiteImageEncoder

        return EfficientNetLiteImageEncoder(cfg, seed)
    from sgmodel.encoders.vit import ViTImageEncoder

    return ViTImageEncoder(cfg, seed)


__all__ = [
    "ImageEncoder",
    "TextEncoder",
    "build_image_encoder",
    "build_text_encoder",
    "build_tokenizer",
    "normalize_pixels",
    "tokenize",
    "resolve_package_path",
    "resolve_weights_path",
]
