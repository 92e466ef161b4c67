"""FLAIR's training loss: text-conditioned sigmoid loss (TCS) plus the optional multi-positive sigmoid loss (MPS).

For a batch of `B` images with `K` captions each (caption `k` of image `i` at row `i*K + k` of the text features):

- TCS scores every image against its own `K` captions and one random caption of every other image (`B + K - 1`
  texts), each through the text-conditioned pooling head, with sigmoid labels (+1 own, -1 other); the sum over that
  `(B, B + K - 1)` grid is divided by `B + K - 1`.
- MPS scores the global image embeddings against all `B * K` texts (+1 for the image's own `K`); the sum over the
  `(B, B * K)` grid is divided by `B * K`.
- With MPS, the loss is `(TCS + MPS) / 2`.
- Across ranks (`distributed_flair_loss`), every other rank's texts add a negatives-only TCS term (one random caption
  of each remote image per local image) to the TCS sum, still divided by the local `B + K - 1`; MPS stays local.

`logit_scale` is passed already exponentiated, as in the original.
"""

import torch
import torch.nn.functional as F


def sample_text_indices(batch_size: int, captions_per_image: int, generator: torch.Generator | None = None):
    """Per image, the rows it is scored against: its own `K` captions plus one random caption of each other image.

    Returns `(offsets, indices)`: `offsets` `(B, B - 1)` is the caption taken from each other image in increasing
    image order, `indices` `(B, B + K - 1)` the sorted text rows (own captions at columns `i .. i + K - 1`).
    """
    K = captions_per_image
    offsets = torch.randint(0, K, (batch_size, batch_size - 1), generator=generator)
    return offsets, text_indices_from_offsets(offsets, K)


def text_indices_from_offsets(offsets: torch.Tensor, captions_per_image: int) -> torch.Tensor:
    """`(B, B - 1)` caption offsets of the other images -> sorted `(B, B + K - 1)` text rows per image."""
    batch_size, K = offsets.shape[0], captions_per_image
    images = torch.arange(batch_size, device=offsets.device)
    others = images.expand(batch_size, batch_size)[~torch.eye(batch_size, dtype=torch.bool, device=offsets.device)]
    negatives = others.view(batch_size, batch_size - 1) * K + offsets
    positives = images[:, None] * K + torch.arange(K, device=offsets.device)
    return torch.cat([negatives, positives], dim=1).sort(dim=1).values


def text_conditioned_logits(pooling, keys_values, text_features, text_indices, logit_scale, logit_bias):
    """`(B, M)` logits of each image's pooled embedding conditioned on its `M` selected texts.

    `pooling` is `FlairModel.text_conditioned_pooling`; `keys_values` its `project_keys_values(image_tokens)` for the
    `B` images; `text_features` `(N, D)` unnormalised text embeddings (the queries); `text_indices` `(B, M)` rows.
    """
    queries = pooling.project_queries(text_features)[:, text_indices].transpose(0, 1)  # (B, heads, M, hd)
    pooled, _ = pooling.attend(queries, *keys_values)
    texts = F.normalize(text_features, dim=-1)[text_indices]
    return logit_scale * (F.normalize(pooled, dim=-1) * texts).sum(-1) + logit_bias


def owned_by_image(text_rows: torch.Tensor, captions_per_image: int, num_images: int) -> torch.Tensor:
    """`(B, M)` mask: text row `text_rows[i, j]` (or `text_rows[0, j]`, broadcast) is a caption of image `i`."""
    images = torch.arange(num_images, device=text_rows.device)[:, None]
    return torch.div(text_rows, captions_per_image, rounding_mode="floor") == images


