"""Dense maps: caption attention maps equal the original's pooling attention; similarity maps equal a direct cosine."""

import pytest
import torch
import torch.nn.functional as F

from flair_hf.dense import caption_attention_maps, dense_maps, patch_similarity_maps, upsample_maps


@pytest.fixture(scope="module")
def inputs(tiny_reference):
    return tiny_reference["pixel_values"], tiny_reference["input_ids"].long()


def test_attention_maps_equal_the_original_pooling_attention(tiny_model, tiny_reference, inputs):
    maps = dense_maps(tiny_model, *inputs, kind="attention")
    assert maps.shape == (6, 7, 14, 14) and maps.dtype == torch.float32
    original = tiny_reference["pooling_attention_mean"][..., :196]  # the original code's head-averaged weights
    expected = (original / original.amax(-1, keepdim=True)).reshape(6, 7, 14, 14)
    assert (maps - expected).abs().max().item() <= 1e-5


def test_attention_maps_equal_a_hand_computed_multihead_attention(tiny_model, inputs):
    """The pooling head's attention written out from its raw parameters: LayerNorms, q/k projections, a zero key
    appended (add_zero_attn), softmax per head; maps are the head mean over the patches, divided by their maximum."""
    pooling = tiny_model.text_conditioned_pooling
    heads = pooling.num_heads
    with torch.no_grad():
        tokens, texts = tiny_model.get_image_token_features(inputs[0]), tiny_model.get_text_embeds(inputs[1])
        dim = texts.shape[-1]
        queries = F.linear(F.layer_norm(texts, (dim,), pooling.query_layer_norm.weight, pooling.query_layer_norm.bias), pooling.q_proj.weight, pooling.q_proj.bias)
        keys = F.linear(F.layer_norm(tokens, (dim,), pooling.key_layer_norm.weight, pooling.key_layer_norm.bias), pooling.k_proj.weight, pooling.k_proj.bias)
        keys = torch.cat([keys, keys.new_zeros(keys.shape[0], 1, dim)], dim=1)  # (B, L + 1, D)
        q = queries.view(-1, heads, dim // heads)  # (T, h, d)
        k = keys.view(keys.shape[0], keys.shape[1], heads, dim // heads)  # (B, L + 1, h, d)
        weights = torch.einsum("thd,blhd->bhtl", q, k).div((dim // heads) ** 0.5).softmax(-1)  # (B, h, T, L + 1)
    mean = weights.mean(dim=1)[..., :196]
    expected = (mean / mean.amax(-1, keepdim=True)).unflatten(-1, (14, 14))
    maps = dense_maps(tiny_model, *inputs)
    assert maps.shape == (6, 7, 14, 14)
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=0)


def test_similarity_maps_equal_a_direct_cosine(tiny_model, inputs):
    with torch.no_grad():
        tokens = tiny_model.get_image_token_features(inputs[0])  # (6, 196, D)
        texts = tiny_model.get_text_embeds(inputs[1])  # (7, D)
    expected = torch.zeros(6, 7, 196)
    for i in range(6):
        for t in range(7):
            cosine = F.cosine_similarity(tokens[i], texts[t][None], dim=-1).clamp_min(0)
            expected[i, t] = cosine / cosine.max() if cosine.max() > 0 else cosine
    maps = dense_maps(tiny_model, *inputs, kind="similarity")
    torch.testing.assert_close(maps, expected.unflatten(-1, (14, 14)), atol=1e-6, rtol=0)
    assert maps.min() >= 0 and torch.allclose(maps.flatten(2).amax(-1), torch.ones(6, 7))


def test_chunking_does_not_change_maps(tiny_model, inputs):
    with torch.no_grad():
        tokens, texts = tiny_model.get_image_token_features(inputs[0]), tiny_model.get_text_embeds(inputs[1])
    pooling = tiny_model.text_conditioned_pooling
    whole = caption_attention_maps(pooling, texts, tokens, (14, 14))
    torch.testing.assert_close(caption_attention_maps(pooling, texts, tokens, (14, 14), image_chunk_size=1, text_chunk_size=2), whole)
    similarity = patch_similarity_maps(texts, tokens, (14, 14))
    torch.testing.assert_close(patch_similarity_maps(texts, tokens, (14, 14), image_chunk_size=4), similarity)
    with pytest.raises(ValueError, match="196 patch tokens do not fill a 10x10 grid"):
        patch_similarity_maps(texts, tokens, (10, 10))


def _bilinear(grid: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize written out (half-pixel centres, edges clamped, as `align_corners=False`)."""
    def taps(size_in, size_out):
        position = ((torch.arange(size_out, dtype=torch.float64) + 0.5) * size_in / size_out - 0.5).clamp(min=0)
        low = position.floor().long().clamp(max=size_in - 1)
        return low, (low + 1).clamp(max=size_in - 1), position - low

    (top, bottom, dy), (left, right, dx) = taps(grid.shape[0], height), taps(grid.shape[1], width)
    g = grid.double()
    rows = g[top] * (1 - dy[:, None]) + g[bottom] * dy[:, None]
    return (rows[:, left] * (1 - dx) + rows[:, right] * dx).float()


def test_upsampled_maps_are_bilinear_at_the_input_size(tiny_model, inputs):
    maps = dense_maps(tiny_model, *inputs, kind="similarity")
    upsampled = dense_maps(tiny_model, *inputs, kind="similarity", upsample=True)
    assert upsampled.shape == (6, 7, 224, 224)
    torch.testing.assert_close(upsampled, F.interpolate(maps, size=(224, 224), mode="bilinear", align_corners=False))
    expected = torch.stack([torch.stack([_bilinear(m, 28, 28) for m in per_image]) for per_image in maps])
    torch.testing.assert_close(upsample_maps(maps, (28, 28)), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="unknown map kind 'heat'"):
        dense_maps(tiny_model, *inputs, kind="heat")


def test_half_precision_maps_are_close(tiny_dir, tiny_model, inputs):
    from flair_hf import FlairModel

    model = FlairModel.from_pretrained(tiny_dir, dtype=torch.bfloat16).eval()
    for kind in ("attention", "similarity"):
        half = dense_maps(model, inputs[0].bfloat16(), inputs[1], kind=kind)
        assert half.dtype == torch.float32
        error = (half - dense_maps(tiny_model, *inputs, kind=kind)).abs()
        # maps are scaled to a maximum of 1, so bf16's rounding (eps 2^-7) bounds their error in units of eps:
        # measured mean 0.41 / 0.26 eps and max 3.9 / 4.4 eps (attention / similarity); allowed 1 and 8 eps
        eps = torch.finfo(torch.bfloat16).eps
        assert error.mean() <= eps and error.max() <= 8 * eps, (kind, error.mean() / eps, error.max() / eps)


def test_interpolated_position_embeddings_match_clip_and_the_model_size(tiny_dir, tiny_model, inputs):
    from transformers import CLIPModel

    pixels = inputs[0][:2]
    with torch.no_grad():
        plain = tiny_model.get_image_embeds(pixels)
        torch.testing.assert_close(tiny_model.get_image_embeds(pixels, interpolate_pos_encoding=True), plain, atol=0, rtol=0)
        large = F.interpolate(pixels, size=(320, 256), mode="bilinear", align_corners=False)
        ours = tiny_model.get_image_embeds(large, interpolate_pos_encoding=True)
        clip = CLIPModel.from_pretrained(tiny_dir).eval()
        theirs = clip.get_image_features(pixel_values=large, interpolate_pos_encoding=True).pooler_output
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert dense_maps(tiny_model, large, inputs[1][:3], kind="attention").shape == (2, 3, 20, 16)
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
        tiny_model.get_image_embeds(large)
