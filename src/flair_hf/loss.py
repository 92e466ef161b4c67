"""FLAIR's training loss: text-conditioned sigmoid loss (TCS) plus the optional multi-positive sigmoid loss (MPS).

For a batch of `B` images with `K` captions each (caption `k` of image `i` at row `i*K + k` of the text features):

- TCS scores every image against its own `K` captions and one random caption of every other image (`B + K - 1`
  texts), each through the text-conditioned pooling head, with sigmoid labels (+1 own, -1 other); the sum over that
  `(B, B + K - 1)` grid is divided by `B + K - 1`.
- MPS scores the global image embeddings against all `B * K` texts (+1 for the image's own `K`); the sum over the
  `(B, B * K)` grid is divided by `B * K`.
- With MPS, the loss is `(TCS + MPS) / 2`.

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


def text_conditioned_logits(pooling, image_tokens, text_features, text_indices, logit_scale, logit_bias):
    """`(B, M)` logits of each image's pooled embedding conditioned on its `M` selected texts.

    `pooling` is `FlairModel.text_conditioned_pooling`; `image_tokens` `(B, L, D)` projected patch tokens;
    `text_features` `(N, D)` unnormalised text embeddings (the queries); `text_indices` `(B, M)` rows per image.
    """
    queries = pooling.project_queries(text_features)[:, text_indices].transpose(0, 1)  # (B, heads, M, hd)
    keys, values = pooling.project_keys_values(image_tokens)
    pooled, _ = pooling.attend(queries, keys, values)
    texts = F.normalize(text_features, dim=-1)[text_indices]
    return logit_scale * (F.normalize(pooled, dim=-1) * texts).sum(-1) + logit_bias


def sigmoid_loss_sum(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """`sum(-logsigmoid(label * logit))` with labels +1 where `positives`, else -1."""
    labels = positives.to(logits.dtype) * 2 - 1
    return -F.logsigmoid(labels * logits).sum()


def text_conditioned_sigmoid_loss(pooling, image_tokens, text_features, text_indices, logit_scale, logit_bias, captions_per_image):
    """TCS over the `(B, B + K - 1)` grid given by `text_indices`, divided by `B + K - 1`."""
    logits = text_conditioned_logits(pooling, image_tokens, text_features, text_indices, logit_scale, logit_bias)
    owners = torch.div(text_indices, captions_per_image, rounding_mode="floor")
    positives = owners == torch.arange(logits.shape[0], device=logits.device)[:, None]
    return sigmoid_loss_sum(logits, positives) / text_indices.shape[1]


def multi_positive_sigmoid_loss(image_features, text_features, logit_scale, logit_bias, captions_per_image):
    """MPS over the `(B, B * K)` global grid, divided by `B * K`."""
    logits = logit_scale * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).t() + logit_bias
    owners = torch.arange(text_features.shape[0], device=logits.device) // captions_per_image
    positives = owners[None, :] == torch.arange(logits.shape[0], device=logits.device)[:, None]
    return sigmoid_loss_sum(logits, positives) / text_features.shape[0]


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
) -> torch.Tensor:
    """The FLAIR loss on one process's batch; negatives are sampled unless `text_indices` is given."""
    if text_features.shape[0] != image_features.shape[0] * captions_per_image:
        raise ValueError(
            f"expected {captions_per_image} captions per image: {image_features.shape[0]} images need "
            f"{image_features.shape[0] * captions_per_image} text rows, got {text_features.shape[0]}"
        )
    if text_indices is None:
        text_indices = sample_text_indices(image_features.shape[0], captions_per_image, generator)[1]
    text_indices = text_indices.to(text_features.device)
    loss = text_conditioned_sigmoid_loss(
        pooling, image_tokens, text_features, text_indices, logit_scale, logit_bias, captions_per_image
    )
    if add_mps_loss:
        mps = multi_positive_sigmoid_loss(image_features, text_features, logit_scale, logit_bias, captions_per_image)
        loss = (loss + mps) / 2
    return loss


__all__ = [
    "flair_loss",
    "multi_positive_sigmoid_loss",
    "sample_text_indices",
    "text_conditioned_logits",
    "text_conditioned_sigmoid_loss",
    "text_indices_from_offsets",
]
