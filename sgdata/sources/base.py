"""The records that flow between the build stages.

source (plan)  ->  SampleSpec lists per split  ->  runner: one task per shard  ->  writer:
make_sample(spec) = image bytes + the source's `finalize(record, image)`  ->  tar + per-shard record.

Everything here is plain data so it pickles cheaply into Ray tasks: a spec carries what one
sample needs and nothing that belongs to the whole source (no instances.json in a task).

`Source` is the interface every source implements and `Option` how it declares its inputs; the
registry (`sgdata.sources.registry`) lists the sources, and the CLI, the API and the build record
all read a source's options from there, so a new source is one new file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence


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

    kind: str  # the registry name of the source whose finalize() the workers run (the sample format)
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


def split_list(splits: str | Sequence[str] | None) -> list[str] | None:
    """"val,testA" or ["val", "testA"] -> ["val", "testA"]; None or nothing named -> None (every split)."""
    if splits is None:
        return None
    items = splits.split(",") if isinstance(splits, str) else list(splits)
    items = [s.strip() for s in items if s.strip()]
    return items or None


@dataclass(frozen=True)
class Option:
    """One input of a source, declared once: `sgdata build` makes its flag, `api.build` its keyword,
    and the build record (what decides the bytes) records its value from this declaration."""

    name: str  # keyword of Source.plan(); the flag is --name-with-dashes
    help: str
    type: str = "text"  # "path" (recorded resolved), "text", "int" or "splits" (comma-separated names)
    required: bool = False
    argument: bool = False  # a positional argument shown as NAME instead of a --flag

    @property
    def flag(self) -> str:
        return self.name.upper() if self.argument else "--" + self.name.replace("_", "-")

    def parse(self, value: Any) -> Any:
        """The value as plan() receives it (a "splits" option as a list, or None for every split)."""
        return split_list(value) if self.type == "splits" else value

    def record(self, value: Any) -> Any:
        """The value as the build record keeps it: paths resolved, so a rerun from elsewhere matches."""
        from pathlib import Path

        if self.type == "path" and value is not None:
            return str(Path(value).resolve())
        return self.parse(value)


class Source(Protocol):
    """A kind of input that `sgdata build` reads.

    Sources of one dataset in different layouts share a `command` (the refer-toolkit files and the
    Hub parquet copies are both `sgdata build refcoco`); the `layout` options a user gives pick one.
    """

    name: str  # registry name, recorded in OUT/.build.json
    command: str  # `sgdata build <command>`
    help: str  # one line for `sgdata build --help` (the first source of a command gives it)
    options: tuple[Option, ...]
    layout: tuple[str, ...]  # options whose presence selects this source within its command (empty: the only one)
    plan: Callable[..., SourcePlan]  # plan(**options): read and check the input, no image opened
    finalize: Callable[[dict, StoredImage], Finalized]  # runs in the workers, one sample at a time
