"""COCO run-length-encoded masks: the one mask format of the shards, the evaluator and the tools.

An RLE here is always the *compressed* form as JSON carries it: `{"size": [height, width], "counts":
str}`, runs over column-major pixels (pos = x * H + y) alternating background and foreground,
starting with background. Encoding and dense decoding go through pycocotools, so a mask written here
decodes identically wherever the COCO tools are used. The counts string is read here in numpy
(`decode_counts_together`) wherever runs are needed without pixels, and before pycocotools sees a
string: its decoder does no bounds checks, so counts that do not add up to the mask's size would be
written past its buffer.
"""

from __future__ import annotations

import numbers

import numpy as np
from pycocotools import mask as mask_utils

from sgdata.format.errors import SegmentationError

# A compressed counts string stores each run in at most 12 five-bit groups (pycocotools reads a run
# into a 64-bit integer).
MAX_GROUPS_PER_RUN = 12


def compressed(rle: dict) -> dict:
    """pycocotools' RLE (counts as bytes) -> the JSON form (counts as str, size as a list)."""
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}


def _for_pycocotools(rle: dict) -> dict:
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}


def rle_to_mask(rle: dict) -> np.ndarray:
    """Compressed RLE -> bool mask (H, W)."""
    return mask_utils.decode(_for_pycocotools(rle)).astype(bool)  # (H, W)


def mask_to_rle(mask: np.ndarray) -> dict:
    """Bool/0-1 mask (H, W) -> compressed RLE."""
    fortran = np.asfortranarray(np.asarray(mask, dtype=np.uint8))  # (H, W), column-major as RLE runs
    return compressed(mask_utils.encode(fortran))


def compress_counts(rles: list[dict]) -> list[dict]:
    """RLEs whose counts are lists of run lengths (COCO crowd annotations) -> the compressed form."""
    return [compressed(rle) for rle in mask_utils.frPyObjects(rles, *rles[0]["size"])] if rles else []


# ---- reading counts strings ------------------------------------------------------------------------


def _as_text(counts: str | bytes) -> str:
    if isinstance(counts, str):
        return counts
    try:
        return bytes(counts).decode("ascii")
    except UnicodeDecodeError:
        raise SegmentationError("compressed RLE counts are not ASCII text") from None


def _codes(texts: list[str]) -> np.ndarray:
    """One code per character of the strings end to end (n,): bytes when all are ASCII, else code points."""
    joined = "".join(texts)
    try:
        return np.frombuffer(joined.encode("ascii"), dtype=np.uint8)
    except UnicodeEncodeError:
        return np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32)


def _first_error(codes: np.ndarray, more: np.ndarray, sizes: np.ndarray) -> None:
    """Raise the error a reader going one character at a time would meet first, if any.

    In string order and, within a string, in character order: a character that is no group (named in
    the message), the 12th group of a run that still says "more follows" (the run would not fit 64
    bits), and, at a string's end, a run still saying "more follows". So 20 x "P" (each a bare
    continuation group) is a run too long, not an unfinished one.
    """
    position = np.arange(codes.size)  # (n,)
    ends = np.cumsum(sizes)  # (K,) one past each string's last character
    bad = np.flatnonzero((codes < 48) | (codes >= 48 + 64))
    stops = np.maximum.accumulate(np.where(~more, position, -1))  # (n,) last run end at or before each
    run_start = np.maximum(np.append(-1, stops[:-1]) + 1, np.repeat(ends - sizes, sizes))  # (n,)
    long = np.flatnonzero(more & (position - run_start >= MAX_GROUPS_PER_RUN - 1))
    last = ends[sizes > 0] - 1
    unfinished = last[more[last]]
    # ties at one character: a bad character is no group; a long run is found before the string ends
    faults = [(bad[0] + 0.0, "bad") if bad.size else None, (long[0] + 0.1, "long") if long.size else None,
              (unfinished[0] + 0.2, "unfinished") if unfinished.size else None]
    faults = [f for f in faults if f is not None]
    if not faults:
        return
    at, kind = min(faults)
    if kind == "bad":
        raise SegmentationError(f"compressed RLE counts hold {chr(int(codes[int(at)]))!r}, which is not a run-length character")
    if kind == "long":
        raise SegmentationError("compressed RLE counts hold a run that does not fit 64 bits")
    raise SegmentationError("compressed RLE counts end in the middle of a run")


