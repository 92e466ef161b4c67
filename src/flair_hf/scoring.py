"""How FLAIR scores, and how the work is cut: cosines, logits, blocks of (image, text) pairs, groups of texts.

Written once for the model, the loss, retrieval, dense maps, segmentation and the ONNX runtime. Nothing here
imports torch: each function takes torch tensors or NumPy arrays alike (the ONNX runtime runs without torch).

- `pairwise_cosine(a, b)`: every row of `a` against every row of `b`, the CLIP-style (global) cosine;
- `flair_cosine(pooled, texts)`: each text-conditioned image embedding against the text that pooled it;
- `logits(cosines, logit_scale, logit_bias)`: `logit_scale * cosine (+ logit_bias)`, FLAIR's logits with the bias,
  CLIP's without;
- `pair_blocks(num_images, num_texts)`: the `(images, texts)` index slices of every block of pairs, image chunk by
  image chunk, so that memory is bounded by the chunk sizes;
- `length_sorted_groups(lengths, calls)`: texts sorted by length into calls, each cut at its own longest text.
"""

import numpy as np

PAIR_IMAGE_CHUNK_SIZE = 16  # images x texts per block of (image, text) pairs: with 8 heads and 197 key slots, one
PAIR_TEXT_CHUNK_SIZE = 1024  # block's attention weights take 16 * 8 * 1024 * 197 * 4 bytes = 103 MB in float32


def l2_normalize(x, eps: float = 1e-12):
    """`x / max(|x|, eps)` along the last axis (`torch.nn.functional.normalize`'s arithmetic), tensor or array."""
    if isinstance(x, np.ndarray):
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def pairwise_cosine(a, b):
    """Cosine of every row of `a` `(..., N, D)` with every row of `b` `(M, D)`: `(..., N, M)`."""
    return l2_normalize(a) @ l2_normalize(b).T


def flair_cosine(text_conditioned_image_embeds, text_embeds):
    """Cosine of each image's embedding pooled for text `t` `(..., T, D)` with text `t`'s embedding (`(T, D)`, or
    gathered per image `(..., T, D)`): `(..., T)`."""
    return (l2_normalize(text_conditioned_image_embeds) * l2_normalize(text_embeds)).sum(-1)


def logits(cosines, logit_scale, logit_bias=None):
    """`logit_scale * cosines + logit_bias` (FLAIR's logits; CLIP's have no bias). `logit_scale` already
    exponentiated, as the original passes it."""
    scaled = logit_scale * cosines
    return scaled if logit_bias is None else scaled + logit_bias


def chunks(total: int, size: int) -> list[slice]:
    """`range(total)` as consecutive slices of at most `size`."""
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


def pair_blocks(
    num_images: int, num_texts: int, image_chunk_size: int = PAIR_IMAGE_CHUNK_SIZE, text_chunk_size: int = PAIR_TEXT_CHUNK_SIZE
):
    """Every (image, text) pair in blocks: yields the `(images, texts)` index slices of each block, all of one image
    chunk's blocks before the next chunk's (so that its keys and values are computed once)."""
    for images in chunks(num_images, image_chunk_size):
        for texts in chunks(num_texts, text_chunk_size):
            yield images, texts


def length_sorted_groups(lengths, calls: int) -> list[np.ndarray]:
    """Text indices sorted by length (stable), in `calls` groups of near-equal size (the longer ones last), so that
    each group can be cut at its own longest text."""
    return np.array_split(np.argsort(np.asarray(lengths), kind="stable"), calls)


__all__ = [
    "PAIR_IMAGE_CHUNK_SIZE", "PAIR_TEXT_CHUNK_SIZE", "chunks", "flair_cosine", "l2_normalize", "length_sorted_groups",
    "logits", "pair_blocks", "pairwise_cosine",
]  # fmt: skip
