"""Caption corpora: a folder tree of images with same-stem captions, or a table of (image path, caption) rows.

Real corpora are messy, so planning reads every caption up front (they are small) and turns each
problem into a `Failure` instead of an exception: the build then knows exactly which images it
will write and why the others were skipped. Images themselves are not opened here; an unreadable
image is found later by `load_image` in the workers.

Rules (docs/data-format.md, docs/reliability.md):
- Folder: an image (jpg/jpeg/png/webp/bmp/gif/tif/tiff, any case) takes its captions from the
  same-stem `.txt` beside it (one caption per non-blank line) or, when there is none, from the
  same-stem `.json` (`{"caption": ...}`, `{"captions": [...]}` or a list of strings). A `.json` next
  to a `.txt` is treated as metadata and ignored (img2dataset writes both).
- Table: .jsonl/.csv/.tsv/.parquet with an image-path column and a caption column; paths are relative
  to the table's folder and may not leave it; rows naming the same image merge into one sample.
- Captions are stripped; blank ones and exact repeats within one image are dropped.
- Symbolic links are followed only while they stay inside the root and do not revisit a folder.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import unicodedata
from pathlib import Path
from typing import Any, Iterator

from sgdata.format.errors import SampleError, UserError
from sgdata.sources.base import Failure, Finalized, SampleSpec, SourcePlan, StoredImage
from sgdata.sources.refcoco import dumps_sample

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CAPTION_EXTENSIONS = (".txt", ".json")  # in order of preference
TABLE_FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
# Column names accepted in tables, matched case-insensitively, first match wins.
IMAGE_COLUMNS = ("image", "image_path", "path", "file", "filepath", "file_path", "file_name", "filename", "url")
CAPTION_COLUMNS = ("caption", "captions", "text", "texts")
MAX_CAPTION_BYTES = 1 << 20  # a caption file larger than this is not a caption (and must not fill memory)
KEY_STEM_CHARS = 40
KEY_HASH_CHARS = 10
SPLIT = "train"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


# ---------------------------------------------------------------- keys and names


def display_path(path: str) -> str:
    """A path as valid UTF-8 text: bytes that are not UTF-8 (surrogate-escaped by os) shown as \\xNN.

    Any other lone surrogate (a JSON "\\ud800" escape in a table) is shown as \\uNNNN.
    """
    try:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return path.encode("utf-8", "backslashreplace").decode("utf-8")


def caption_key(rel_path: str) -> str:
    """`<stem>_<sha1[:10]>`: readable, dotless (WebDataset splits on the first dot), stable across runs.

    The stem is the file name without its extension, reduced to ASCII letters, digits and `_`
    (accents dropped, anything else becomes `_`); the hash of the whole relative path keeps two
    `image.jpg` in different folders apart.
    """
    return _key(rel_path, KEY_HASH_CHARS)


def _key(rel_path: str, hash_chars: int) -> str:
    name = rel_path.rsplit("/", 1)[-1]
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    ascii_stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode("ascii")
    clean = re.sub(r"[^A-Za-z0-9]+", "_", ascii_stem).strip("_")[:KEY_STEM_CHARS].rstrip("_") or "img"
    digest = hashlib.sha1(rel_path.encode("utf-8", "surrogateescape")).hexdigest()
    return f"{clean}_{digest[:hash_chars]}"


def unique_keys(rel_paths: list[str]) -> dict[str, str]:
    """Keys for distinct relative paths; the rare pair whose 10-hex hashes collide gets the full hash."""
    keys = {rel: caption_key(rel) for rel in rel_paths}
    seen: dict[str, int] = {}
    for key in keys.values():
        seen[key] = seen.get(key, 0) + 1
    for rel, key in keys.items():
        if seen[key] > 1:
            keys[rel] = _key(rel, 40)
    return keys


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


# ---------------------------------------------------------------- caption text


def clean_captions(values: list[str]) -> list[str]:
    """Stripped, non-blank, first occurrence of each: the captions one image keeps."""
    out: list[str] = []
    for value in values:
        text = value.strip()
        if text and text not in out:
            out.append(text)
    return out


def _has_undecodable(texts: list[str]) -> bool:
    """Lone surrogates come from bytes that were not UTF-8 (or from JSON \\ud800 escapes)."""
    return any(re.search("[\ud800-\udfff]", text) for text in texts)


def parse_caption_file(path: str) -> tuple[list[str], tuple[str, str] | None]:
    """(captions, None) or ([], (reason, detail)) for one .txt or .json caption file."""
    try:
        if os.path.getsize(path) > MAX_CAPTION_BYTES:
            return [], ("oversized_caption", f"caption file is larger than {MAX_CAPTION_BYTES} bytes")
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        return [], ("unreadable_caption", f"cannot read the caption file ({exc.strerror or exc})")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return [], ("undecodable_caption", f"caption file is not UTF-8 (byte {exc.start})")
    if path.lower().endswith(".txt"):
        values = text.splitlines()
    else:
        try:
            values = _json_captions(json.loads(text))
        except ValueError as exc:
            return [], ("malformed_caption", f"caption JSON is not usable: {exc}")
    if _has_undecodable(values):
        return [], ("undecodable_caption", "caption JSON holds an unpaired surrogate escape")
    captions = clean_captions(values)
    if not captions:
        return [], ("blank_caption", "the caption file holds no non-blank caption")
    return captions, None


def _json_captions(value: Any) -> list[str]:
    """The caption strings of a caption JSON document; ValueError when it has none of the accepted shapes."""
    if isinstance(value, dict):
        for field in ("captions", "caption"):
            if field in value:
                value = value[field]
                break
        else:
            raise ValueError('expected a "caption" or "captions" field')
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise ValueError("captions must be a string or a list of strings")


# ---------------------------------------------------------------- folder trees


def _walk(root: str, failures: list[Failure]) -> Iterator[tuple[str, list[str]]]:
    """(folder path, sorted file names) for every folder under root, each real folder once.

    Followed links never leave the root and never revisit a folder, so a link loop ends at once;
    every link not followed is reported.
    """
    visited = {os.path.realpath(root)}
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as exc:
            failures.append(Failure(display_path(os.path.relpath(folder, root)), "unreadable_folder",
                                    f"cannot list the folder ({exc.strerror or exc})", SPLIT))
            continue
        files, subfolders = [], []
        for entry in entries:
            rel = display_path(os.path.relpath(entry.path, root).replace(os.sep, "/"))
            if entry.is_symlink():
                target = os.path.realpath(entry.path)
                if not os.path.exists(target):
                    failures.append(Failure(rel, "broken_symlink", "the link points to nothing", SPLIT))
                    continue
                if not _within(target, os.path.realpath(root)):
                    failures.append(Failure(rel, "outside_root", "the link points outside the source folder", SPLIT))
                    continue
            if entry.is_dir(follow_symlinks=True):
                real = os.path.realpath(entry.path)
                if real in visited:
                    failures.append(Failure(rel, "symlink_loop",
                                            "the link leads to a folder already read; not read twice", SPLIT))
                    continue
                visited.add(real)
                subfolders.append(entry.path)
            elif entry.is_file(follow_symlinks=True):
                files.append(entry.name)
        yield folder, files
        stack.extend(reversed(subfolders))  # depth first, in name order


def _group_by_stem(names: list[str]) -> dict[str, dict[str, list[str]]]:
    """stem -> {"image": [...], "caption": [...], "other": [...]} file names (extensions matched in any case)."""
    groups: dict[str, dict[str, list[str]]] = {}
    for name in names:
        stem, dot, ext = name.rpartition(".")
        if not dot or not stem:  # "README", ".hidden": no extension
            stem, ext = name, ""
        ext = "." + ext.lower()
        kind = "image" if ext in IMAGE_EXTENSIONS else "caption" if ext in CAPTION_EXTENSIONS else "other"
        groups.setdefault(stem, {"image": [], "caption": [], "other": []})[kind].append(name)
    return groups


def _plan_folder(root: Path) -> SourcePlan:
    failures: list[Failure] = []
    found: dict[str, dict[str, Any]] = {}  # relative path (os form) -> {"path", "captions"}
    ignored = caption_files = 0
    root_str = str(root)
    for folder, names in _walk(root_str, failures):
        groups = _group_by_stem(names)
        for stem in sorted(groups):
            group = groups[stem]
            rel = {name: os.path.relpath(os.path.join(folder, name), root_str).replace(os.sep, "/")
                   for kinds in group.values() for name in kinds}
            caption_files += len(group["caption"])
            ignored += len(group["other"])
            if not group["image"]:
                for name in group["caption"]:
                    if group["other"]:
                        failures.append(Failure(display_path(rel[name]), "unsupported_image",
                                                "no image with a supported extension beside it (found "
                                                f"{display_path(', '.join(group['other']))})", SPLIT))
                    else:
                        failures.append(Failure(display_path(rel[name]), "caption_without_image",
                                                "no image with the same stem beside it", SPLIT))
                continue
            chosen = _preferred_caption_files(group["caption"])
            if not chosen:
                failures += [Failure(display_path(rel[name]), "missing_caption",
                                     "no same-stem .txt or .json caption beside the image", SPLIT)
                             for name in group["image"]]
                continue
            captions: list[str] = []
            for name in chosen:
                parsed, problem = parse_caption_file(os.path.join(folder, name))
                if problem:
                    skipped = display_path(", ".join(group["image"]))
                    failures.append(Failure(display_path(rel[name]), problem[0],
                                            f"{problem[1]}; skipped {skipped}", SPLIT))
                    break
                captions = clean_captions(captions + parsed)
            else:
                for name in group["image"]:
                    found[rel[name]] = {"path": os.path.join(folder, name), "captions": captions}
    if not found and not failures:
        raise UserError(f"the source folder {root} holds no images and no captions.")
    card = {"source": "captions", "layout": "folder", "root": str(root), "caption_files": caption_files,
            "ignored_files": ignored}
    return _plan(found, failures, card)


def _preferred_caption_files(names: list[str]) -> list[str]:
    """The .txt files of a stem if it has any, else its .json files (sorted: a.TXT and a.txt both count)."""
    for ext in CAPTION_EXTENSIONS:
        chosen = sorted(name for name in names if name.lower().endswith(ext))
        if chosen:
            return chosen
    return []


# ---------------------------------------------------------------- tables


def _column_list(columns: list[str]) -> str:
    """Column names for a one-line message: printable ones as they are, others quoted with escapes."""
    shown = [name if name.isprintable() and name.strip() == name and name else repr(name) for name in columns]
    return ", ".join(shown) or "no columns"


def _pick_column(columns: list[str], candidates: tuple[str, ...], what: str, table: Path) -> str:
    lowered = {column.lower(): column for column in reversed(columns)}
    for name in candidates:
        if name in lowered:
            return lowered[name]
    raise UserError(f"the table {table.name} has no {what} column (looked for {', '.join(candidates)}; "
                    f"found {_column_list(columns)}).")


def _text_cell(value: Any) -> Any:
    """Bytes cells (a Parquet binary column) as surrogate-escaped str, as CSV cells are read."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, list):
        return [_text_cell(item) for item in value]
    return value