def decode_counts_together(strings: list[str | bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run lengths (int64) of several compressed COCO counts strings, in one vectorised pass.

    Read exactly as pycocotools' `rleFrString` reads them: each run is little-endian 5-bit groups, one
    character (48 + group) each, 0x20 = more groups follow, 0x10 in the last group = negative; from the
    fourth run on, a run is stored as the difference to the run two places before. The strings are
    decoded as one array (a per-string loop would cost more in numpy call overhead than in work).
    Raises SegmentationError for text that is not such a string, naming the first fault in reading
    order (see `_first_error`). Returns the runs of all strings end to end (R,), the string (R,) and
    the run number in it (R,) of each.
    """
    texts = [_as_text(s) for s in strings]
    sizes = np.array([len(t) for t in texts], dtype=np.int64)  # (K,)
    codes = _codes(texts)  # (n,)
    empty = np.zeros(0, dtype=np.int64)
    if codes.size == 0:
        return empty, empty, empty
    digits = codes.astype(np.int64) - 48  # (n,) a five-bit group, the sign bit 0x10 and the continuation bit 0x20
    more = (digits >= 0x20) | (digits < 0)  # (n,) more groups of this run follow (a bad character: see below)
    if codes.min() < 48 or codes.max() >= 48 + 64 or more[np.cumsum(sizes)[sizes > 0] - 1].any() or more.all():
        _first_error(codes, more, sizes)
    last = np.flatnonzero(~more)  # (R,) index of each run's final group
    first = np.append(0, last[:-1] + 1)  # (R,)
    length = last - first + 1  # (R,) groups per run
    if length.max() > MAX_GROUPS_PER_RUN:
        _first_error(codes, more, sizes)
    payload = digits & 0x1F  # (n,)
    if length.max() == 1:  # common: every run in one character
        values = payload.copy()
    else:
        place = np.arange(codes.size) - np.repeat(first, length)  # (n,) group index within its run
        values = np.add.reduceat(payload << (5 * place), first)  # (R,)
    negative = (digits[last] & 0x10) != 0  # (R,) sign bit of the last group: fill the bits above with ones
    values[negative] -= np.left_shift(1, 5 * length[negative])
    string = np.repeat(np.arange(len(texts)), sizes)[last]  # (R,) which string each run belongs to
    runs_per_string = np.bincount(string, minlength=len(texts))  # (K,)
    head = np.cumsum(runs_per_string) - runs_per_string  # (K,) first run of each string
    index = np.arange(last.size) - head[string]  # (R,) run number in its string
    if np.abs(values).max() >= (1 << 62) // values.size:  # the running sums below could leave int64:
        values = values.astype(object)  # sum as Python integers (only absurd counts come here)
    # runs 3, 5, 7, ... add up from run 1; runs 4, 6, ... from run 2; run 0 stands alone. As running sums
    # over all strings, less what the earlier strings contributed.
    odd = (index & 1) == 1  # (R,)
    chain = np.where(odd, 1, np.where(index > 0, 2, 0))  # (R,) 0: alone, 1: odd chain, 2: even chain
    totals = [np.append(0, np.cumsum(np.where(chain == c, values, 0))) for c in (1, 2)]  # (R+1,) each
    odd_sum = totals[0][1:] - totals[0][head][string]  # (R,)
    even_sum = totals[1][1:] - totals[1][head][string]  # (R,)
    runs = np.where(chain == 1, odd_sum, np.where(chain == 2, even_sum, values))  # (R,)
    if runs.dtype == object:
        if any(not -(1 << 63) <= run < 1 << 63 for run in runs):
            raise SegmentationError("compressed RLE counts hold runs that do not fit 64 bits")
        runs = runs.astype(np.int64)
    return runs, string, index


def decode_counts(counts: str | bytes) -> np.ndarray:
    """Run lengths (int64) of one compressed COCO counts string (see `decode_counts_together`)."""
    return decode_counts_together([counts])[0]


def foreground_runs(rles: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[starts, ends) of the foreground runs of several RLEs, decoded together, and the mask of each run.

    Positions are column-major within each mask (x * H + y). Runs are sorted, disjoint and non-empty
    per mask. Counts given as lists (COCO crowd annotations) are compressed first. Raises
    SegmentationError unless each mask's runs are non-negative and sum to its height * width.
    """
    lists = [i for i, rle in enumerate(rles) if isinstance(rle["counts"], list)]
    strings = [rle["counts"] for rle in rles]
    for i in lists:
        _check_runs(rles[i]["counts"], *_size(rles[i]))
        strings[i] = compress_counts([rles[i]])[0]["counts"]
    lengths, string, index = decode_counts_together(strings)  # (L,) each
    if lengths.size and lengths.min() < 0:
        raise SegmentationError("RLE counts must not be negative")
    expected = np.array([h * w for h, w in map(_size, rles)], dtype=np.int64)  # (K,)
    totals = np.bincount(string, weights=lengths, minlength=len(rles))  # (K,) exact: far below 2**53
    wrong = np.flatnonzero(totals != expected)
    if wrong.size:
        k = wrong[0]
        raise SegmentationError(f"RLE counts sum to {int(totals[k])}, not height * width = {expected[k]}")
    ends = np.cumsum(lengths) - (np.cumsum(expected) - expected)[string]  # (L,) end of each run within its mask
    foreground = (index % 2 == 1) & (lengths > 0)  # (L,) odd runs; zero-length ones carry nothing
    return ends[foreground] - lengths[foreground], ends[foreground], string[foreground]


def _size(rle: dict) -> tuple[int, int]:
    return int(rle["size"][0]), int(rle["size"][1])


def _check_runs(runs: list, height: int, width: int) -> None:
    """Run lengths that describe exactly one (height x width) mask: whole, non-negative, summing to its area."""
    if not all(isinstance(run, numbers.Integral) and not isinstance(run, bool) for run in runs):
        raise SegmentationError("RLE counts must be whole numbers")
    if any(run < 0 for run in runs):
        raise SegmentationError("RLE counts must not be negative")
    if sum(runs) != height * width:
        raise SegmentationError(f"RLE counts sum to {sum(runs)}, not height * width = {height * width}")


def check_rle(seg: dict, height: int, width: int) -> None:
    """Raise SegmentationError unless `seg` is an RLE (compressed or not) of exactly one (height x width) mask.

    Cheap (no mask is decoded), so planning can check every RLE before any worker stores one.
    """
    if "counts" not in seg or "size" not in seg:
        raise SegmentationError("RLE segmentation lacks 'counts' or 'size'")
    try:
        size = [int(seg["size"][0]), int(seg["size"][1])]
    except (TypeError, ValueError, OverflowError, IndexError, KeyError) as exc:
        raise SegmentationError(f"RLE segmentation has a malformed size {repr(seg['size'])[:40]}") from exc
    if size != [height, width]:
        raise SegmentationError(f"RLE segmentation size {size} differs from the image's {[height, width]}")
    counts = seg["counts"]
    if isinstance(counts, list):
        _check_runs(counts, height, width)
    elif isinstance(counts, (str, bytes)):
        _check_runs(decode_counts(counts).tolist(), height, width)
    else:
        raise SegmentationError(f"RLE counts of type {type(counts).__name__} are not understood")
