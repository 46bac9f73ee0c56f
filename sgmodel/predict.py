"""Segment what phrases refer to in one image, with a trained checkpoint.

    python -m sgmodel.predict --checkpoint RUN/checkpoint.pt --image photo.jpg --text "the dog on the left" --out mask.png

Writes a binary mask PNG at the image's size per phrase (one phrase: --out itself; several:
<out stem>-<i><suffix>) and an overlay PNG (<out stem>-overlay.png) showing every phrase's mask.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from sgdata.errors import UserError
from sgmodel.checkpoint import model_from_checkpoint
from sgmodel.data import image_to_tensor
from sgmodel.evaluate import pick_device
from sgmodel.logs import configure_logging

logger = logging.getLogger("sgmodel.predict")  # not __name__: that is "__main__" under python -m


def read_image(path: str) -> Image.Image:
    """An upright RGB image, or a one-sentence UserError."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"image {path} does not exist") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"image {path} cannot be read as an image ({type(exc).__name__})") from None


def mask_paths(out: Path, count: int) -> list[Path]:
    """--out for one phrase; <stem>-<i><suffix> for several (a missing suffix becomes .png)."""
    suffix = out.suffix or ".png"
    return [out.with_suffix(suffix)] if count == 1 else [out.with_name(f"{out.stem}-{i}{suffix}") for i in range(count)]


@torch.no_grad()
def predict(checkpoint: str, image_path: str, texts: list[str], device: str = "auto") -> tuple[Image.Image, list[np.ndarray]]:
    """(the image, one bool mask (H, W) per phrase at the image's size)."""
    from sgmodel.encoders import build_tokenizer, tokenize
    from sgmodel.inference import predict_masks

    texts = [t.strip() for t in texts]
    if not texts or not all(texts):
        raise UserError("every --text must be a non-empty phrase")
    image = read_image(image_path)
    dev = pick_device(device)
    model, cfg, _ = model_from_checkpoint(checkpoint, dev)
    input_ids, attention_mask = tokenize(build_tokenizer(cfg.text), texts, cfg.max_text_length)  # (T, L) each
    batch = {
        "images": image_to_tensor(image, cfg.image_size)[None].to(dev),  # (1, 3, H, W)
        "input_ids": input_ids.to(dev),
        "attention_mask": attention_mask.to(dev),
        "text_image_index": torch.zeros(len(texts), dtype=torch.long, device=dev),  # (T,)
        "texts": texts,
        "keys": [Path(image_path).stem],
    }
    maps = model.infer(batch)["maps"].float().cpu()  # (T, h, w)
    masks = predict_masks(maps, [(image.height, image.width)] * len(texts))
    return image, [m.numpy() for m in masks]


def overlay_all(image: Image.Image, masks: list[np.ndarray], texts: list[str]) -> Image.Image:
    """Every phrase's mask tinted in its own colour, the phrases listed beneath in those colours."""
    from sgdata.render import caption_tile, color_for, overlay_mask

    tinted = image
    for i, mask in enumerate(masks):
        tinted = overlay_mask(tinted, mask, color_for(i), alpha=0.45)
    return caption_tile(tinted, [(text, color_for(i)) for i, text in enumerate(texts)], width=min(768, max(256, image.width)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sgmodel.predict", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint.pt (or its run folder)")
    parser.add_argument("--image", required=True, help="the image file")
    parser.add_argument("--text", action="append", required=True, help="a referring phrase (repeat for several)")
    parser.add_argument("--out", required=True, help="mask PNG (several phrases: <stem>-0.png, <stem>-1.png, ...)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        image, masks = predict(args.checkpoint, args.image, args.text, args.device)
    except UserError as exc:
        logger.error(f"error: {exc}")
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for path, mask in zip(mask_paths(out, len(masks)), masks):
        Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(path)
        written.append(path)
    overlay = out.with_name(f"{out.stem}-overlay.png")
    overlay_all(image, masks, [t.strip() for t in args.text]).save(overlay)
    for path, text, mask in zip(written, args.text, masks):
        logger.info(f"{path}: {text!r} covers {mask.mean():.1%} of the image")
    logger.info(f"overlay: {overlay}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
