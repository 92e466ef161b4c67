"""All-pairs image-text scoring for retrieval: FLAIR (text-conditioned), top-k re-scoring, and global CLIP-style.

Scores are cosine similarities `(B images, T texts)`; `logit_scale` and `logit_bias` are monotonic and do not change
rankings. `flair_scores` is the fast path: text queries are projected and normalised once, keys/values once per
image, images are batched and attention runs through the model's attention implementation (SDPA by default) with
the zero-attention slot, in chunks so peak memory depends on the chunk sizes, not on `B x T`.
The original's own loop (one pooling-block call per image, all texts as queries) is the reference in
`conversion/original_forward.py`.
"""


import torch
import torch.nn.functional as F

from .scoring import PAIR_IMAGE_CHUNK_SIZE, PAIR_TEXT_CHUNK_SIZE, pairwise_cosine


def global_scores(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """CLIP-style cosine similarities `(B, T)` of global embeddings."""
    return pairwise_cosine(image_embeds.float(), text_embeds.float())


def autocast_context(device: torch.device | str, dtype: torch.dtype | None):
    """`torch.autocast` to `dtype` on `device`'s type, or no autocast when `dtype` is None."""
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


def output_norm_factors(pooling, blocks: int = 8) -> tuple[list[torch.Tensor], torch.Tensor]:
    """What the cosines need of the pooling head's output projection `y = W a + b` without computing `y`.

    `||y||^2 = ||a L||^2 + 2 a.c + b.b` with `L` the lower Cholesky factor of `W^T W` and `c = W^T b`; `L` applied in
    `blocks` column blocks, each from its diagonal down, costs `(blocks + 1) / (2 blocks)` of `W`'s multiply-adds.
    Returns the column blocks (the first with `c` appended as a last column) and `b.b`, float32.
    """
    weight, bias = pooling.out_proj.weight.double(), pooling.out_proj.bias.double()
    lower = torch.linalg.cholesky(weight.t() @ weight)
    dim = lower.shape[0]
    blocks = blocks if dim % blocks == 0 else 1
    width = dim // blocks
    columns = [lower[j * width :, j * width : (j + 1) * width] for j in range(blocks)]
    columns[0] = torch.cat([columns[0], (weight.t() @ bias)[:, None]], dim=1)
    return [column.float() for column in columns], (bias @ bias).float()


def _squared_output_norms(attention: torch.Tensor, columns: list[torch.Tensor], bias_norm: torch.Tensor) -> torch.Tensor:
    """`||W a + b||^2` for the rows of `attention` `(N, D)` (the heads' weighted values), from `output_norm_factors`."""
    width = columns[-1].shape[1]
    first = attention @ columns[0].to(attention.dtype)
    squared = first[:, -1].float() * 2 + bias_norm
    for j, column in enumerate(columns):
        block = first[:, :-1] if j == 0 else attention[:, j * width :] @ column.to(attention.dtype)
        squared += block.float().square_().sum(-1)
    return squared


@torch.no_grad()
def flair_scores(
    pooling,
    text_embeds: torch.Tensor,
    image_token_embeds: torch.Tensor,
    image_chunk_size: int = PAIR_IMAGE_CHUNK_SIZE,
    text_chunk_size: int = PAIR_TEXT_CHUNK_SIZE,
    autocast_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """FLAIR cosine similarities `(B, T)`: `cos(pool(text_j | image_i), text_j)` for every pair.

    `pooling` is `FlairModel.text_conditioned_pooling`; `text_embeds` `(T, D)` and `image_token_embeds` `(B, L, D)`
    may live on the CPU and are moved to `device` (default: the pooling head's) chunk by chunk. `autocast_dtype`
    (e.g. `torch.bfloat16` on CUDA) runs the attention under autocast; scores are returned as float32 on the CPU.
    The output projection is never applied: `text_j . (W a + b) = a . (W^T text_j) + text_j . b`, and the norm comes
    from `output_norm_factors` (about half the multiply-adds).

    `pooling` may also be an exported head with `flair_cosines(text_embeds, image_token_embeds)` (NumPy in and out,
    e.g. `flair_hf.onnx.FlairOnnxModel`), which then scores every pair itself, in its own blocks and precision.
    """
    if hasattr(pooling, "flair_cosines"):
        if autocast_dtype is not None:
            raise ValueError("autocast_dtype is for a PyTorch pooling head; an export runs in the precision it was exported in")
        return torch.from_numpy(pooling.flair_cosines(text_embeds.float().cpu().numpy(), image_token_embeds.float().cpu().numpy()))
    device = torch.device(device) if device is not None else pooling.q_proj.weight.device
    scores = torch.empty(image_token_embeds.shape[0], text_embeds.shape[0], device=device)  # copied to the CPU once
    columns, bias_norm = output_norm_factors(pooling)
    columns, bias_norm = [column.to(device) for column in columns], bias_norm.to(device)
    with autocast_context(device, autocast_dtype):
        normalized = F.normalize(text_embeds.to(device).float(), dim=-1)
        projected_texts = normalized @ pooling.out_proj.weight.float()  # W^T text_j, as rows
        text_bias = normalized @ pooling.out_proj.bias.float()
        blocks = pooling.pair_blocks(text_embeds, image_token_embeds, image_chunk_size, text_chunk_size, device)
        for images, texts, queries, keys, values in blocks:
            attention = pooling.attention_output(queries, keys, values)[0]
            squared = _squared_output_norms(attention.flatten(0, 1), columns, bias_norm).view(attention.shape[:2])
            dots = attention.float().mul_(projected_texts[texts]).sum(-1)  # in place: a temporary
            scores[images, texts] = (dots + text_bias[texts]) / squared.clamp_min(0).sqrt().clamp_min(1e-12)
    return scores.cpu()


@torch.no_grad()
def topk_scores(
    pooling,
    text_embeds: torch.Tensor,
    image_embeds: torch.Tensor,
    image_token_embeds: torch.Tensor,
    k: int,
    **flair_kwargs,
) -> torch.Tensor:
    """Global similarity picks the `k` best texts per image; FLAIR re-scores only those, the rest get `-inf`."""
    coarse = global_scores(image_embeds, text_embeds)
    k = min(k, text_embeds.shape[0])
    candidates = coarse.topk(k, dim=1).indices
    scores = torch.full_like(coarse, float("-inf"))
    for i, tokens in enumerate(image_token_embeds):
        chosen = candidates[i]
        scores[i, chosen] = flair_scores(pooling, text_embeds[chosen], tokens[None], **flair_kwargs)[0]
    return scores


__all__ = ["flair_scores", "global_scores", "output_norm_factors", "topk_scores"]
