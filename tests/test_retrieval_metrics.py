"""The evaluate metric module, on hand-computed cases."""

import evaluate
import pytest

from conftest import ROOT

METRIC_PATH = str(ROOT / "benchmarks" / "metrics" / "flair_retrieval")


@pytest.fixture(scope="module")
def metric():
    return evaluate.load(METRIC_PATH)


def test_one_caption_per_image(metric):
    # 3 captions x 3 images; caption i belongs to image i
    scores = [[0.9, 0.1, 0.0], [0.8, 0.7, 0.1], [0.1, 0.2, 0.3]]
    result = metric.compute(predictions=scores, references=[0, 1, 2], k_values=[1, 2])
    # t2i ranks: 0, 1, 0 ; i2t: image0 column [0.9,0.8,0.1] caption0 rank0; image1 [0.1,0.7,0.2] caption1 rank0;
    # image2 [0.0,0.1,0.3] caption2 rank0
    assert result["text_to_image_R@1"] == pytest.approx(200 / 3)
    assert result["text_to_image_R@2"] == 100.0
    assert result["text_to_image_mean_rank"] == pytest.approx(4 / 3)
    assert result["text_to_image_median_rank"] == 1.0
    assert result["image_to_text_R@1"] == 100.0
    assert (result["num_texts"], result["num_images"]) == (3, 3)


def test_several_captions_per_image_take_the_best(metric):
    # 4 captions, 2 images: captions 0,1 -> image 0; captions 2,3 -> image 1
    scores = [[0.1, 0.5], [0.9, 0.2], [0.3, 0.4], [0.95, 0.1]]
    result = metric.compute(predictions=scores, references=[0, 0, 1, 1], k_values=[1])
    # t2i ranks: c0 own 0.1 vs 0.5 -> 1; c1 -> 0; c2 -> 0; c3 own 0.1 vs 0.95 -> 1
    assert result["text_to_image_R@1"] == 50.0
    # i2t: image0 column [0.1,0.9,0.3,0.95] ranks c3=0,c1=1,c2=2,c0=3 -> best own = 1
    #      image1 column [0.5,0.2,0.4,0.1] ranks c0=0,c2=1,c1=2,c3=3 -> best own = 1
    assert result["image_to_text_R@1"] == 0.0
    assert result["image_to_text_mean_rank"] == 2.0


def test_ties_are_broken_by_index(metric):
    scores = [[0.5, 0.5], [0.5, 0.5]]
    result = metric.compute(predictions=scores, references=[0, 1], k_values=[1])
    # caption 0: own image 0 comes first among equals -> rank 0; caption 1: image 1 after image 0 -> rank 1
    assert result["text_to_image_R@1"] == 50.0
    assert result["image_to_text_R@1"] == 50.0


def test_minus_infinity_ranks_last(metric):
    scores = [[float("-inf"), 0.1], [0.2, float("-inf")]]
    result = metric.compute(predictions=scores, references=[0, 1], k_values=[1])
    assert result["text_to_image_R@1"] == 0.0 and result["text_to_image_mean_rank"] == 2.0


def argsort_reference(scores, text_to_image, k_values):
    """The protocol by full stable argsorts (numpy), as the original ranks: independent of the counting implementation."""
    import numpy as np

    def ranks(matrix):
        order = np.argsort(-matrix, axis=1, kind="stable")
        out = np.empty_like(order)
        np.put_along_axis(out, order, np.arange(matrix.shape[1])[None].repeat(matrix.shape[0], 0), axis=1)
        return out

    t2i = ranks(scores)[np.arange(len(text_to_image)), text_to_image]
    by_caption = ranks(scores.T)
    i2t = np.array([by_caption[b, text_to_image == b].min() for b in np.unique(text_to_image)])
    result = {}
    for name, r in (("text_to_image", t2i), ("image_to_text", i2t)):
        result.update({f"{name}_R@{k}": round(float(100.0 * np.mean(r < k)), 4) for k in k_values})
        result.update({f"{name}_mean_rank": float(np.mean(r + 1)), f"{name}_median_rank": float(np.floor(np.median(r)) + 1)})
    return {**result, "num_texts": scores.shape[0], "num_images": scores.shape[1]}


@pytest.mark.parametrize("seed", range(3))
def test_counted_ranks_equal_a_stable_argsort_with_many_ties(seed):
    import numpy as np
    import torch

    from flair_hf.evaluation import retrieval_metrics

    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 5, (300, 40)).astype(np.float32)  # small integers: many ties
    text_to_image = rng.integers(0, 37, 300)  # some images have no caption
    expected = argsort_reference(scores, text_to_image, (1, 5, 10))
    assert retrieval_metrics(torch.from_numpy(scores), text_to_image) == expected
    assert retrieval_metrics(scores, torch.from_numpy(text_to_image)) == expected
