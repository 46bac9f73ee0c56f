"""Reading one sample of a shard: its JSON record and its phrases.

Both sample kinds store a `json` member: a referring sample's phrases are the sentences of its refs
(`refs[i].sentences[j].text`), a caption sample's are its `captions`. docs/data-format.md lists the
fields.
"""

from __future__ import annotations

import json
from typing import Any


def sample_meta(files: dict[str, bytes]) -> dict[str, Any]:
    """The sample's `json` member as a dict ({} when it is missing or not JSON)."""
    try:
        meta = json.loads(files["json"]) if "json" in files else {}
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def sample_texts(meta: dict[str, Any], files: dict[str, bytes] | None = None) -> list[str]:
    """The phrases of one sample: a referring sample's sentences, or a caption sample's captions.

    Each phrase stripped, blank and non-text entries dropped, and a phrase repeated within the sample
    kept once (RefCOCO often gives two refs of one image the same sentence). This is what a model
    trains on (a repeat would only be a second positive of the same image), and tools that count or
    show phrases use the same rule, so their counts are the phrases a model sees. A sample with
    neither refs nor captions falls back to its `txt` member, when `files` are given.
    """
    if "refs" in meta:
        texts = [s.get("text") for ref in meta["refs"] if isinstance(ref, dict)
                 for s in ref.get("sentences", []) if isinstance(s, dict)]
    elif "captions" in meta:
        texts = list(meta["captions"])
    elif files and "txt" in files:
        texts = [files["txt"].decode("utf-8", "replace")]
    else:
        texts = []
    return list(dict.fromkeys(t.strip() for t in texts if isinstance(t, str) and t.strip()))


def text_refs(meta: dict[str, Any], texts: list[str]) -> list[int]:
    """For each phrase of `sample_texts`, the index of the one ref it describes, or -1.

    Sentences of one ref name the same object, which is what lets a trainer use co-reference
    (docs/training.md, "Co-reference"). A phrase no ref holds (a caption) or one that two refs share
    (RefCOCO repeats sentences across refs) has no single referent: -1.
    """
    owners: dict[str, set[int]] = {}
    for index, ref in enumerate(meta.get("refs", []) or []):
        if not isinstance(ref, dict):
            continue
        for s in ref.get("sentences", []):
            if isinstance(s, dict) and isinstance(s.get("text"), str) and s["text"].strip():
                owners.setdefault(s["text"].strip(), set()).add(index)
    return [next(iter(owners[t])) if len(owners.get(t, ())) == 1 else -1 for t in texts]
