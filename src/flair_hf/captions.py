"""Caption text helpers shared by training and evaluation (FLAIR's sentence splitting)."""

import re

_SENTENCE_BREAK = re.compile(r"\n|</s>|\.")


def split_sentences(text: str) -> list[str]:
    """Split on newlines, the literal `</s>` and every `.` (numbers like `3.5` too, as the original); strip; drop empties."""
    return [piece.strip() for piece in _SENTENCE_BREAK.split(text) if piece.strip()]


def rejoin_sentences(text: str) -> str:
    """The long-caption text the original evaluation fed the tokenizer: `split_sentences` joined with `". "`."""
    return ". ".join(split_sentences(text))


__all__ = ["rejoin_sentences", "split_sentences"]
