"""The `sgmodel` command: its four subcommands, and predict over several images and phrases."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from sgmodel.cli import main as sgmodel_main

ROOT = Path(__file__).resolve().parents[2]


def test_help_lists_the_four_commands_and_each_has_help(capsys):
    assert sgmodel_main(["--help"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in ("train", "evaluate", "predict", "serve"))
    for name in ("predict", "serve"):
        assert sgmodel_main([name, "--help"]) == 0
        assert "--checkpoint" in capsys.readouterr().out
    # train and evaluate hand --help to their modules: train's lists every config field
    assert sgmodel_main(["train", "--help"]) == 0
    assert "--slot-iters" in capsys.readouterr().out
    assert sgmodel_main(["evaluate", "--help"]) == 0
    assert "--save-overlays" in capsys.readouterr().out


def test_python_dash_m_sgmodel_runs_the_same_command():
    done = subprocess.run([sys.executable, "-m", "sgmodel", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "serve" in done.stdout


def _pictures(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"p{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (30 + 7 * i, 41, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_predict_folder_of_images_and_several_phrases(trained, tmp_path, capsys):
    pictures = _pictures(tmp_path / "in", 3)
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (tmp_path / "in" / "notes.txt").write_text("not an image file name: ignored")
    extra = _pictures(tmp_path / "elsewhere", 1)[0]  # also named p0: its outputs get another name
    args = ["predict", "--checkpoint", trained["checkpoint"], "--images", str(tmp_path / "in"), "--image", str(extra),
            "--text", "the red box", "--text", "blue one", "--out", str(tmp_path / "out"), "--batch-size", "2"]
    assert sgmodel_main(args) == 1  # the broken picture is skipped and reported; the rest is written
    err = capsys.readouterr().err
    assert "skipped: image" in err and "broken.jpg cannot be read as an image" in err
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    expected = sorted(f"{stem}-{suffix}.png" for stem in ("p0", "p1", "p2", "p0-2") for suffix in ("0", "1", "overlay"))
    assert written == expected
    for i, picture in enumerate(pictures):
        height, width = Image.open(picture).size[::-1]
        for t, text in enumerate(["the red box", "blue one"]):
            batched = np.asarray(Image.open(tmp_path / "out" / f"p{i}-{t}.png"))
            assert batched.shape == (height, width)
            # the same picture and phrase alone give the same mask (a batch changes no answer)
            assert sgmodel_main(["predict", "--checkpoint", trained["checkpoint"], "--image", str(picture), "--text", text,
                                 "--out", str(tmp_path / "alone.png")]) == 0
            assert (np.asarray(Image.open(tmp_path / "alone.png")) == batched).mean() > 0.999


def test_predict_without_images_or_with_a_missing_one_is_one_sentence(trained, tmp_path, capsys):
    base = ["predict", "--checkpoint", trained["checkpoint"], "--text", "x", "--out", str(tmp_path / "o.png")]
    for extra, message in [([], "give an image"), (["--image", str(tmp_path / "gone.png")], "does not exist"),
                           (["--images", str(tmp_path)], "holds no image files")]:
        assert sgmodel_main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
