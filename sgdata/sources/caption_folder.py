"""Caption corpora as a folder tree: images with same-stem captions beside them.

An image (jpg/jpeg/png/webp/bmp/gif/tif/tiff, any case) takes its captions from the same-stem `.txt`
beside it (one caption per non-blank line) or, when there is none, from the same-stem `.json`
(`{"caption": ...}`, `{"captions": [...]}` or a list of strings). A `.json` next to a `.txt` is
treated as metadata and ignored (img2dataset writes both). Symbolic links are followed only while
they stay inside the root and do not revisit a folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from sgdata.format.errors import UserError
from sgdata.sources.base import Failure
from sgdata.sources.caption_text import SPLIT, clean_captions, display_path, has_undecodable, within

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CAPTION_EXTENSIONS = (".txt", ".json")  # in order of preference
MAX_CAPTION_BYTES = 1 << 20  # a caption file larger than this is not a caption (and must not fill memory)
Found = dict[str, dict[str, Any]]  # relative path (os form) -> {"path": file, "captions": [...]}


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
    if has_undecodable(values):
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
                if not within(target, os.path.realpath(root)):
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


def plan_folder(root: Path) -> tuple[Found, list[Failure], dict[str, Any]]:
    """(images found with their captions, failures, card) of a folder tree; no image is opened."""
    failures: list[Failure] = []
    found: Found = {}
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
    return found, failures, card


def _preferred_caption_files(names: list[str]) -> list[str]:
    """The .txt files of a stem if it has any, else its .json files (sorted: a.TXT and a.txt both count)."""
    for ext in CAPTION_EXTENSIONS:
        chosen = sorted(name for name in names if name.lower().endswith(ext))
        if chosen:
            return chosen
    return []
