"""The source registry: a new source is one new file; the CLI, the API and the workers all find it there.

The toy source below is written to a file of its own and registered the way a real one is (its module
named in `SOURCE_MODULES`); `sgdata build toy` then exists with the toy's declared options, and a build
through it writes shards whose samples come from the toy's own finalize() in the worker path.
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import sys
import tarfile
import textwrap

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import sgdata.cli
from sgdata import api
from sgdata.format import UserError
from sgdata.runner import InProcessRunner
from sgdata.sources import registry

runner = CliRunner()

TOY_SOURCE = '''
"""A toy source: every .png of a folder, its stem as the caption."""
import json
from pathlib import Path

from sgdata.sources.base import Finalized, Option, SampleSpec, SourcePlan


class ToySource:
    name = "toy"
    command = "toy"
    help = "Toy shards: one sample per png, its stem as the text."
    options = (Option("folder", "The folder of pngs.", "path", required=True, argument=True),
               Option("prefix", "Put this before each text.", "text"))
    layout = ()

    def plan(self, *, folder, prefix=None):
        specs = [SampleSpec(key=p.stem, image_path=str(p), record={"text": (prefix or "") + p.stem})
                 for p in sorted(Path(folder).glob("*.png"))]
        return SourcePlan(kind="toy", splits={"train": specs}, card={"source": "toy"})

    @staticmethod
    def finalize(record, image):
        sample = {"text": record["text"], "width": image.width, "height": image.height}
        return Finalized(files={"json": json.dumps(sample).encode()}, texts=[record["text"]], source_id=record["text"])


SOURCE = ToySource()
'''


@pytest.fixture
def toy_registered(tmp_path, monkeypatch):
    """The toy module on the path and in the registry; the CLI rebuilt from the registry (and restored after)."""
    (tmp_path / "toy_source.py").write_text(textwrap.dedent(TOY_SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "SOURCE_MODULES", registry.SOURCE_MODULES + ("toy_source",))
    registry.sources.cache_clear()
    cli = importlib.reload(sgdata.cli)
    yield cli
    monkeypatch.undo()
    registry.sources.cache_clear()
    sys.modules.pop("toy_source", None)
    importlib.reload(sgdata.cli)


def _pngs(folder, names):
    folder.mkdir()
    for index, name in enumerate(names):
        pixels = np.full((12 + index, 16, 3), 40 * index, dtype=np.uint8)  # (H, W, 3)
        Image.fromarray(pixels).save(folder / f"{name}.png")


def test_a_new_source_file_becomes_a_build_command(toy_registered, tmp_path):
    _pngs(tmp_path / "pngs", ["apple", "pear"])
    result = runner.invoke(toy_registered.app, ["build", "--help"])
    assert "toy" in result.output and "Toy shards" in result.output
    result = runner.invoke(toy_registered.app, ["build", "toy", "--help"])
    assert "FOLDER" in result.output and "--prefix" in result.output and "--shard-size" in result.output

    out = tmp_path / "out"
    result = runner.invoke(toy_registered.app, ["build", "toy", str(tmp_path / "pngs"), "--prefix", "a ",
                                                "--out", str(out), "--workers", "0"])
    assert result.exit_code == 0, result.output
    with tarfile.open(out / "train" / "train-000000.tar") as tar:
        samples = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    assert samples == [{"text": "a apple", "width": 16, "height": 12}, {"text": "a pear", "width": 16, "height": 13}]
    record = json.loads((out / ".build.json").read_text())
    assert record["kind"] == "toy"
    assert record["command"] == {"source": "toy", "folder": str((tmp_path / "pngs").resolve()), "prefix": "a "}

    same = api.build("toy", tmp_path / "again", folder=tmp_path / "pngs", prefix="a ", workers=0)
    assert same["splits"]["train"]["samples"] == 2


@pytest.mark.parametrize("command, options, message", [
    ("nope", {}, "there is no source 'nope'; sources: refcoco, captions, phrasecut"),
    ("captions", {"src": "x", "dataset": "refcoco"}, "'dataset' does not apply to sgdata build captions."),
    ("captions", {}, "sgdata build captions needs SRC."),
])
def test_misfit_options_are_one_sentence(tmp_path, command, options, message):
    with pytest.raises(UserError) as caught:
        api.build(command, tmp_path / "out", **options)
    assert str(caught.value).startswith(message.rstrip("."))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", list(registry.commands()))
def test_every_declared_option_is_a_flag_of_its_command(command):
    result = runner.invoke(sgdata.cli.app, ["build", command, "--help"])
    assert result.exit_code == 0, result.output
    for source in registry.commands()[command]:
        for option in source.options:
            assert option.flag in result.output, (command, option.flag)


def test_sgdata_debug_logs_the_traceback_of_a_failed_shard(monkeypatch):
    def broken(task):
        raise RuntimeError(f"task {task} broke")

    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    logger = logging.getLogger("sgdata")
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "level", logger.level)
    for debug, expect_traceback in (("", False), ("1", True)):
        monkeypatch.setenv("SGDATA_DEBUG", debug)
        sgdata.cli.configure_logging()
        failed = InProcessRunner().run([7], broken, lambda task, result: None)
        assert [f.error for f in failed] == ["RuntimeError: task 7 broke"]
        assert ("Traceback" in stream.getvalue()) == expect_traceback
    assert stream.getvalue().startswith("sgdata: shard task 7 failed")
