"""Text encoder (a BERT-like transformers model, one vector per phrase) and its tokenizer."""

from __future__ import annotations

import warnings

import torch

from sgmodel.config import TextEncoderConfig
from sgmodel.encoders.base import FreezableEncoder, seeded
from sgmodel.encoders.weights import describe_weights, load_transformers_folder

class TextEncoder(FreezableEncoder):
    """input_ids, attention_mask (T, L) -> one vector per phrase (T, Ct), pooled by `text_pooling`.

    Random weights (no `text_encoder_path`) come from `seed` alone.
    """

    def __init__(self, cfg: TextEncoderConfig, vocab_size: int, pad_token_id: int, seed: int = 0):
        super().__init__(cfg.freeze_text_encoder)
        from transformers import AutoModel, BertConfig, BertModel

        self.pooling = cfg.text_pooling
        if cfg.text_encoder_path:
            self.bert, path = load_transformers_folder(AutoModel, cfg.text_encoder_path, "text encoder")
            if getattr(self.bert, "pooler", None) is not None:
                self.bert.pooler = None  # unused by our pooling; would hold parameters that never get gradients
            self.weights = describe_weights(path, cfg.text_encoder_path)
        else:
            config = BertConfig(
                vocab_size=vocab_size,
                hidden_size=cfg.bert_hidden,
                num_hidden_layers=cfg.bert_layers,
                num_attention_heads=cfg.bert_heads,
                intermediate_size=4 * cfg.bert_hidden,
                max_position_embeddings=max(512, cfg.max_text_length),
                pad_token_id=pad_token_id,
            )
            with seeded(seed):
                self.bert = BertModel(config, add_pooling_layer=False)
            self.weights = (
                f"random(seed={seed},hidden={cfg.bert_hidden},layers={cfg.bert_layers},heads={cfg.bert_heads},"
                f"vocab={vocab_size})"
            )
        self.out_dim = self.bert.config.hidden_size
        self.tokenizer_spec = f"{cfg.tokenizer_path or cfg.text_encoder_path or 'bytes'}:max{cfg.max_text_length}"
        self.freeze_if_configured()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._run(self.encode, input_ids, attention_mask)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (T, L, Ct)
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (T, L, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def identity(self) -> str:
        return f"bert|{self.weights}|pool={self.pooling}|tokenizer={self.tokenizer_spec}"


def build_tokenizer(cfg: TextEncoderConfig):
    """The tokenizer folder, else the text encoder's folder, else a byte tokenizer that needs no files."""
    spec = cfg.tokenizer_path or cfg.text_encoder_path
    if not spec:
        from transformers import ByT5Tokenizer

        return ByT5Tokenizer()
    from transformers import AutoTokenizer

    tokenizer, _ = load_transformers_folder(AutoTokenizer, spec, "tokenizer", needs="tokenizer_config.json")
    return tokenizer


def build_text_encoder(cfg: TextEncoderConfig, tokenizer=None, seed: int = 0) -> TextEncoder:
    """The text encoder for `tokenizer` (default: the one `cfg` names); random weights come from `seed`."""
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(cfg)
    return TextEncoder(cfg, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id or 0, seed=seed)


def tokenize(tokenizer, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Phrases -> (input_ids, attention_mask), both long (T, L), padded to the longest phrase.

    Phrases longer than `max_length` tokens (special tokens included) are truncated with a warning
    naming how many and one example, instead of failing a whole batch.
    """
    texts = list(texts)
    limit = max_length
    if 0 < getattr(tokenizer, "model_max_length", limit) < limit:
        limit = tokenizer.model_max_length
    if not texts:
        return torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1, dtype=torch.long)
    ids = tokenizer(texts, truncation=False, padding=False)["input_ids"]
    too_long = [i for i, row in enumerate(ids) if len(row) > limit]
    if too_long:
        example = texts[too_long[0]]
        warnings.warn(
            f"{len(too_long)} phrase(s) longer than {limit} tokens were truncated, e.g. {example[:60]!r}",
            stacklevel=2,
        )
        shortened = tokenizer([texts[i] for i in too_long], truncation=True, max_length=limit, padding=False)["input_ids"]
        for i, row in zip(too_long, shortened):
            ids[i] = row
    length = max(len(row) for row in ids)
    pad = tokenizer.pad_token_id or 0
    input_ids = torch.full((len(ids), length), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask
