"""FLAIR's training loss: text-conditioned sigmoid loss (TCS) plus the optional multi-positive sigmoid loss (MPS).

For a batch of `B` images with `K` captions each (caption `k` of image `i` at row `i*K + k` of the text features):

- TCS scores every image against its own `K` captions and one random caption of every other image (`B + K - 1`
  texts, `text_indices` `(B, B + K - 1)`), each through the text-conditioned pooling head, with sigmoid labels
  (+1 own, -1 other); the sum over that grid is divided by `B + K - 1`.
- MPS scores the global image embeddings against all `B * K` texts (+1 for the image's own `K`); the sum over the
  `(B, B * K)` grid is divided by `B * K`.
- With MPS, the loss is `(TCS + MPS) / 2`.

Across ranks (`distributed_flair_loss`), as the original's ring: rank `r`'s loss is its local loss plus, for every
other rank `s`, a negatives-only term over rank `s`'s texts:

- TCS part: local image `i` is pooled with, and scored against, the `B + K - 1` texts that rank `s`'s image `i` was
  scored against (row `i` of rank `s`'s `text_indices` applied to rank `s`'s texts), divided by `B + K - 1`;
- MPS part (with MPS): the local global image embeddings against all `B * K` texts of rank `s`, divided by `B * K`;
- with MPS the term is `(TCS part + MPS part) / 2`, else the TCS part.

`logit_scale` is passed already exponentiated, as in the original.
"""

import torch
import torch.nn.functional as F

from .scoring import flair_cosine, logits, pairwise_cosine


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
    return logits(flair_cosine(pooled, text_features[text_indices]), logit_scale, logit_bias)


def global_logits(image_features, text_features, logit_scale, logit_bias):
    """`(B, N)` CLIP-style logits of the global image embeddings against all texts, with the bias."""
    return logits(pairwise_cosine(image_features, text_features), logit_scale, logit_bias)


def owned_by_image(text_rows: torch.Tensor, captions_per_image: int, num_images: int) -> torch.Tensor:
    """`(B, M)` mask: text row `text_rows[i, j]` (or `text_rows[0, j]`, broadcast) is a caption of image `i`."""
    images = torch.arange(num_images, device=text_rows.device)[:, None]
    return torch.div(text_rows, captions_per_image, rounding_mode="floor") == images


def sigmoid_loss_sum(logits: torch.Tensor, positives: torch.Tensor | None = None) -> torch.Tensor:
    """`sum(-logsigmoid(label * logit))` with labels +1 where `positives`, else -1 (all -1 when `positives` is None)."""
    if positives is None:
        return -F.logsigmoid(-logits).sum()
    labels = positives.to(logits.dtype) * 2 - 1
    return -F.logsigmoid(labels * logits).sum()


def text_conditioned_sigmoid_loss(pooling, keys_values, text_features, text_indices, logit_scale, logit_bias, captions_per_image):
    """TCS over the local `(B, B + K - 1)` grid, divided by `B + K - 1`."""
    logits = text_conditioned_logits(pooling, keys_values, text_features, text_indices, logit_scale, logit_bias)
    return sigmoid_loss_sum(logits, owned_by_image(text_indices, captions_per_image, logits.shape[0])) / logits.shape[1]


def multi_positive_sigmoid_loss(image_features, text_features, logit_scale, logit_bias, captions_per_image):
    """MPS over the `(B, B * K)` global grid, divided by `B * K`."""
    logits = global_logits(image_features, text_features, logit_scale, logit_bias)
    rows = torch.arange(text_features.shape[0], device=logits.device)[None, :]
    return sigmoid_loss_sum(logits, owned_by_image(rows, captions_per_image, logits.shape[0])) / text_features.shape[0]


def remote_negatives_loss(
    pooling, keys_values, image_features, remote_text_features, remote_text_indices, logit_scale, logit_bias, add_mps_loss,
    add_tcs_loss: bool = True,
):  # fmt: skip
    """One other rank's negatives-only term: TCS over that rank's `text_indices` rows (row `i` for local image `i`)
    and/or the global grid against all its texts (MPS), each part normalised as locally, the two averaged."""
    terms = []
    if add_tcs_loss:
        logits = text_conditioned_logits(pooling, keys_values, remote_text_features, remote_text_indices, logit_scale, logit_bias)
        terms.append(sigmoid_loss_sum(logits) / logits.shape[1])
    if add_mps_loss:
        mps = sigmoid_loss_sum(global_logits(image_features, remote_text_features, logit_scale, logit_bias))
        terms.append(mps / remote_text_features.shape[0])
    return sum(terms) / len(terms)


