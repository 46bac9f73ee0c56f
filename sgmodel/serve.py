"""A page for looking at a checkpoint: upload or pick a picture, type phrases, see the masks and why.

    sgmodel serve --checkpoint runs/quickstart/run/checkpoint.pt        (then open http://127.0.0.1:7860)

Per phrase the page shows the mask over the picture; below, every slot's attention map captioned with
the gather weight each phrase gave it (the response map is the weighted sum of these maps), the
weights as a table, and the mask PNGs to download (the same files `sgmodel predict` writes).

The answers come from `sgmodel.segment.Segmenter`, the code `sgmodel predict` runs, so the page and
the command give the same masks; the Segmenter keeps the frozen encoder's tokens of recent pictures,
so further phrases about a picture take only the small head. Bad input (a file that is not an image,
no phrase, a picture over MAX_PIXELS) comes back as a message on the page. The server listens on
127.0.0.1 unless the user asks for another address. Gradio is an optional dependency: `pip install
-e '.[app]'`.
"""

from __future__ import annotations

import html
import json
import os
import pickle
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sgdata.format import UserError, write_text_atomic
from sgmodel.segment import Segmentation, Segmenter, mask_image, read_image

MAX_PIXELS = 40_000_000  # masks are made at the picture's size: larger uploads are refused, not resized
MAX_PHRASES = 16
DISPLAY_SIDE = 1024  # overlays are shown at most this many pixels wide or high
SLOT_TILE_WIDTH = 256
EXAMPLE_SEED = 1  # the quickstart's held-out seed: scenes its model never trained on
EXAMPLE_COUNT = 4
KEPT_ANSWERS = 64  # answer folders (mask PNGs) kept for download; older ones are deleted


def make_examples(folder: Path, count: int = EXAMPLE_COUNT) -> list[tuple[str, str]]:
    """(JPEG path, two phrases) for the first `count` scenes of the synthetic set with seed EXAMPLE_SEED.

    The pictures are written by `sgdata synth` itself (run as a command: sgmodel imports nothing of
    sgdata but its data contract, see docs/architecture.md), once, into `folder`; each comes with the
    first phrase of its first two objects, read from the refer-layout files the command writes.
    """
    folder.mkdir(parents=True, exist_ok=True)
    listing = folder / f"synthetic-{EXAMPLE_SEED}-{count}.json"
    if not listing.is_file() or not all(Path(path).is_file() for path, _ in json.loads(listing.read_text())):
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            made = subprocess.run([sys.executable, "-m", "sgdata", "synth", scratch, "--images", str(count),
                                   "--seed", str(EXAMPLE_SEED)], capture_output=True, text=True)
            if made.returncode != 0:
                raise UserError(f"the example scenes could not be drawn: {made.stderr.strip().splitlines()[-1:]}")
            refs = pickle.loads((Path(scratch) / "synthref" / "refs(unc).p").read_bytes())  # the refer layout
            phrases: dict[int, list[str]] = {}
            for ref in sorted(refs, key=lambda r: r["ann_id"]):  # objects in the order they were drawn
                phrases.setdefault(ref["image_id"], []).append(ref["sentences"][0]["raw"])
            examples = []
            for image_id in range(1, count + 1):
                path = folder / f"synthetic-{EXAMPLE_SEED}-{image_id}.jpg"
                os.replace(Path(scratch) / "images" / f"synthref_{image_id:06d}.jpg", path)
                examples.append((str(path), "\n".join(phrases[image_id][:2])))
        write_text_atomic(listing, json.dumps(examples))
    return [(path, text) for path, text in json.loads(listing.read_text())]


def parse_phrases(text: str | None) -> list[str]:
    """One phrase per line; blank lines are ignored. No phrase at all is a UserError."""
    phrases = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not phrases:
        raise UserError("Type at least one phrase (one per line), e.g. 'the red circle'.")
    return phrases


def _display(image: Image.Image) -> Image.Image:
    image = image.copy()
    image.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE))
    return image


