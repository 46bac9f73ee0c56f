"""The two training losses (docs/method.md) and the false-negative mask the contrastive loss can use."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_loss(
    text_emb: torch.Tensor,
    z: torch.Tensor,
    text_image_index: torch.Tensor,
    logit_scale: torch.Tensor | float,
    same_text_mask: torch.Tensor | None = None,
    image_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over images for each text; returns (loss, accuracy).

    text_emb (T, d): the phrase embeddings t_j (detached here: the text side learns through z).
    z (B_all, T, d): fused vectors z(I_i, T_j) for every image i of B_all (all ranks' images when
        negatives are gathered) and every local text j.
    text_image_index (T,): the local image of each text; its column is image_offset + index. Several
        texts of one image are each a positive for that image.
    same_text_mask (T, B_all) bool or None: True where image i must not serve as a negative for text j
        (it carries the identical phrase, or it is padding); the positive is never masked.
    """
    logits = torch.einsum("td,btd->tb", text_emb.detach(), z).float() * logit_scale  # (T, B_all)
    target = text_image_index.to(logits.device) + image_offset  # (T,)
    if same_text_mask is not None:
        excluded = same_text_mask.to(logits.device, torch.bool).clone()
        excluded[torch.arange(len(target), device=logits.device), target] = False
        logits = logits.masked_fill(excluded, float("-inf"))
    loss = F.cross_entropy(logits, target)
    accuracy = (logits.detach().argmax(dim=1) == target).float().mean()
    return loss, accuracy


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE against the detached backbone tokens: the decoder must not pull the encoder toward easy targets."""
    return F.mse_loss(recon.float(), target.detach().float())


def normalize_phrase(text: str) -> str:
    """Case and whitespace do not make two phrases different."""
    return " ".join(text.lower().split())


def duplicate_phrase_mask(texts: list[str], image_texts: list[list[str]], entailed: bool = False) -> torch.Tensor:
    """(T, B_all) bool: True where image i carries the same phrase as text j.

    Small vocabularies (e.g. synthetic "the red circle") make such false negatives frequent; the
    contrastive loss drops them from the negatives (the positive itself is kept there).
    entailed: also True where a phrase of image i holds every content word of text j ("the red one"
    and an image described as having "the red circle"): such an image very likely shows what j
    names too, so it is no negative either (see entailed_phrase_mask).
    """
    if entailed:
        return entailed_phrase_mask(texts, image_texts)
    vocab: dict[str, int] = {}
    text_ids = torch.tensor([vocab.setdefault(normalize_phrase(t), len(vocab)) for t in texts], dtype=torch.long)
    pair_images, pair_ids = [], []
    for i, phrases in enumerate(image_texts):
        for phrase in set(map(normalize_phrase, phrases)):
            if phrase in vocab:  # phrases no local text uses cannot match
                pair_images.append(i)
                pair_ids.append(vocab[phrase])
    mask = torch.zeros(len(texts), len(image_texts), dtype=torch.bool)
    if pair_ids:
        matches = text_ids[:, None] == torch.tensor(pair_ids)[None, :]  # (T, P)
        rows, cols = matches.nonzero(as_tuple=True)
        mask[rows, torch.tensor(pair_images)[cols]] = True
    return mask


# Words that compare an entity with others in its own image ("the left one", "the bigger star").
RELATION_WORDS = frozenset(
    "left right leftmost rightmost bigger larger smaller biggest largest smallest big large small "
    "top bottom upper lower above below "
    # more English position and size comparisons, so other wordings of the same relations count too
    "middle center centre higher highest lowest front back behind near nearest closest farther farthest "
    "furthest next beside between tiny little huge taller tallest shorter shortest wider widest narrower".split()
)
# Words that say nothing about which entity is meant: articles, copulas, prepositions and head nouns
# that fit anything ("the red one", "the red shape", "the only triangle").
GENERIC_WORDS = frozenset(
    "a an the this that these those is are which who one ones object objects shape shapes thing things "
    "only of on in at to with and far most".split()
)


def content_words(text: str) -> frozenset[str]:
    """What a phrase says about the entity itself: its words minus generic and relation words.

    Relation words compare the entity with others in the same image, so they do not make a phrase
    false of another image: "the triangle on the right" may well be true of an image described only
    as having "the blue triangle".
    """
    words = normalize_phrase(text).replace(",", " ").split()
    return frozenset(w for w in words if w not in GENERIC_WORDS and w not in RELATION_WORDS)


def entailed_phrase_mask(texts: list[str], image_texts: list[list[str]]) -> torch.Tensor:
    """(T, B_all) bool: True where some phrase of image i contains every content word of text j.

    A phrase that is true of many images ("the triangle", "the red one") has most of the batch as
    false negatives under the plain contrastive loss, which then teaches it to avoid the very objects
    it names. When another image is described with the same content words and more ("the blue
    triangle" contains "triangle"), it is dropped from that phrase's negatives; a phrase with no
    content word at all ("the leftmost object") is true of every image and keeps no negative. One
    matrix product over a bag-of-words vocabulary: j ⊆ p  <=>  |j minus p| = 0.
    """
    phrases = [(i, content_words(p)) for i, group in enumerate(image_texts) for p in set(group)]
    text_words = [content_words(t) for t in texts]
    vocab: dict[str, int] = {}
    for words in text_words + [w for _, w in phrases]:
        for word in sorted(words):
            vocab.setdefault(word, len(vocab))
    mask = torch.zeros(len(texts), len(image_texts), dtype=torch.bool)
    if not phrases or not texts:
        return mask

    def bags(word_sets: list[frozenset[str]]) -> torch.Tensor:
        out = torch.zeros(len(word_sets), max(1, len(vocab)))
        for row, words in enumerate(word_sets):
            out[row, [vocab[w] for w in words]] = 1.0
        return out

    missing = bags(text_words) @ (1.0 - bags([w for _, w in phrases])).T  # (T, P): words of j absent from p
    rows, cols = (missing == 0).nonzero(as_tuple=True)
    mask[rows, torch.tensor([i for i, _ in phrases])[cols]] = True
    return mask


# ---- co-reference: what image-level matching cannot teach --------------------------------------------


def relational_phrase(text: str) -> bool:
    """Whether a phrase singles its object out by comparing it with others (a word of RELATION_WORDS,
    or a superlative in -most: "leftmost", "uppermost").

    A short list of English spatial and size words, on purpose: it is a language prior that carries to
    any English referring data (RefCOCO leans on exactly these words), not a data set's wording.
    """
    words = normalize_phrase(text).replace(",", " ").split()
    return any(w in RELATION_WORDS or (w.endswith("most") and len(w) > 4) for w in words)


def coreference_teachers(texts: list[str], ref_index: torch.Tensor) -> torch.Tensor:
    """(T, T) float: row j averages the phrases that teach phrase j, all zero when none does.

    Phrase j is taught when it is relational and other phrases of its ref (the same object) are not:
    those attribute phrases ("the red circle") are grounded by image-text matching alone, and their
    maps say where the object is. Teaching goes one way only: two learners teaching each other
    collapse onto a shared slot.
    """
    relational = torch.tensor([relational_phrase(t) for t in texts], dtype=torch.bool)
    refs = ref_index.cpu()
    same_ref = (refs[:, None] == refs[None, :]) & (refs[:, None] >= 0)  # (T, T)
    teaches = same_ref & relational[:, None] & ~relational[None, :]  # row: learner, column: teacher
    counts = teaches.sum(dim=1, keepdim=True).clamp(min=1)
    return teaches.float() / counts


def coreference_loss(maps: torch.Tensor, teachers: torch.Tensor, level: float = 0.5) -> torch.Tensor:
    """KL divergence from the teachers' mask to each learner's response map, over the image's tokens.

    maps (T, N): each phrase's response map M = sum_k w_k A_k on its own image (A detached by the
    caller: the term moves which slots a phrase picks, not the entity maps' shapes). teachers (T, T) from
    `coreference_teachers`. The teacher map (mean of the teachers' maps, stop-gradient) is min-max
    normalised and cut at `level` into a mask, read as a uniform distribution over its tokens; the
    learner's map, normalised to a distribution over tokens, should match it: zero when the learner
    covers exactly the teachers' mask, large when its mass lies elsewhere. Learners with no teacher add
    nothing; the mean is over learners (0 when there are none).
    """
    has_teacher = teachers.sum(dim=1) > 0  # (T,)
    target = teachers.to(maps.dtype) @ maps.detach()  # (T, N)
    low, high = target.aminmax(dim=1, keepdim=True)
    inside = (target >= low + level * (high - low)).to(maps.dtype)
    target = inside / inside.sum(dim=1, keepdim=True).clamp(min=1)
    learner = maps / maps.sum(dim=1, keepdim=True).clamp(min=1e-8)
    per_phrase = (target * (torch.log(target.clamp(min=1e-12)) - torch.log(learner + 1e-8))).sum(dim=1)  # (T,)
    weight = has_teacher.to(maps.dtype)
    return (per_phrase * weight).sum() / weight.sum().clamp(min=1)
