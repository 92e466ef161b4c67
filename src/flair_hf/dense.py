"""Dense FLAIR maps: where in the image each caption looks, on the patch grid.

- `caption_attention_maps`: the text-conditioned pooling head's attention weights over the patch tokens, averaged over
  heads, the zero-attention slot dropped, on the `(h, w)` patch grid (row-major), divided by their maximum.
- `patch_similarity_maps`: the cosine of every projected patch token (`FlairModel.get_image_token_features`) with the
  caption's text embedding, negatives clamped to 0, divided by the maximum.

Both return `(B, T, h, w)` float32 maps in [0, 1], computed in the pooling head's blocks of images x texts
(`FlairTextConditionedPooling.pair_blocks`), on the features' device and dtype; `upsample_maps` resizes them bilinearly (e.g. to the input size). `dense_maps` does it
all from `pixel_values` and `input_ids`, at any image size (`interpolate_pos_encoding` above the model's size).
"""

import torch
import torch.nn.functional as F

from .scoring import PAIR_IMAGE_CHUNK_SIZE, PAIR_TEXT_CHUNK_SIZE, pairwise_cosine

MAP_KINDS = ("attention", "similarity")


def _normalize_by_max(maps: torch.Tensor) -> torch.Tensor:
    """Divide each `(..., L)` map by its maximum (an all-zero map stays zero)."""
    return maps / maps.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(maps.dtype).tiny)


def _check_kind(kind: str) -> None:
    if kind not in MAP_KINDS:
        raise ValueError(f"unknown map kind {kind!r}: use one of {', '.join(MAP_KINDS)}")


def _to_grid(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    if maps.shape[-1] != grid[0] * grid[1]:
        raise ValueError(f"{maps.shape[-1]} patch tokens do not fill a {grid[0]}x{grid[1]} grid: pass the right grid")
    return maps.unflatten(-1, grid)


@torch.no_grad()
def caption_attention_maps(
    pooling, text_embeds: torch.Tensor, image_token_embeds: torch.Tensor, grid: tuple[int, int],
    image_chunk_size: int = PAIR_IMAGE_CHUNK_SIZE, text_chunk_size: int = PAIR_TEXT_CHUNK_SIZE,
) -> torch.Tensor:  # fmt: skip
    """`(B, T, h, w)` head-averaged pooling attention of every caption over every image's patches, max-normalised.

    `pooling` is `FlairModel.text_conditioned_pooling` (or an exported head with `attention_maps`, NumPy in and out,
    e.g. `flair_hf.onnx.FlairOnnxModel`), `text_embeds` `(T, D)` from `get_text_embeds`, `image_token_embeds`
    `(B, h*w, D)` from `get_image_token_features`.
    """
    if hasattr(pooling, "attention_maps"):
        maps = pooling.attention_maps(text_embeds.float().cpu().numpy(), image_token_embeds.float().cpu().numpy())
        return _to_grid(_normalize_by_max(torch.from_numpy(maps)), grid)
    (images, tokens), texts = image_token_embeds.shape[:2], text_embeds.shape[0]
    maps = torch.empty(images, texts, tokens, dtype=torch.float32, device=pooling.q_proj.weight.device)
    for images, texts, queries, keys, values in pooling.pair_blocks(text_embeds, image_token_embeds, image_chunk_size, text_chunk_size):
        weights = pooling.attend(queries, keys, values, output_attentions=True)[1]  # (b, heads, t, L + 1)
        maps[images, texts] = _normalize_by_max(weights.float().mean(dim=1)[..., :-1])
    return _to_grid(maps, grid)


@torch.no_grad()
def patch_similarity_maps(
    text_embeds: torch.Tensor, image_token_embeds: torch.Tensor, grid: tuple[int, int],
    image_chunk_size: int = PAIR_IMAGE_CHUNK_SIZE,
) -> torch.Tensor:
    """`(B, T, h, w)` cosine of each projected patch token with each caption embedding, negatives 0, max-normalised."""
    rows = [
        _normalize_by_max(pairwise_cosine(chunk.float(), text_embeds.float()).transpose(1, 2).clamp_min(0))
        for chunk in image_token_embeds.split(image_chunk_size)
    ]
    return _to_grid(torch.cat(rows), grid)


def upsample_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of `(B, T, h, w)` maps to `(B, T, *size)`."""
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def dense_maps(
    model, pixel_values: torch.Tensor, input_ids: torch.Tensor, kind: str = "attention", upsample: bool = False,
    attention_mask: torch.Tensor | None = None, **chunk_sizes,
) -> torch.Tensor:  # fmt: skip
    """`(B, T, h, w)` maps of `kind` ("attention" or "similarity") for every image and caption; with `upsample`, at the
    input's `(H, W)`. Images of another size than the model's use interpolated position embeddings."""
    _check_kind(kind)
    height, width = pixel_values.shape[-2:]
    patch = model.config.vision_config.patch_size
    grid = (height // patch, width // patch)
    size = model.config.vision_config.image_size
    tokens = model.get_image_token_features(pixel_values, interpolate_pos_encoding=(height, width) != (size, size))
    maps = feature_maps(model, model.get_text_embeds(input_ids, attention_mask), tokens, grid, kind, **chunk_sizes)
    return upsample_maps(maps, (height, width)) if upsample else maps


@torch.no_grad()
def feature_maps(model, text_embeds: torch.Tensor, image_token_embeds: torch.Tensor, grid: tuple[int, int], kind: str = "attention", **chunk_sizes) -> torch.Tensor:  # fmt: skip
    """`(B, T, h, w)` maps of `kind` from embeddings already computed (`get_text_embeds`, `get_image_token_features`),
    e.g. of a gallery indexed once."""
    _check_kind(kind)
    if kind == "attention":
        return caption_attention_maps(model.text_conditioned_pooling, text_embeds, image_token_embeds, grid, **chunk_sizes)
    return patch_similarity_maps(text_embeds, image_token_embeds, grid, **chunk_sizes)


__all__ = ["MAP_KINDS", "caption_attention_maps", "dense_maps", "feature_maps", "patch_similarity_maps", "upsample_maps"]
