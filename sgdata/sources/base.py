"""The records that flow between the build stages.

source (plan)  ->  SampleSpec lists per split  ->  runner: one task per shard  ->  writer:
make_sample(spec) = image bytes + the source's `finalize(record, image)`  ->  tar + per-shard record.

Everything here is plain data so it pickles cheaply into Ray tasks: a spec carries what one
sample needs and nothing that belongs to the whole source (no instances.json in a task).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Failure:
    """One input that was skipped (or partly dropped), written as a line of failures.jsonl."""

    path: str  # the input file (image, caption, table row "table.csv:17", ref "refs(unc).p#ref_id=3")
    reason: str  # short machine-readable reason, e.g. "unreadable_image", "blank_caption"
    detail: str = ""  # one human sentence
    split: str = ""

    def to_json(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclass
class SampleSpec:
    """What one output sample needs: a stable dotless key, the image file, the source's record."""

    key: str
    image_path: str
    record: dict[str, Any]  # JSON-able, source specific; handed to the source's finalize()


@dataclass
class SourcePlan:
    """A source read and checked, before any image is touched."""

    kind: str  # "refcoco" | "captions": selects the finalize() used in the workers
    splits: dict[str, list[SampleSpec]]  # each list sorted by key: shard i is the same whatever the workers
    failures: list[Failure] = field(default_factory=list)  # items skipped while planning
    card: dict[str, Any] = field(default_factory=dict)  # JSON-able description of the source for dataset.json


@dataclass
class StoredImage:
    """The image as it goes into the shard (after EXIF orientation, RGB conversion and resize)."""

    data: bytes  # JPEG bytes
    width: int
    height: int
    source_width: int  # raw pixel-array size of the file, before orientation and resize
    source_height: int
    transpose: int | None  # PIL.Image.Transpose applied from EXIF orientation (None: none)
    passthrough: bool  # True when `data` are the original file bytes


@dataclass
class Finalized:
    """What a source's finalize(record, image) returns for one sample."""

    files: dict[str, bytes]  # extensions besides "jpg" ("json", "txt") -> bytes
    texts: list[str]  # every text of the sample, for the manifest
    source_id: str  # image id or source path, for the manifest
    failures: list[Failure] = field(default_factory=list)  # parts dropped while the sample was kept
