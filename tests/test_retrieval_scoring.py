"""The fast FLAIR scorer equals the original's per-image loop (its pooling block, `conversion/original_forward.py`);
top-k and global semantics."""

import pytest
import torch

from flair_hf_conversion.original_forward import attention_pooling_of, original_pair_scores

from flair_hf.retrieval import flair_scores, global_scores, topk_scores


@pytest.fixture(scope="module")
def features(tiny_model):
    generator = torch.Generator().manual_seed(0)
    text = torch.randn(23, 32, generator=generator) * 3
    tokens = torch.randn(9, 196, 32, generator=generator) * 2
    images = torch.randn(9, 32, generator=generator)
    return tiny_model.text_conditioned_pooling, text, tokens, images


def test_fast_scorer_equals_the_original_loop(features):
    pooling, text, tokens, _ = features
    reference = original_pair_scores(attention_pooling_of(pooling), text, tokens)
    for image_chunk, text_chunk in ((16, 2048), (4, 5), (1, 1)):
        fast = flair_scores(pooling, text, tokens, image_chunk_size=image_chunk, text_chunk_size=text_chunk)
        assert (fast - reference).abs().max() <= 1e-4


def test_scores_match_model_logits(tiny_model, tiny_reference):
    with torch.no_grad():
        ids, pixels = tiny_reference["input_ids"].long(), tiny_reference["pixel_values"]
        scores = flair_scores(tiny_model.text_conditioned_pooling, tiny_model.get_text_embeds(ids), tiny_model.get_image_token_features(pixels))
    logits = tiny_model.logit_scale.exp() * scores + tiny_model.logit_bias
    assert (logits - tiny_reference["logits_per_image"]).abs().max() <= 1e-4


def test_topk_rescoring_semantics(features):
    pooling, text, tokens, images = features
    full = flair_scores(pooling, text, tokens)
    coarse = global_scores(images, text)
    scores = topk_scores(pooling, text, images, tokens, k=5)
    for i in range(len(images)):
        chosen = set(coarse[i].topk(5).indices.tolist())
        finite = set(torch.nonzero(torch.isfinite(scores[i])).flatten().tolist())
        assert finite == chosen
        for j in chosen:
            assert abs(scores[i, j] - full[i, j]) <= 1e-4
    assert torch.equal(topk_scores(pooling, text, images, tokens, k=100), full) or (
        topk_scores(pooling, text, images, tokens, k=100) - full
    ).abs().max() <= 1e-4


def test_autocast_scores_are_the_original_loops_within_bfloat16s_precision(features):
    """Against the original's per-image loop in float32 (independent of the fast scorer), with tolerances from bf16's
    machine epsilon (2**-7): measured max 0.40 eps, mean 0.10 eps, least-squares scale 1 - 0.07 eps."""
    pooling, text, tokens, _ = features
    reference = original_pair_scores(attention_pooling_of(pooling), text, tokens)
    low = flair_scores(pooling, text, tokens, autocast_dtype=torch.bfloat16, device="cpu")
    eps = torch.finfo(torch.bfloat16).eps
    error = (low - reference).abs()
    assert low.dtype == torch.float32 and low.shape == reference.shape
    assert error.max() <= eps and error.mean() <= eps / 4, (error.max() / eps, error.mean() / eps)
    scale = (low * reference).sum() / (reference * reference).sum()  # a systematic error shows here, noise averages out
    assert abs(scale - 1) <= eps / 4, (scale - 1) / eps