def phrase_overlays(image: Image.Image, result: Segmentation) -> list[tuple[Image.Image, str]]:
    """Per phrase: the picture with its mask tinted, captioned with the phrase and the share it covers."""
    from sgdata.format.drawing import color_for, overlay_mask

    return [(_display(overlay_mask(image, mask, color_for(i), alpha=0.5)), f"{text} ({mask.mean():.1%} of the image)")
            for i, (text, mask) in enumerate(zip(result.texts, result.masks))]


def _unit_range(maps: torch.Tensor) -> torch.Tensor:
    """Each map of (K, h, w) stretched to [0, 1] for colouring; a flat map is all zeros.

    Only for the heat maps' colours: the masks come from inference's cut, which never normalises.
    """
    flat = maps.float().flatten(1)  # (K, h*w)
    low, high = torch.aminmax(flat, dim=1, keepdim=True)  # (K, 1) each
    span = high - low
    return torch.where(span > 0, (flat - low) / span.clamp(min=torch.finfo(flat.dtype).tiny), 0.0).view_as(maps)


def slot_tiles(image: Image.Image, result: Segmentation) -> list[tuple[Image.Image, str]]:
    """Each slot's attention over the picture as a heat map, most-weighted slot first, captioned with
    the gather weight every phrase gave it."""
    import matplotlib

    from sgmodel.inference import upsample_group

    height = max(1, round(SLOT_TILE_WIDTH * image.height / image.width))
    base = np.asarray(image.resize((SLOT_TILE_WIDTH, height), Image.Resampling.BILINEAR), dtype=np.float32)  # (h, w, 3)
    heat = _unit_range(upsample_group(result.slot_maps, (height, SLOT_TILE_WIDTH))).numpy()  # (K, h, w) in [0, 1]
    colours = matplotlib.colormaps["magma"](heat)[..., :3] * 255  # (K, h, w, 3)
    order = result.weights.max(dim=0).values.argsort(descending=True).tolist()  # slots by their largest weight
    tiles = []
    for k in order:
        blended = np.clip(0.35 * base + 0.65 * colours[k], 0, 255).astype(np.uint8)
        weights = ", ".join(f"{text}: {float(w):.2f}" for text, w in zip(result.texts, result.weights[:, k]))
        tiles.append((Image.fromarray(blended), f"slot {k} — {weights}"))
    return tiles


def weight_table(result: Segmentation) -> dict[str, Any]:
    """The (phrase x slot) gather weights for a gr.Dataframe."""
    slots = result.weights.shape[1]
    rows = [[text] + [round(float(w), 3) for w in row] for text, row in zip(result.texts, result.weights)]
    return {"headers": ["phrase"] + [f"slot {k}" for k in range(slots)], "data": rows}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "phrase"


class Answerer:
    """The page's one action: picture + phrases -> overlays, slot maps, weights, mask files, a status line.

    Bad input raises UserError with a sentence for the page; `build_page` shows it as a gr.Error.
    Answers run one at a time (the Segmenter's memory of recent pictures is not shared between threads).
    """

    def __init__(self, segmenter: Segmenter, workdir: Path):
        self.segmenter = segmenter
        self.workdir = workdir
        self.count = 0
        self.lock = threading.Lock()

    def __call__(self, upload: Any, text: str | None) -> tuple[list, list, dict, list[str], str, list[str]]:
        """Returns (overlays, slot tiles, weight table, mask PNG paths, status, warnings for the page)."""
        path = upload.get("path") if isinstance(upload, dict) else upload
        if not path:
            raise UserError("Upload an image or pick one of the examples first.")
        phrases = parse_phrases(text)
        warnings = []
        if len(phrases) > MAX_PHRASES:
            warnings.append(f"Only the first {MAX_PHRASES} of {len(phrases)} phrases are answered.")
            phrases = phrases[:MAX_PHRASES]
        image = read_image(path, MAX_PIXELS, name="the uploaded file")
        with self.lock:
            start = time.perf_counter()
            result = self.segmenter.segment([image], phrases)[0]
            seconds = time.perf_counter() - start
            self.count += 1
            folder = self.workdir / f"answer-{self.count:06d}"
            stale = self.workdir / f"answer-{self.count - KEPT_ANSWERS:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for i, (phrase, mask) in enumerate(zip(result.texts, result.masks)):
            file = folder / f"mask-{i}-{_slug(phrase)}.png"
            mask_image(mask).save(file)
            files.append(str(file))
        if stale.is_dir():
            for old in stale.iterdir():
                old.unlink()
            stale.rmdir()
        status = (f"{len(phrases)} phrase(s) on a {image.width}x{image.height} picture in {seconds:.2f} s "
                  f"({self.segmenter.device.type}); {result.weights.shape[1]} slots.")
        return phrase_overlays(image, result), slot_tiles(image, result), weight_table(result), files, status, warnings


