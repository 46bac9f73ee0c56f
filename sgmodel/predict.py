"""Segment what phrases refer to in images, with a trained checkpoint, and write masks and overlays.

    sgmodel predict --checkpoint RUN/checkpoint.pt --image photo.jpg --text "the dog on the left" --out mask.png
    sgmodel predict --checkpoint RUN/checkpoint.pt --images photos/ --text "the dog" --text "the ball" --out masks/

One image and one phrase: a binary mask PNG at the image's size in --out and an overlay beside it
(<out stem>-overlay.png). More than one image or phrase: --out is a folder holding, per image,
<image stem>-<i>.png for the i-th phrase (in the order of --text) and <image stem>-overlay.png with
every phrase's mask tinted in its own colour. Images go through the model in batches.
`python -m sgmodel.predict` takes the same options.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from sgdata.format.drawing import caption_tile, color_for, overlay_mask
from sgdata.format.errors import UserError
from sgmodel.segment import IMAGE_SUFFIXES, Segmenter, clean_phrases, mask_image, read_image

logger = logging.getLogger("sgmodel.predict")  # not __name__: that is "__main__" under python -m


def predict(checkpoint: str, image_path: str, texts: list[str], device: str = "auto") -> tuple[Image.Image, list[np.ndarray]]:
    """(the image, one bool mask (H, W) per phrase at the image's size)."""
    texts = clean_phrases(texts)
    image = read_image(image_path)
    segmenter = Segmenter.from_checkpoint(checkpoint, device)
    return image, segmenter.segment([image], texts)[0].masks


def overlay_all(image: Image.Image, masks: list[np.ndarray], texts: list[str]) -> Image.Image:
    """Every phrase's mask tinted in its own colour, the phrases listed beneath in those colours."""
    tinted = image
    for i, mask in enumerate(masks):
        tinted = overlay_mask(tinted, mask, color_for(i), alpha=0.45)
    return caption_tile(tinted, [(text, color_for(i)) for i, text in enumerate(texts)], width=min(768, max(256, image.width)))


def image_files(images: Sequence[Path], folder: Path | None) -> list[Path]:
    """The --image files, then the image files of --images (sorted by name); none at all is a UserError."""
    files = [Path(p) for p in images]
    for path in files:
        if not path.is_file():
            raise UserError(f"image {path} does not exist")
    if folder is not None:
        if not folder.is_dir():
            raise UserError(f"--images {folder} is not a folder")
        found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise UserError(f"--images {folder} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        files += found
    if not files:
        raise UserError("give an image: --image FILE (repeatable) or --images FOLDER")
    return files


def output_names(files: Sequence[Path]) -> list[str]:
    """A distinct name per image for its outputs: the file's stem, numbered when two stems clash."""
    names, seen = [], set()
    for path in files:
        name, n = path.stem, 1
        while name in seen:
            n += 1
            name = f"{path.stem}-{n}"
        seen.add(name)
        names.append(name)
    return names


def _batches(files: list[Path], size: int, skipped: list[str]) -> Iterator[list[tuple[int, Image.Image]]]:
    """(index, image) in groups of `size`; an unreadable image is reported in `skipped` and left out."""
    batch = []
    for i, path in enumerate(files):
        try:
            batch.append((i, read_image(path)))
        except UserError as exc:
            skipped.append(str(exc))
            continue
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def predict_files(checkpoint: str, files: list[Path], texts: list[str], out: Path, device: str = "auto", batch_size: int = 8) -> int:
    """Write masks and overlays for every image and phrase; return the exit status (1 if an image was skipped)."""
    from tqdm import tqdm

    texts = clean_phrases(texts)
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    single = len(files) == 1 and len(texts) == 1 and not out.is_dir()
    if len(files) == 1:  # one image: unreadable is fatal, found before the model loads or a folder is made
        read_image(files[0])
    segmenter = Segmenter.from_checkpoint(checkpoint, device)
    (out.parent if single else out).mkdir(parents=True, exist_ok=True)
    names = output_names(files)
    skipped: list[str] = []
    written = 0
    with tqdm(total=len(files), desc="predict", unit="image", disable=len(files) == 1, dynamic_ncols=True) as progress:
        for batch in _batches(files, batch_size, skipped):
            results = segmenter.segment([image for _, image in batch], texts)
            for (i, image), result in zip(batch, results):
                if single:
                    mask_paths = [out.with_suffix(out.suffix or ".png")]
                    overlay = out.with_name(f"{out.stem}-overlay.png")
                else:
                    mask_paths = [out / f"{names[i]}-{t}.png" for t in range(len(texts))]
                    overlay = out / f"{names[i]}-overlay.png"
                for path, mask in zip(mask_paths, result.masks):
                    mask_image(mask).save(path)
                overlay_all(image, result.masks, texts).save(overlay)
                written += 1
                if len(files) == 1:
                    for path, text, mask in zip(mask_paths, texts, result.masks):
                        logger.info(f"{path}: {text!r} covers {mask.mean():.1%} of the image")
                    logger.info(f"overlay: {overlay}")
            progress.update(batch[-1][0] + 1 - progress.n)  # skipped images count as done
        progress.update(len(files) - progress.n)
    for message in skipped:
        logger.warning(f"skipped: {message}")
    if len(files) > 1:
        logger.info(f"{written} image(s) x {len(texts)} phrase(s) -> {out}" + (f"; {len(skipped)} skipped" if skipped else ""))
    return 1 if skipped else 0


def main(argv: list[str] | None = None) -> int:
    """`python -m sgmodel.predict ...` is `sgmodel predict ...`."""
    from sgmodel.cli import main as cli_main

    return cli_main(["predict", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
