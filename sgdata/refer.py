"""Read the refer toolkit's files: the `refs(<splitBy>).p` pickle and the COCO `instances.json`.

A pickle is a program: loading one with `pickle.load` can run any function it names. The refs
files come from the internet, so they are read with an unpickler that admits no global at all:
the refs are plain lists, dicts, strings and numbers, and those need none.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any

from sgdata.format.errors import UserError


class _GlobalRequested(pickle.UnpicklingError):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.qualified_name = f"{module}.{name}"


class PlainDataUnpickler(pickle.Unpickler):
    """An unpickler for plain containers and scalars: any class or function lookup is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise _GlobalRequested(module, name)


def _text_from_python2(value: Any) -> Any:
    """Python-2 `str` values arrive as bytes (encoding="bytes"); make them text.

    UTF-8 is tried first because the refer pickles were written from UTF-8 sources; bytes that
    are not UTF-8 fall back to latin-1, which is what `encoding="latin1"` would give. Decoding
    ourselves rather than passing `encoding="latin1"` keeps a UTF-8 "é" from turning into "Ã©".
    """
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.decode("latin-1")
    if isinstance(value, list):
        return [_text_from_python2(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_text_from_python2(v) for v in value)
    if isinstance(value, dict):
        return {_text_from_python2(k): _text_from_python2(v) for k, v in value.items()}
    return value


def load_refs(path: str | Path) -> list[dict]:
    """The refs list of a `refs(<splitBy>).p` file (Python 2 or 3 pickle), without running any code.

    Raises UserError when the file is missing, is not a pickle, asks for a global, or is not a list.
    Entries are returned as they are; the planner checks each one and reports malformed ones.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"refs file {path} does not exist.") from None
    except OSError as exc:
        raise UserError(f"refs file {path} cannot be read ({exc.strerror or exc}).") from None
    try:
        refs = PlainDataUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _GlobalRequested as exc:
        raise UserError(
            f"refs file {path} asks to load {exc.qualified_name}; refusing to run code from a data file."
        ) from None
    except Exception as exc:  # truncated or not a pickle: every unpickling error means the same here
        raise UserError(f"refs file {path} is not a readable pickle ({type(exc).__name__}: {exc}).") from None
    refs = _text_from_python2(refs)
    if not isinstance(refs, list):
        raise UserError(f"refs file {path} holds a {type(refs).__name__}, not the list of refs the refer toolkit writes.")
    return refs


def load_json(path: str | Path, what: str) -> Any:
    """The JSON document at `path`; every way it cannot be read is one UserError naming `what` and the path."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist.") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a directory, not a JSON file.") from None
    except OSError as exc:
        raise UserError(f"{what} {path} cannot be read ({exc.strerror or exc}).") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{what} {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}).") from None
    except (UnicodeDecodeError, RecursionError, ValueError) as exc:
        raise UserError(f"{what} {path} is not valid JSON ({exc}).") from None


def load_instances(path: str | Path) -> dict:
    """A COCO instances.json with its 'images' and 'annotations' lists ('categories' defaults to [])."""
    path = Path(path)
    instances = load_json(path, "instances file")
    if not isinstance(instances, dict):
        raise UserError(f"instances file {path} holds a JSON {type(instances).__name__}, not a COCO object.")
    for key in ("images", "annotations"):
        if not isinstance(instances.get(key), list):
            raise UserError(f"instances file {path} has no '{key}' list; is it a COCO instances file?")
    categories = instances.setdefault("categories", [])
    if not isinstance(categories, list):
        raise UserError(f"instances file {path} has a 'categories' entry that is not a list.")
    return instances