def build_page(answer: Answerer, examples: list[tuple[str, str]]):
    """The gradio Blocks of the page."""
    import gradio as gr

    def on_segment(upload, text):
        try:
            overlays, tiles, table, files, status, warnings = answer(upload, text)
        except UserError as exc:
            # the message is shown as HTML; print_exception=False: a user's mistake is no server traceback
            raise gr.Error(html.escape(str(exc)), print_exception=False) from None
        for message in warnings:
            gr.Warning(message)
        return overlays, tiles, table, files, status

    with gr.Blocks(title="Shatter and Gather", analytics_enabled=False) as page:
        gr.Markdown("## Shatter and Gather: referring segmentation\nUpload a picture or pick an example, "
                    "type what to find (one phrase per line) and press **Segment** (or Shift+Enter).")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(label="Picture", type="filepath", image_mode=None, format="png",
                                 sources=["upload", "clipboard"], elem_id="picture")
                phrases = gr.Textbox(label="Phrases (one per line)", lines=3, placeholder="the red circle\nthe leftmost object",
                                     elem_id="phrases")
                button = gr.Button("Segment", variant="primary", elem_id="segment")
                gr.Examples(examples=[list(e) for e in examples], inputs=[image, phrases], label="Examples (synthetic scenes)")
                status = gr.Markdown(elem_id="status")
            with gr.Column(scale=2):
                overlays = gr.Gallery(label="Mask per phrase", columns=2, height="auto", elem_id="overlays", format="png")
                files = gr.File(label="Mask PNGs", file_count="multiple", elem_id="masks")
        gr.Markdown("### What the model attended to\nEach slot's attention map (brighter: the slot holds more of "
                    "that place), strongest first; the captions give the gather weight each phrase put on the slot. "
                    "A phrase's response map is the weighted sum of the slot maps.")
        slots = gr.Gallery(label="Slot maps", columns=4, height="auto", elem_id="slots", format="png")
        weights = gr.Dataframe(label="Gather weights (phrase x slot)", elem_id="weights", interactive=False)
        # preprocess=False: the upload reaches Answerer as the file gradio stored, so an unreadable or
        # oversized file is answered with our sentence instead of failing inside gradio's decoder
        button.click(on_segment, inputs=[image, phrases], outputs=[overlays, slots, weights, files, status], preprocess=False)
        phrases.submit(on_segment, inputs=[image, phrases], outputs=[overlays, slots, weights, files, status], preprocess=False)
    return page


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 7860, examples_dir: Path | None = None,
          device: str = "auto") -> None:
    """Load the checkpoint, make the examples, and serve the page until interrupted."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local tool
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError("the page needs gradio: pip install -e '.[app]'") from None
    if not 0 < port < 65536:
        raise UserError(f"--port must be between 1 and 65535 (got {port})")
    segmenter = Segmenter.from_checkpoint(checkpoint, device)
    examples = make_examples(Path(examples_dir) if examples_dir else Path.home() / ".cache" / "sgmodel" / "examples")
    with tempfile.TemporaryDirectory(prefix="sgmodel-serve-") as workdir:
        page = build_page(Answerer(segmenter, Path(workdir)), examples)
        try:
            page.queue(default_concurrency_limit=1).launch(server_name=host, server_port=port, show_error=False,
                                                            footer_links=[])
        except OSError as exc:  # the port is taken, or the address is not this machine's
            raise UserError(f"cannot listen on {host}:{port} ({exc})") from None
