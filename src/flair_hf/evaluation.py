"""Zero-shot retrieval evaluation of a FLAIR model on a benchmark dataset, on one process or split across ranks.

One implementation serves `benchmarks/evaluate_retrieval.py` and evaluation during training:

- `encode_features`: global text embeddings of all captions, and the global embeddings and projected patch tokens of
  this rank's contiguous shard of the images. Across ranks (an initialised `torch.distributed` group), each rank
  encodes its shard of the captions and the text embeddings are gathered.
- `retrieval_scores`: `(images of this shard, all texts)` cosine scores in the `flair`, `topk` or `global` mode.
- `evaluate_retrieval`: both, the score rows gathered from all ranks, and `retrieval_metrics` (the original
  protocol) on every rank; with one process and a `cache_path`, the features are cached as safetensors.

Ranks hold equal copies of the weights (DDP) or shards of them (FSDP2: the root's own parameters are unsharded for
the evaluation; the encoder layers gather theirs in their forward).
"""

import contextlib
import functools
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .retrieval import autocast_context, flair_scores, global_scores, topk_scores

MODES = ("flair", "topk", "global")
# Published R@1 (FLAIR README; flair mode, amp): checkpoint -> benchmark -> (text->image, image->text)
PAPER_R1 = {
    "flair-cc3m-recap": {"coco": (37.7, 51.6), "flickr30k": (65.7, 78.7)},
    "flair-cc12m-recap": {"coco": (47.8, 64.1), "flickr30k": (75.4, 90.8)},
    "flair-yfcc15m-recap": {"coco": (51.2, 67.3), "flickr30k": (79.2, 93.3)},
    "flair-merged30m": {"coco": (53.3, 68.0), "flickr30k": (81.1, 94.7)},
}
# the sets those numbers were measured on (images, captions): COCO val2017 and the original's Flickr30k file
PAPER_SET_SIZES = {"coco": (5000, 25014), "flickr30k": (1014, 5070)}


def stable_rank_of(scores: torch.Tensor, columns: torch.Tensor, row_block: int = 2048) -> torch.Tensor:
    """0-based rank of `scores[r, columns[r]]` within row r, descending, ties broken by column index (a stable sort's
    order), counted on the scores' device in blocks of rows."""
    index = torch.arange(scores.shape[1], device=scores.device)
    ranks = []
    for start in range(0, scores.shape[0], row_block):
        rows, own = scores[start : start + row_block], columns[start : start + row_block, None]
        target = rows.gather(1, own)
        ranks.append(((rows > target) | ((rows == target) & (index < own))).sum(1))
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long, device=scores.device)


def retrieval_metrics(scores, text_to_image, k_values=(1, 5, 10)) -> dict:
    """Recall@K and ranks with the original protocol; `scores` `(T, B)` caption-by-image (tensor on any device, or
    array), `text_to_image` `(T,)`.

    text->image: the rank of the caption's own image; image->text: for every image that has captions, the best rank
    among its captions (that of its highest-scoring caption, the first among equals). R@K in percent (0-based rank
    < K); mean and median ranks 1-based.
    """
    scores = torch.as_tensor(scores)
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long, device=scores.device)
    t2i = stable_rank_of(scores, text_to_image)
    images = torch.unique(text_to_image)
    by_image = scores.t()[images]  # (images with captions, T)
    own = text_to_image[None, :] == images[:, None]
    best = by_image.masked_fill(~own, float("-inf")).amax(1, keepdim=True)
    first_best = (own & (by_image == best)).int().argmax(1)  # the first own caption with the best score
    i2t = stable_rank_of(by_image, first_best)
    result = {}
    for name, ranks in (("text_to_image", t2i), ("image_to_text", i2t)):
        ranks = ranks.cpu().numpy()
        for k in k_values:  # percentages to 4 decimals: 58.0, not 57.99999999999999
            result[f"{name}_R@{k}"] = round(float(100.0 * np.mean(ranks < k)), 4)
        result[f"{name}_mean_rank"] = float(np.mean(ranks + 1))
        result[f"{name}_median_rank"] = float(np.floor(np.median(ranks)) + 1)
    result["num_texts"], result["num_images"] = int(scores.shape[0]), int(scores.shape[1])
    return result


