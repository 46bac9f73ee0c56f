"""The data contract: what sgdata writes and sgmodel (or any reader) may rely on, in one place.

This package is the only part of `sgdata` that `sgmodel` imports (a test checks the import graph);
the rest of `sgdata` (sources, build, writer, runner, manifest, inspect, verify) is free to change
behind it. docs/data-format.md describes the files; this package holds the code both sides share:

- `errors`:  UserError, SampleError, SegmentationError
- `files`:   atomic writes (one temporary-name scheme, fsync, rename) and `fsync_dir`
- `shards`:  the sample-key rule, reading a tar sample by sample, the shard-spec grammar
             (`expand_shards`, `parse_mixture`)
- `storage`: local paths and object-storage URLs (fsspec), read the same way
- `samples`: a sample's JSON record, its phrases (`sample_texts`) and the ref each describes (`text_refs`)
- `rle`:     COCO RLE encode/decode, counts checking, foreground runs without a dense mask
- `images`:  decoding a stored image (`decode_rgb`)
- `drawing`: mask overlays, captioned tiles and grids for figures
"""

from sgdata.format.drawing import caption_tile, color_for, make_grid, overlay_mask
from sgdata.format.errors import SampleError, SegmentationError, UserError
from sgdata.format.files import (atomic_write, fsync_dir, is_temporary, remove_temporaries, temporary_name,
                                 write_bytes_atomic, write_json_atomic, write_text_atomic)
from sgdata.format.images import decode_rgb
from sgdata.format.rle import (check_rle, decode_counts, decode_counts_together, foreground_runs, mask_to_rle,
                               rle_to_mask)
from sgdata.format.samples import sample_meta, sample_texts, text_refs
from sgdata.format.shards import expand_shards, is_valid_key, iter_tar_samples, parse_mixture, split_member_name

__all__ = [
    "SampleError", "SegmentationError", "UserError",
    "atomic_write", "fsync_dir", "is_temporary", "remove_temporaries", "temporary_name", "write_bytes_atomic", "write_json_atomic",
    "write_text_atomic",
    "expand_shards", "is_valid_key", "iter_tar_samples", "parse_mixture", "split_member_name",
    "sample_meta", "sample_texts", "text_refs",
    "check_rle", "decode_counts", "decode_counts_together", "foreground_runs", "mask_to_rle", "rle_to_mask",
    "decode_rgb",
    "caption_tile", "color_for", "make_grid", "overlay_mask",
]