def check_batch_shapes(batch_size: int, captions_per_image: int, text_features, text_indices, source: str = "") -> None:
    """Raise a clear error unless `text_features` has `B * K` rows and `text_indices` is `(B, B + K - 1)`."""
    K = captions_per_image
    if text_features.shape[0] != batch_size * K:
        raise ValueError(
            f"expected {K} captions per image{source}: {batch_size} images need {batch_size * K} text rows, "
            f"got {text_features.shape[0]}"
        )
    if text_indices is not None and tuple(text_indices.shape) != (batch_size, batch_size + K - 1):
        raise ValueError(
            f"text_indices{source} must be ({batch_size}, {batch_size + K - 1}) for {batch_size} images with {K} "
            f"captions each, got {tuple(text_indices.shape)}"
        )


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
    remote_text_indices=(),
    add_tcs_loss: bool = True,
) -> torch.Tensor:
    """The FLAIR loss for one process's batch: the local loss plus one negatives-only term per other rank.

    The local loss is the text-conditioned sigmoid loss (TCS) and the multi-positive sigmoid loss (MPS), averaged;
    `add_mps_loss=False` keeps TCS alone, `add_tcs_loss=False` MPS alone (the global, SigLIP-style loss).

    `remote_text_features` are other ranks' text features (with gradients, see `distributed_flair_loss`) and
    `remote_text_indices` those ranks' own `text_indices`, in the same order; every rank has the same `B` and `K`.
    Local negatives are sampled with `generator` unless `text_indices` is given.
    """
    if not (add_tcs_loss or add_mps_loss):
        raise ValueError("add_tcs_loss=False needs add_mps_loss=True: the loss needs at least one of its two terms")
    batch_size, K = image_features.shape[0], captions_per_image
    check_batch_shapes(batch_size, K, text_features, text_indices)
    if len(remote_text_features) != len(remote_text_indices):
        raise ValueError(
            f"got {len(remote_text_features)} remote text feature sets but {len(remote_text_indices)} remote "
            "text_indices: pass each other rank's own text_indices with its texts"
        )
    for features, indices in zip(remote_text_features, remote_text_indices):
        check_batch_shapes(batch_size, K, features, indices, " of another rank (per-rank batch sizes must be equal)")
    if text_indices is None:
        text_indices = sample_text_indices(batch_size, K, generator)[1]
    keys_values = pooling.project_keys_values(image_tokens) if add_tcs_loss else None  # once, for every term
    device = text_features.device
    terms = []
    if add_tcs_loss:
        terms.append(text_conditioned_sigmoid_loss(pooling, keys_values, text_features, text_indices.to(device), logit_scale, logit_bias, K))
    if add_mps_loss:
        terms.append(multi_positive_sigmoid_loss(image_features, text_features, logit_scale, logit_bias, K))
    loss = sum(terms) / len(terms)
    for features, indices in zip(remote_text_features, remote_text_indices):
        loss = loss + remote_negatives_loss(
            pooling, keys_values, image_features, features, indices.to(features.device), logit_scale, logit_bias,
            add_mps_loss, add_tcs_loss,
        )  # fmt: skip
    return loss


def distributed_flair_loss(
    pooling,
    image_features,
    image_tokens,
    text_features,
    logit_scale,
    logit_bias,
    captions_per_image,
    text_indices: torch.Tensor | None = None,
    add_mps_loss: bool = True,
    generator: torch.Generator | None = None,
    add_tcs_loss: bool = True,
):
    """`flair_loss` with every other rank's texts, scored through that rank's own `text_indices`, as negatives.

    Each rank samples (or is given) its own `text_indices`; they are all-gathered (integers) together with the text
    features, which are gathered *with gradients* (an autograd all-gather whose backward reduce-scatters each rank's
    contributions back to the rank that owns the texts), so the gradients of the summed per-rank losses
    equal a single-process computation of the same formula; every other rank contributes exactly once, as in the
    original's bidirectional ring. Per-rank batch sizes must be equal. Without an initialised process group (or with
    one rank) this is `flair_loss`.
    """
    import torch.distributed as dist

    batch_size, K = image_features.shape[0], captions_per_image
    if text_indices is None:
        text_indices = sample_text_indices(batch_size, K, generator)[1]
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flair_loss(
            pooling, image_features, image_tokens, text_features, logit_scale, logit_bias, K, text_indices, add_mps_loss,
            add_tcs_loss=add_tcs_loss,
        )  # fmt: skip
    from torch.distributed import _functional_collectives as collectives

    # autograd-aware all-gather (backward: reduce-scatter); renamed in recent torch releases
    all_gather_autograd = getattr(collectives, "all_gather_single_autograd", None) or collectives.all_gather_tensor_autograd
    device, world_size, rank = text_features.device, dist.get_world_size(), dist.get_rank()
    shapes = [torch.zeros(2, dtype=torch.long, device=device) for _ in range(world_size)]
    dist.all_gather(shapes, torch.tensor([batch_size, text_features.shape[0]], device=device))
    if any(shape.tolist() != shapes[rank].tolist() for shape in shapes):
        sizes = ", ".join(f"rank {r}: {s[0]} images / {s[1]} texts" for r, s in enumerate(shapes))
        raise ValueError(f"the cross-rank FLAIR loss needs the same batch size on every rank ({sizes}): drop the last uneven batch")
    check_batch_shapes(batch_size, K, text_features, text_indices)
    gathered_indices = [torch.empty_like(text_indices, device=device) for _ in range(world_size)]
    dist.all_gather(gathered_indices, text_indices.to(device))
    gathered_texts = all_gather_autograd(text_features, gather_dim=0, group=dist.group.WORLD).chunk(world_size)
    others = [s for s in range(world_size) if s != rank]
    return flair_loss(
        pooling, image_features, image_tokens, text_features, logit_scale, logit_bias, K, text_indices, add_mps_loss,
        remote_text_features=[gathered_texts[s] for s in others],
        remote_text_indices=[gathered_indices[s] for s in others], add_tcs_loss=add_tcs_loss,
    )  # fmt: skip


__all__ = [
    "distributed_flair_loss",
    "flair_loss",
    "global_logits",
    "multi_positive_sigmoid_loss",
    "remote_negatives_loss",
    "sample_text_indices",
    "text_conditioned_logits",
    "text_conditioned_sigmoid_loss",
    "text_indices_from_offsets",
]