def sigmoid_loss_sum(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """`sum(-logsigmoid(label * logit))` with labels +1 where `positives`, else -1."""
    labels = positives.to(logits.dtype) * 2 - 1
    return -F.logsigmoid(labels * logits).sum()


def sample_remote_text_indices(num_images: int, num_remote_images: int, captions_per_image: int, generator=None):
    """Per local image, one random caption row of every image of another rank's batch: `(B, B_remote)`."""
    offsets = torch.randint(0, captions_per_image, (num_images, num_remote_images), generator=generator)
    return torch.arange(num_remote_images) * captions_per_image + offsets


def text_conditioned_sigmoid_loss(
    pooling, image_tokens, text_features, text_indices, logit_scale, logit_bias, captions_per_image,
    remote_text_features=(), remote_text_indices=(),
):  # fmt: skip
    """TCS over the local `(B, B + K - 1)` grid plus negatives-only grids over other ranks' texts, divided by `B + K - 1`."""
    keys_values = pooling.project_keys_values(image_tokens)  # once, for the local and every remote term
    logits = text_conditioned_logits(pooling, keys_values, text_features, text_indices, logit_scale, logit_bias)
    total = sigmoid_loss_sum(logits, owned_by_image(text_indices, captions_per_image, logits.shape[0]))
    for remote, indices in zip(remote_text_features, remote_text_indices, strict=True):
        remote_logits = text_conditioned_logits(pooling, keys_values, remote, indices.to(remote.device), logit_scale, logit_bias)
        total = total + sigmoid_loss_sum(remote_logits, torch.zeros_like(remote_logits, dtype=torch.bool))
    return total / text_indices.shape[1]


def multi_positive_sigmoid_loss(image_features, text_features, logit_scale, logit_bias, captions_per_image):
    """MPS over the `(B, B * K)` global grid, divided by `B * K`."""
    logits = logit_scale * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).t() + logit_bias
    rows = torch.arange(text_features.shape[0], device=logits.device)[None, :]
    return sigmoid_loss_sum(logits, owned_by_image(rows, captions_per_image, logits.shape[0])) / text_features.shape[0]


def flair_loss(
    pooling,
    image_features,
    image_tokens,
    text_features,
    logit_scale,
    logit_bias,
    captions_per_image: int,
    text_indices: torch.Tensor | None = None,
    add_mps_loss: bool = True,
    generator: torch.Generator | None = None,
    remote_text_features=(),
    remote_text_indices=None,
) -> torch.Tensor:
    """The FLAIR loss for one process's batch.

    `remote_text_features` are other ranks' text features (with gradients, see `distributed_flair_loss`): each adds a
    negatives-only TCS term (one random caption of every remote image per local image). Negatives are sampled with
    `generator` unless `text_indices` / `remote_text_indices` are given.
    """
    batch_size, K = image_features.shape[0], captions_per_image
    if text_features.shape[0] != batch_size * K:
        raise ValueError(
            f"expected {K} captions per image: {batch_size} images need {batch_size * K} text rows, "
            f"got {text_features.shape[0]}"
        )
    if text_indices is None:
        text_indices = sample_text_indices(batch_size, K, generator)[1]
    if remote_text_indices is None:
        remote_text_indices = [sample_remote_text_indices(batch_size, r.shape[0] // K, K, generator) for r in remote_text_features]
    loss = text_conditioned_sigmoid_loss(
        pooling, image_tokens, text_features, text_indices.to(text_features.device), logit_scale, logit_bias, K,
        remote_text_features, remote_text_indices,
    )  # fmt: skip
    if add_mps_loss:
        loss = (loss + multi_positive_sigmoid_loss(image_features, text_features, logit_scale, logit_bias, K)) / 2
    return loss


def distributed_flair_loss(pooling, image_features, image_tokens, text_features, logit_scale, logit_bias, captions_per_image, **kwargs):
    """`flair_loss` with every other rank's texts as extra negatives.

    Equivalent to the original's ring exchange: text features are all-gathered *with gradients*
    (`torch.distributed.nn.functional.all_gather`, whose backward sums each rank's gradient contributions back to the
    rank that owns the texts), so the gradients of the mean loss over ranks equal the single-process computation of
    the same formula. Without an initialised process group (or with one rank) this is `flair_loss`.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flair_loss(pooling, image_features, image_tokens, text_features, logit_scale, logit_bias, captions_per_image, **kwargs)
    from torch.distributed.nn.functional import all_gather

    gathered = all_gather(text_features)
    remote = [texts for rank, texts in enumerate(gathered) if rank != dist.get_rank()]
    return flair_loss(
        pooling, image_features, image_tokens, text_features, logit_scale, logit_bias, captions_per_image,
        remote_text_features=remote, **kwargs,
    )  # fmt: skip


__all__ = [
    "distributed_flair_loss",
    "flair_loss",
    "sample_remote_text_indices",
    "multi_positive_sigmoid_loss",
    "sample_text_indices",
    "text_conditioned_logits",
    "text_conditioned_sigmoid_loss",
    "text_indices_from_offsets",
]
