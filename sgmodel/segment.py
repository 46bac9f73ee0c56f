"""Segment phrases in images with a loaded checkpoint: the one inference path of predict, the page and their tests.

`Segmenter.segment(images, phrases)` answers every phrase for every image and returns, per image,
what the page shows and what predict writes: the binary masks at the image's size, the response
maps, each slot's attention map and the gather weights (how much each phrase drew from each slot).

Why a class with a memory: on a CPU the image encoder is most of the cost of an answer, and the page
asks phrase after phrase about the same picture. The encoder is frozen at inference, so its tokens
for a given picture never change; the last few pictures' tokens are kept (keyed by a digest of the
pixels) and a new phrase about one of them runs only the text encoder and the small shatter/gather
head. Reusing tokens changes no number: they are exactly what the encoder gave the first time.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from sgdata.format.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class Segmentation:
    """What the model says about one image and its phrases."""

    texts: list[str]
    masks: list[np.ndarray]  # one bool (H, W) per phrase, at the image's own size
    maps: torch.Tensor  # (T, h, w) response maps on the token grid: Σ_k weights[t, k] · slot_maps[k]
    slot_maps: torch.Tensor  # (K, h, w) each slot's share of every token (the shatter step's attention)
    weights: torch.Tensor  # (T, K) gather weights: how much each phrase took from each slot


def read_image(path: str | Path, max_pixels: int | None = None, name: str | None = None) -> Image.Image:
    """An upright RGB image, or a one-sentence UserError (`name` stands for the path in the message).

    `max_pixels` refuses pictures larger than that before their pixels are decoded: masks are made at
    the image's own size, so a 100-megapixel upload would cost gigabytes per phrase.
    """
    label = name or f"image {path}"
    try:
        with Image.open(path) as image:
            pixels = image.width * image.height
            if max_pixels is not None and pixels > max_pixels:
                raise UserError(f"{label} is {image.width}x{image.height} pixels ({pixels / 1e6:.0f} megapixels), "
                                f"more than the {max_pixels / 1e6:.0f} megapixels accepted here; downscale it first")
            image = ImageOps.exif_transpose(image)
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"{label} does not exist") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"{label} cannot be read as an image ({type(exc).__name__})") from None


def clean_phrases(texts: Sequence[str]) -> list[str]:
    """The phrases without surrounding spaces; an empty list or an empty phrase is a UserError."""
    cleaned = [str(t).strip() for t in texts]
    if not cleaned:
        raise UserError("type at least one phrase")
    if not all(cleaned):
        raise UserError("every phrase must hold some words (an empty phrase was given)")
    return cleaned


def mask_image(mask: np.ndarray) -> Image.Image:
    """A bool (H, W) mask as the 8-bit PNG-ready picture both predict and the page hand out (0 or 255)."""
    return Image.fromarray(mask.astype(np.uint8) * 255, mode="L")


def _digest(image: Image.Image) -> str:
    return hashlib.sha1(f"{image.size}{image.mode}".encode() + image.tobytes()).hexdigest()


class Segmenter:
    """A trained model ready to segment phrases, remembering the image tokens of its last few pictures."""

    def __init__(self, model: torch.nn.Module, cfg, device: torch.device | str = "cpu", remembered_images: int = 8):
        from sgmodel.encoders import build_tokenizer

        self.model = model.eval()
        self.device = torch.device(device)
        self.image_size = tuple(cfg.image.image_size)  # (height, width) the encoder sees
        self.max_text_length = cfg.text.max_text_length
        self.tokenizer = build_tokenizer(cfg.text)
        self.remembered_images = remembered_images
        self._tokens: OrderedDict[str, torch.Tensor] = OrderedDict()  # digest -> raw encoder tokens (N, C)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, device: str = "auto") -> "Segmenter":
        from sgmodel.checkpoint import model_from_checkpoint
        from sgmodel.evaluate import pick_device

        dev = pick_device(device)
        model, cfg, _ = model_from_checkpoint(checkpoint, dev)
        return cls(model, cfg, dev)

    @torch.no_grad()
    def image_tokens(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, int]:
        """Raw encoder tokens (B, N, C) of the images, and how many of them were remembered from before.

        The images not remembered go through the encoder together, as one batch.
        """
        from sgmodel.data import image_to_tensor

        keys = [_digest(image) for image in images]
        missing = [i for i, key in enumerate(keys) if key not in self._tokens]
        fresh = {}
        if missing:
            pixels = torch.stack([image_to_tensor(images[i], self.image_size) for i in missing]).to(self.device)  # (M, 3, H, W)
            for i, tokens in zip(missing, self.model.image_encoder(pixels)):  # (N, C) each
                fresh[keys[i]] = tokens
        tokens = torch.stack([fresh[key] if key in fresh else self._tokens[key] for key in keys])  # (B, N, C)
        for key in keys:
            self._tokens[key] = fresh.get(key, self._tokens.get(key))
            self._tokens.move_to_end(key)
        while len(self._tokens) > self.remembered_images:
            self._tokens.popitem(last=False)
        return tokens, len(images) - len(missing)

    @torch.no_grad()
    def segment(self, images: Sequence[Image.Image], texts: Sequence[str]) -> list[Segmentation]:
        """Every phrase answered for every image, in one forward pass over all of them."""
        from sgmodel.encoders import tokenize
        from sgmodel.inference import predict_masks

        texts = clean_phrases(texts)
        if not images:
            return []
        from sgmodel.data import image_to_tensor

        tokens, _ = self.image_tokens(images)  # (B, N, C)
        input_ids, attention_mask = tokenize(self.tokenizer, texts, self.max_text_length)  # (P, L) each
        count, phrases = len(images), len(texts)
        batch = {
            "image_tokens": tokens,
            # the pixels at the input size as well: the prediction rule's refinement step reads them
            "images": torch.stack([image_to_tensor(image, self.image_size) for image in images]).to(self.device),
            "input_ids": input_ids.repeat(count, 1).to(self.device),  # (B·P, L): image b's phrases at b·P...
            "attention_mask": attention_mask.repeat(count, 1).to(self.device),
            "text_image_index": torch.arange(count, device=self.device).repeat_interleave(phrases),  # (B·P,)
            "texts": texts * count,
            "keys": [f"image-{b}" for b in range(count)],
        }
        out = self.model.infer(batch)
        maps, slot_maps, weights = out["maps"].float().cpu(), out["slot_maps"].float().cpu(), out["weights"].float().cpu()
        sizes = [(image.height, image.width) for image in images for _ in texts]
        masks = [m.numpy() for m in predict_masks(maps, sizes)]
        results = []
        for b in range(count):
            own = slice(b * phrases, (b + 1) * phrases)
            results.append(Segmentation(texts=list(texts), masks=masks[own], maps=maps[own], slot_maps=slot_maps[b], weights=weights[own]))
        return results