Row = tuple[str, Any, Any]  # (label "table.csv:17", image cell, caption cell)


def _jsonl_rows(path: Path, failures: list[Failure]) -> tuple[list[str], list[dict], list[str]]:
    """(columns in first-seen order, row objects, their labels); lines that are not JSON objects are reported."""
    columns: dict[str, None] = {}
    rows, labels = [], []
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            label = f"{path.name}:{number}"
            try:
                row = json.loads(line.decode("utf-8", "surrogateescape"))
            except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than Python's stack
                failures.append(Failure(label, "malformed_row", f"the line is not valid JSON ({exc})", SPLIT))
                continue
            if not isinstance(row, dict):
                failures.append(Failure(label, "malformed_row", "the line is not a JSON object", SPLIT))
                continue
            columns.update(dict.fromkeys(row))
            rows.append(row)
            labels.append(label)
    return list(columns), rows, labels


def _read_parquet(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        reason = str(exc).splitlines()[0].rstrip(". ") if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read the table {path.name}: {reason}.") from None


def _csv_rows(path: Path, fmt: str, failures: list[Failure]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(header, [(label "table.csv:N", fields)]) of a CSV/TSV table; rows with the wrong field count reported.

    The file is read as text with bytes that are not UTF-8 surrogate-escaped, so one bad row cannot
    sink the table: a cell that is not UTF-8 is found by the row checks (`undecodable_caption`), a
    row that cannot be split into the header's fields is a `malformed_row` naming its first line.
    Quoted fields may span lines (captions with line breaks); a UTF-8 byte order mark is skipped.
    """
    delimiter = "\t" if fmt == "tsv" else ","
    header: list[str] | None = None
    rows: list[tuple[str, list[str]]] = []
    try:
        handle = open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")
    except OSError as exc:
        raise UserError(f"cannot read the table {path.name} ({exc.strerror or exc}).") from None
    with handle:
        reader = csv.reader(handle, delimiter=delimiter)
        start = 1  # the line where the next record begins
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:  # e.g. a field above csv's size limit: that record is skipped
                failures.append(Failure(f"{path.name}:{start}", "malformed_row", f"the row cannot be read ({exc})",
                                        SPLIT))
                if reader.line_num < start:  # nothing was consumed: stop rather than loop
                    break
                start = reader.line_num + 1
                continue
            label, start = f"{path.name}:{start}", reader.line_num + 1
            if not fields:  # a blank line
                continue
            if header is None:
                if _has_undecodable(fields):
                    raise UserError(f"the header (first line) of the table {path.name} is not UTF-8 text; "
                                    "save the table as UTF-8.")
                header = fields
            elif len(fields) != len(header):
                failures.append(Failure(label, "malformed_row", f"the row has {len(fields)} fields, expected "
                                        f"{len(header)}: {display_path(delimiter.join(fields))[:80]!r}", SPLIT))
            else:
                rows.append((label, fields))
    if header is None:
        raise UserError(f"the table {path.name} is empty: it has no header line.")
    return header, rows


def _check_text_column(table, column: str, path: Path) -> None:
    import pyarrow as pa

    kind = table.schema.field(column).type
    text = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary,
            pa.types.is_null)
    if any(test(kind) for test in text):
        return
    if (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and any(test(kind.value_type) for test in text):
        return
    raise UserError(f"the column {column!r} of {path.name} holds {kind} values, not text or file paths.")


def _table_rows(path: Path, fmt: str, failures: list[Failure]) -> tuple[str, str, list[Row]]:
    """(image column, caption column, rows) of a table; unknown columns are a UserError."""
    if fmt == "jsonl":
        columns, objects, labels = _jsonl_rows(path, failures)
        image_column = _pick_column(columns, IMAGE_COLUMNS, "image-path", path)
        caption_column = _pick_column(columns, CAPTION_COLUMNS, "caption", path)
        rows = [(label, row.get(image_column), row.get(caption_column)) for label, row in zip(labels, objects)]
        return image_column, caption_column, rows
    if fmt in ("csv", "tsv"):
        header, records = _csv_rows(path, fmt, failures)
        image_column = _pick_column(header, IMAGE_COLUMNS, "image-path", path)
        caption_column = _pick_column(header, CAPTION_COLUMNS, "caption", path)
        image_index, caption_index = header.index(image_column), header.index(caption_column)
        rows = [(label, fields[image_index], fields[caption_index]) for label, fields in records]
        return image_column, caption_column, rows
    table = _read_parquet(path)
    image_column = _pick_column(table.column_names, IMAGE_COLUMNS, "image-path", path)
    caption_column = _pick_column(table.column_names, CAPTION_COLUMNS, "caption", path)
    for column in (image_column, caption_column):
        _check_text_column(table, column, path)
    images = table.column(image_column).to_pylist()
    captions = table.column(caption_column).to_pylist()
    rows = [(f"{path.name}:{index + 1}", _text_cell(image), _text_cell(caption))
            for index, (image, caption) in enumerate(zip(images, captions))]
    return image_column, caption_column, rows


def _row_captions(value: Any) -> tuple[list[str], tuple[str, str] | None]:
    if value is None:
        return [], ("missing_caption", "the row has no caption")
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(item, str) for item in values):
        return [], ("malformed_row", "the caption is not text or a list of texts")
    if _has_undecodable(values):
        return [], ("undecodable_caption", "the caption is not valid UTF-8")
    captions = clean_captions(values)
    if not captions:
        return [], ("blank_caption", "the caption is blank")
    return captions, None


def _row_image(value: Any, table_dir: str, root_real: str) -> tuple[str, str, tuple[str, str] | None]:
    """(absolute path, relative path (os text, maybe surrogate-escaped), problem) of a row's image cell."""
    if not isinstance(value, str) or not value.strip():
        return "", "", ("missing_image", "the row has no image path")
    value = value.strip()
    try:
        if "\x00" in value:
            raise ValueError
        os.fsencode(value)
    except (ValueError, UnicodeEncodeError):  # a NUL or a JSON "\\ud800" escape: no file has that name
        return "", "", ("malformed_row", f"the image path {display_path(value)[:80]!r} is not a usable file name")
    if value.startswith("file://"):
        value = value[len("file://"):]
    elif _URL.match(value):
        return "", "", ("remote_image", f"{display_path(value)!r} is a URL; only local files are read")
    joined = os.path.normpath(os.path.join(table_dir, value))
    real = os.path.realpath(joined)
    if not _within(real, root_real):
        return "", "", ("outside_root", f"{display_path(value)!r} points outside the table's folder")
    if not os.path.isfile(real):
        return "", "", ("missing_image", f"no image file {display_path(value)!r}")
    if _within(joined, table_dir):
        rel = os.path.relpath(joined, table_dir)
    else:  # an absolute path that reaches the folder through another name
        rel = os.path.relpath(real, root_real)
    return joined, rel.replace(os.sep, "/"), None


def _plan_table(path: Path, fmt: str) -> SourcePlan:
    failures: list[Failure] = []
    image_column, caption_column, rows = _table_rows(path, fmt, failures)
    table_dir = str(path.parent)
    root_real = os.path.realpath(table_dir)
    found: dict[str, dict[str, Any]] = {}
    for label, image_cell, caption_cell in rows:
        image_path, rel, image_problem = _row_image(image_cell, table_dir, root_real)
        captions, caption_problem = _row_captions(caption_cell)
        problem = image_problem or caption_problem
        if problem:
            failures.append(Failure(label, problem[0], problem[1], SPLIT))
            continue
        entry = found.setdefault(rel, {"path": image_path, "captions": []})
        entry["captions"] = clean_captions(entry["captions"] + captions)
    if not rows and not failures:
        raise UserError(f"no sample could be built: the table {path.name} has no rows.")
    card = {"source": "captions", "layout": "table", "table": str(path), "format": fmt,
            "image_column": image_column, "caption_column": caption_column, "rows": len(rows)}
    return _plan(found, failures, card)


# ---------------------------------------------------------------- plan and finalize


def _plan(found: dict[str, dict[str, Any]], failures: list[Failure], card: dict[str, Any]) -> SourcePlan:
    """Specs sorted by key; `found` maps each image's relative path to its file and captions."""
    keys = unique_keys(list(found))
    specs = [SampleSpec(key=keys[rel], image_path=entry["path"],
                        record={"source": display_path(rel), "captions": entry["captions"]})
             for rel, entry in found.items()]
    specs.sort(key=lambda spec: spec.key)
    card = {**card, "images": len(specs), "captions": sum(len(spec.record["captions"]) for spec in specs)}
    return SourcePlan(kind="captions", splits={SPLIT: specs}, failures=failures, card=card)


def plan_captions(src: str | Path) -> SourcePlan:
    """Read a caption folder tree or table into one "train" split of specs sorted by key (no image is opened)."""
    src = Path(src).expanduser().absolute()
    if not src.exists():
        raise UserError(f"the caption source {src} does not exist.")
    if src.is_dir():
        return _plan_folder(src)
    fmt = TABLE_FORMATS.get(src.suffix.lower())
    if fmt is None:
        raise UserError(f"the caption source {src} is neither a folder nor a .jsonl/.csv/.tsv/.parquet table.")
    return _plan_table(src, fmt)


def finalize(record: dict, image: StoredImage) -> Finalized:
    """`json` {"captions", "height", "source", "width"} (same schema for every sample) and `txt` (first caption)."""
    captions = list(record["captions"])
    if not captions:
        raise SampleError("blank_caption", "the sample has no caption")
    sample = {"source": record["source"], "width": image.width, "height": image.height, "captions": captions}
    return Finalized(files={"json": dumps_sample(sample), "txt": captions[0].encode("utf-8")},
                     texts=captions, source_id=record["source"])
