"""`sgmodel serve`: the page's answers and messages, and the page itself driven in a real browser.

The browser test starts the server as a user would (`python -m sgmodel serve` on 127.0.0.1), opens it
in Debian's headless chromium through playwright, uploads a picture, types a phrase and checks that
the mask the page hands out is pixel for pixel the one `sgmodel predict` writes for the same inputs.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sgdata.format.errors import UserError
from sgmodel import serve as serve_module
from sgmodel.cli import main as sgmodel_main
from sgmodel.segment import Segmenter

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
# headless, and nothing that reaches out of the machine (updates, sync, QUIC probes)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> list[tuple[str, str]]:
    return serve_module.make_examples(tmp_path_factory.mktemp("examples"))


def test_examples_are_synthetic_scenes_with_their_phrases(examples, tmp_path):
    assert len(examples) == serve_module.EXAMPLE_COUNT
    for path, phrases in examples:
        image = Image.open(path)
        assert image.size == (320, 240) and image.mode == "RGB"
        assert 1 <= len(phrases.splitlines()) <= 2 and all(line.strip() for line in phrases.splitlines())
    again = serve_module.make_examples(tmp_path)  # another folder: the same pictures, drawn from the same seed
    assert [np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))) for (a, _), (b, _) in zip(examples, again)] == [True] * len(examples)
    assert [p for _, p in again] == [p for _, p in examples]


def test_answer_gives_masks_slot_maps_and_weights(trained, examples, tmp_path):
    segmenter = Segmenter.from_checkpoint(trained["checkpoint"], "cpu")
    answer = serve_module.Answerer(segmenter, tmp_path)
    path, _ = examples[0]
    overlays, tiles, table, files, status, warnings = answer({"path": path}, "the red circle\n\n  the blue one  \n")
    assert warnings == [] and "2 phrase(s)" in status
    assert [caption.split(" (")[0] for _, caption in overlays] == ["the red circle", "the blue one"]  # blank lines ignored
    slots = segmenter.model.cfg.slots.slot_groups * segmenter.model.cfg.slots.slots_per_group
    assert len(tiles) == slots and table["headers"] == ["phrase"] + [f"slot {k}" for k in range(slots)]
    weights = np.array([row[1:] for row in table["data"]])
    assert weights.shape == (2, slots) and np.allclose(weights.sum(axis=1), 1.0, atol=0.01)  # a distribution over slots
    # tiles come strongest slot first: the largest weight in each caption never increases from tile to tile
    largest = [max(float(part.rsplit(": ", 1)[1]) for part in caption.split(" — ")[1].split(", ")) for _, caption in tiles]
    assert largest == sorted(largest, reverse=True) and largest[0] == pytest.approx(weights.max(), abs=0.006)
    masks = [np.asarray(Image.open(f)) for f in files]
    direct = segmenter.segment([Image.open(path).convert("RGB")], ["the red circle", "the blue one"])[0]
    assert all(np.array_equal(m, d.astype(np.uint8) * 255) for m, d in zip(masks, direct.masks))
    # the picture's encoder tokens were kept: asking again encodes nothing
    _, remembered = segmenter.image_tokens([Image.open(path).convert("RGB")])
    assert remembered == 1


def test_bad_input_gets_a_sentence_not_a_traceback(trained, examples, tmp_path):
    answer = serve_module.Answerer(Segmenter.from_checkpoint(trained["checkpoint"], "cpu"), tmp_path)
    text_file = tmp_path / "notes.png"
    text_file.write_text("this is not a picture")
    huge = tmp_path / "huge.png"
    Image.new("1", (9000, 5000)).save(huge)  # 45 megapixels, a few kilobytes on disk
    picture = examples[0][0]
    cases = [
        (None, "the red circle", "Upload an image"),
        ({"path": picture}, " \n\n ", "Type at least one phrase"),
        ({"path": str(text_file)}, "the red circle", "cannot be read as an image"),
        ({"path": str(huge)}, "the red circle", "9000x5000 pixels"),
    ]
    for upload, text, message in cases:
        with pytest.raises(UserError, match=message) as caught:
            answer(upload, text)
        assert "\n" not in str(caught.value)
    *_, warnings = answer({"path": picture}, "\n".join(f"phrase {i}" for i in range(serve_module.MAX_PHRASES + 3)))
    assert warnings == [f"Only the first {serve_module.MAX_PHRASES} of {serve_module.MAX_PHRASES + 3} phrases are answered."]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, server: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the server exited with status {server.returncode}: {server.stdout.read()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the page at {url} did not answer within {seconds:.0f} s")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does it)")
def test_the_page_in_a_real_browser_gives_the_mask_predict_writes(trained, examples, tmp_path):
    from playwright.sync_api import sync_playwright

    picture = tmp_path / "scene.png"
    shutil.copy(examples[1][0], picture)
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    server = subprocess.Popen(
        [sys.executable, "-m", "sgmodel", "serve", "--checkpoint", trained["checkpoint"], "--port", str(port),
         "--examples", str(tmp_path / "examples"), "--device", "cpu"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_until_up(url, server)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            page.locator("#picture input[type=file]").set_input_files(str(picture))
            page.locator("#phrases textarea").fill("the orange circle")
            page.locator("#segment").click()
            link = page.locator("#masks a").first
            link.wait_for(timeout=120_000)
            page.locator("#overlays img").first.wait_for(timeout=30_000)
            assert "1 phrase(s) on a 320x240 picture" in page.locator("#status").inner_text()
            assert page.locator("#slots img").count() >= 2
            served = page.request.get(link.get_attribute("href")).body()
            (tmp_path / "served-mask.png").write_bytes(served)
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)

            page.locator("#phrases textarea").fill("   ")  # no phrase: a message on the page, not a traceback
            page.locator("#segment").click()
            page.get_by_text("Type at least one phrase").first.wait_for(timeout=30_000)
            assert "Traceback" not in page.content()
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)

    assert sgmodel_main(["predict", "--checkpoint", trained["checkpoint"], "--image", str(picture),
                         "--text", "the orange circle", "--out", str(tmp_path / "predicted.png")]) == 0
    page_mask = np.asarray(Image.open(tmp_path / "served-mask.png"))
    predicted = np.asarray(Image.open(tmp_path / "predicted.png"))
    assert page_mask.shape == (240, 320) and np.array_equal(page_mask, predicted)
    assert (tmp_path / "page.png").stat().st_size > 10_000