def flatten_captions(dataset) -> tuple[list[str], np.ndarray]:
    """All captions in original caption order and, for each, the row of its image."""
    pairs = sorted(
        (caption_id, caption, image)
        for image, (captions, ids) in enumerate(zip(dataset["captions"], dataset["caption_ids"]))
        for caption, caption_id in zip(captions, ids)
    )
    return [caption for _, caption, _ in pairs], np.array([image for _, _, image in pairs], dtype=np.int64)


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_range(count: int, rank: int, world_size: int) -> range:
    """Rank `rank`'s contiguous share of `count` items (the first `count % world_size` ranks get one more)."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def batch_ranges(shard: range, batch_size: int, count: int, world_size: int) -> list[tuple[range, bool]]:
    """`shard` in batches of `batch_size` (flagged `True`), then one-item stand-ins (`False`: run, output dropped) up
    to the batch count of the largest of `world_size` shards of `count` items, so that every rank makes as many model
    calls as the others (under FSDP each call gathers the layers' weights from every rank)."""
    batches = [(range(start, min(start + batch_size, shard.stop)), True) for start in range(shard.start, shard.stop, batch_size)]
    most = math.ceil(math.ceil(count / world_size) / batch_size)
    return batches + [(range(0, 1), False)] * (most - len(batches))


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (in rank order; row counts may differ) on every rank; CPU float32 out."""
    import torch.distributed as dist

    if _world()[1] == 1:
        return tensor
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([tensor.shape[0]], device=device))
    counts = [int(c) for c in counts]
    padded = tensor.new_zeros(max(counts), *tensor.shape[1:]).to(device)
    padded[: tensor.shape[0]] = tensor.to(device)
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:count] for part, count in zip(parts, counts)]).cpu()


@contextlib.contextmanager
def full_root_parameters(model):
    """Under FSDP2, unshard the root module's own parameters (projections, pooling head, embeddings) for the block."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6 keeps FSDP2 here
        from torch.distributed._composable.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


@torch.no_grad()
def encode_features(model, processor, dataset, captions, batch_size=64, device=None, autocast_dtype=None, progress=True) -> dict:
    """All captions' global embeddings; this rank's image shard's global embeddings and patch tokens (float32, CPU).

    The image shard is `shard_range(len(dataset), rank, world_size)`; every rank makes the same number of tower calls
    (`batch_ranges`), as FSDP needs.
    """
    device = torch.device(device) if device is not None else model.device
    rank, world_size = _world()
    texts, images = shard_range(len(captions), rank, world_size), shard_range(len(dataset), rank, world_size)
    show = progress and rank == 0
    text_embeds, image_embeds, image_tokens = [], [], []
    with autocast_context(device, autocast_dtype):
        text_batches = batch_ranges(texts, batch_size, len(captions), world_size)
        for batch, keep in tqdm(text_batches, desc="encoding texts", unit="batch", disable=not show):
            embeds = model.get_text_embeds(processor(text=captions[batch.start : batch.stop])["input_ids"].to(device))
            if keep:
                text_embeds.append(embeds.float().cpu())
        image_batches = batch_ranges(images, batch_size, len(dataset), world_size)
        for batch, keep in tqdm(image_batches, desc="encoding images", unit="batch", disable=not show):
            pixels = processor(images=dataset[batch.start : batch.stop]["image"])["pixel_values"]
            embeds, tokens = model.get_image_and_token_features(pixels.to(device))
            if keep:
                image_embeds.append(embeds.float().cpu())
                image_tokens.append(tokens.float().cpu())
    dim = model.config.projection_dim
    return {
        "text_embeds": gather_rows(torch.cat(text_embeds) if text_embeds else torch.zeros(0, dim)),
        "image_embeds": torch.cat(image_embeds) if image_embeds else torch.zeros(0, dim),
        "image_token_embeds": torch.cat(image_tokens) if image_tokens else torch.zeros(0, 0, dim),
    }


def retrieval_scores(
    pooling, features: dict, mode="flair", topk=128, device=None, autocast_dtype=None, image_block=64, progress=True
) -> torch.Tensor:
    """`(shard images, all texts)` cosine scores for `mode`; FLAIR modes run in image blocks with a progress bar."""
    if mode not in MODES:
        raise ValueError(f"unknown retrieval mode {mode!r}: use one of {', '.join(MODES)}")
    text, images = features["text_embeds"], features["image_embeds"]
    if mode == "global" or len(images) == 0:
        return global_scores(images, text)
    blocks = []
    show = progress and _world()[0] == 0
    kwargs = {"device": device, "autocast_dtype": autocast_dtype}
    for start in tqdm(range(0, len(images), image_block), desc=f"scoring ({mode})", unit="block", disable=not show):
        tokens = features["image_token_embeds"][start : start + image_block]
        if mode == "flair":
            blocks.append(flair_scores(pooling, text, tokens, **kwargs))
        else:
            blocks.append(topk_scores(pooling, text, images[start : start + image_block], tokens, topk, **kwargs))
    return torch.cat(blocks)


def _cached_features(cache_path, encode) -> tuple[dict, bool]:
    """Features from `cache_path` when it exists, else `encode()` written there atomically; and whether it was hit."""
    from safetensors.torch import load_file, save_file

    if cache_path is None:
        return encode(), False
    cache_path = Path(cache_path)
    if cache_path.is_file():
        return load_file(cache_path), True
    features = encode()
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    partial = cache_path.with_suffix(f".tmp{os.getpid()}")
    save_file(features, partial)
    os.replace(partial, cache_path)
    return features, False


def evaluate_retrieval(
    model,
    processor,
    dataset,
    mode: str = "flair",
    topk: int = 128,
    batch_size: int = 64,
    device=None,
    autocast_dtype: torch.dtype | None = None,
    cache_path=None,
    progress: bool = True,
) -> dict:
    """Retrieval metrics of `model` on a benchmark `dataset` (`flair_hf.retrieval_data` schema), every rank the same.

    Returns `{"metrics", "num_images", "num_texts", "timings"}`. `cache_path` (one process only) caches the features.
    """
    if cache_path is not None and _world()[1] > 1:
        raise ValueError("feature caching is for single-process evaluation; pass cache_path=None across ranks")
    device = torch.device(device) if device is not None else model.device
    captions, text_to_image = flatten_captions(dataset)
    was_training = model.training
    model.eval()
    timings = {}
    try:
        with full_root_parameters(model):
            start = time.perf_counter()
            encode = functools.partial(encode_features, model, processor, dataset, captions, batch_size, device, autocast_dtype, progress)
            features, timings["cached_features"] = _cached_features(cache_path, encode)
            timings["encode_seconds"] = time.perf_counter() - start
            start = time.perf_counter()
            pooling = model.text_conditioned_pooling
            scores = retrieval_scores(pooling, features, mode, topk, device, autocast_dtype, progress=progress)
            scores = gather_rows(scores)
            timings["score_seconds"] = time.perf_counter() - start
    finally:
        model.train(was_training)
    metrics = retrieval_metrics(scores.to(device).t(), text_to_image)  # ranks counted on the device
    return {"metrics": metrics, "num_images": len(dataset), "num_texts": len(captions), "timings": timings}


__all__ = [
    "MODES",
    "PAPER_R1",
    "PAPER_SET_SIZES",
    "encode_features",
    "evaluate_retrieval",
    "flatten_captions",
    "gather_rows",
    "retrieval_metrics",
    "retrieval_scores",
    "shard_range",
]
