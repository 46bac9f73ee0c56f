"""Caption corpora as a table: .jsonl/.csv/.tsv/.parquet rows of (image path, caption).

The image-path and caption columns are found by name (case-insensitive, first match wins); paths
are relative to the table's folder and may not leave it; rows naming the same image merge into one
sample. Every bad row is a Failure labelled "table.csv:LINE" (the line the row starts on).
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Any

from sgdata.format.errors import UserError
from sgdata.sources.base import Failure
from sgdata.sources.caption_text import SPLIT, clean_captions, display_path, has_undecodable, within

TABLE_FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
# Column names accepted in tables, matched case-insensitively, first match wins.
IMAGE_COLUMNS = ("image", "image_path", "path", "file", "filepath", "file_path", "file_name", "filename", "url")
CAPTION_COLUMNS = ("caption", "captions", "text", "texts")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
Found = dict[str, dict[str, Any]]  # relative path (os form) -> {"path": file, "captions": [...]}


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


def read_parquet(path: Path, columns: list[str] | None = None):
    """The table (those columns only, when named), or a one-sentence UserError when it cannot be read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        reason = str(exc).splitlines()[0].rstrip(". ") if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read the table {path.name}: {reason}.") from None


def _csv_rows(path: Path, fmt: str, failures: list[Failure]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(header, [(label "table.csv:N", fields)]) of a CSV/TSV table; rows with the wrong field count reported.

    The file is read as text with bytes that are not UTF-8 surrogate-escaped, so one bad row cannot
    sink the table: a cell that is not UTF-8 is found by the row checks (`undecodable_caption`), a
    row that cannot be split into the header's fields is a `malformed_row` naming its first line.
    Quoted fields may span lines (captions with line breaks); a UTF-8 byte order mark is skipped.

    Why not pyarrow's CSV reader with an `invalid_row_handler`: it numbers records, not lines (a row after
    a quoted line break or a blank line would get another label), it gives no position at all for the
    rows it accepts (so "table.csv:LINE" could not name a good row's later problem), and a field too big
    for one block fails the whole table instead of that one row. Those labels and the per-row
    `malformed_row` for an unreadable record are part of the failure messages, so the reader stays.
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
                if has_undecodable(fields):
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
    table = read_parquet(path)
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
    if has_undecodable(values):
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
    if not within(real, root_real):
        return "", "", ("outside_root", f"{display_path(value)!r} points outside the table's folder")
    if not os.path.isfile(real):
        return "", "", ("missing_image", f"no image file {display_path(value)!r}")
    if within(joined, table_dir):
        rel = os.path.relpath(joined, table_dir)
    else:  # an absolute path that reaches the folder through another name
        rel = os.path.relpath(real, root_real)
    return joined, rel.replace(os.sep, "/"), None


def plan_table(path: Path, fmt: str) -> tuple[Found, list[Failure], dict[str, Any]]:
    """(images found with their captions, failures, card) of a table; no image is opened."""
    failures: list[Failure] = []
    image_column, caption_column, rows = _table_rows(path, fmt, failures)
    table_dir = str(path.parent)
    root_real = os.path.realpath(table_dir)
    found: Found = {}
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
    return found, failures, card
