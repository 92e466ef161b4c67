"""Caption text helpers shared by training and evaluation (FLAIR's sentence splitting)."""

import re

_SENTENCE_BREAK = re.compile(r"\n|</s>|\.")


def split_sentences(text: str) -> list[str]:
    """Split on newlines, the literal `</s>` and every `.` (numbers like `3.5` too, as the original); strip; drop empties."""
    return [piece.strip() for piece in _SENTENCE_BREAK.split(text) if piece.strip()]


def rejoin_sentences(text: str) -> str:
    """The long-caption text the original evaluation fed the tokenizer: `split_sentences` joined with `". "`."""
    return ". ".join(split_sentences(text))



DREAMLIP_KEYS = (
    "raw_caption",
    "shortIB_captions",
    "longIB_captions",
    "shortSV_captions",
    "longSV_captions",
    "shortLLA_captions",
    "longLLA_captions",
)


def caption_sentences(record: dict, keys: tuple[str, ...] = DREAMLIP_KEYS) -> list[str]:
    """The sentences of a caption record: DreamLIP-recap keys (lists of sentences or strings to split) or, when none of
    those is present, a single long `caption` string (PixelProse style) split into sentences."""
    sentences = []
    for key in keys:
        value = record.get(key)
        if value is None:
            continue
        for text in [value] if isinstance(value, str) else value:
            sentences.extend(split_sentences(text))
    if not sentences and isinstance(record.get("caption"), str):
        sentences = split_sentences(record["caption"])
    return sentences


def sample_subcaptions(sentences: list[str], num_captions: int, max_merged: int = 3, rng=None) -> list[str]:
    """FLAIR's diverse sub-caption sampling: `num_captions` captions, each merging `m ~ U{1..max_merged}` sentences.

    `m = 1`: one random sentence. Otherwise, with probability 1/2, a run of `m` consecutive sentences from a random
    start in `[0, n - m)` (all sentences when `m >= n`); else `m` sentences drawn without replacement (with
    replacement when fewer than `m` exist). Pieces are joined with `". "`. `rng` is a `random.Random`.
    """
    import random

    if not sentences:
        raise ValueError("cannot sample sub-captions from a record without sentences")
    rng = rng or random.Random()
    n, captions = len(sentences), []
    for _ in range(num_captions):
        m = rng.randint(1, max_merged)
        if m == 1:
            pieces = [rng.choice(sentences)]
        elif rng.random() < 0.5:
            start = rng.randrange(n - m) if n > m else 0
            pieces = sentences[start : start + m] if n > m else list(sentences)
        elif n >= m:
            pieces = rng.sample(sentences, m)
        else:
            pieces = rng.choices(sentences, k=m)
        captions.append(". ".join(pieces))
    return captions


__all__ = ["DREAMLIP_KEYS", "caption_sentences", "rejoin_sentences", "sample_subcaptions", "split_sentences"]
