"""The batch: what the loaders (sgmodel/data.py, sgmodel/segment.py) hand the model, one typed record.

B images and T phrases; every phrase belongs to one image (`text_image_index`). Exactly one image
input is present (`images`, or `image_tokens` from the feature cache) and the text always arrives as
token ids; `text_feats` rides along when the text encoder is frozen and cached. docs/architecture.md
("The batch") has the same table for readers of the docs.
"""

from __future__ import annotations

from typing import Any, TypedDict

import torch


class Batch(TypedDict, total=False):
    keys: list[str]  # (B) sample keys, for reports and overlays
    texts: list[str]  # (T) the phrases, for the false-negative masks and the co-reference teachers
    text_image_index: torch.Tensor  # long (T,): the image 0..B-1 each phrase belongs to
    text_ref_index: torch.Tensor  # long (T,): phrases naming the same object share a value; -1 unknown (captions)
    images: torch.Tensor  # uint8 (B, 3, H, W) at the training size; the image encoder normalises them
    image_tokens: torch.Tensor  # float (B, N, C): cached raw encoder tokens (frozen image encoder)
    input_ids: torch.Tensor  # long (T, L): token ids (text encoder, word embeddings)
    attention_mask: torch.Tensor  # long (T, L)
    text_feats: torch.Tensor  # float (T, Ct): cached pooled phrase vectors (frozen text encoder)
    masks: list[dict[str, Any]]  # evaluation: (T) ground-truth COCO RLE {"size": [H, W], "counts": str} as stored
    ref_ids: list[Any]  # evaluation: (T) the stored ref id of each phrase (per-phrase reports)
    originals: list[torch.Tensor]  # evaluation with overlays: (B) uint8 (H, W, 3) images at their stored size
