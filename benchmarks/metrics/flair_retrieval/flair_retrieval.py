"""Image-text retrieval metrics with the original FLAIR protocol, as an `evaluate` metric.

    metric = evaluate.load("benchmarks/metrics/flair_retrieval")
    metric.compute(predictions=scores_per_caption, references=image_index_per_caption)

One example per caption: `predictions` are the caption's scores against every image (all rows the same length),
`references` the index of the caption's own image.

- text->image: the rank of the caption's own image among all images;
- image->text: for every image that has captions, the best rank among all of its captions over all captions;
- R@K: percentage of queries with rank < K (0-based ranks); mean and median rank are 1-based.

Ties are broken by index (a stable descending sort: the earlier image / caption ranks first).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = __doc__
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of lists of float, one row per caption: its score against every image.
    references: list of int, the index of each caption's own image.
    k_values: recall cut-offs (default (1, 5, 10)).
Returns:
    dict with `text_to_image_R@K`, `image_to_text_R@K` (percent), `text_to_image_mean_rank`,
    `text_to_image_median_rank`, `image_to_text_mean_rank`, `image_to_text_median_rank`, `num_texts`, `num_images`.
"""


def stable_ranks(scores: np.ndarray) -> np.ndarray:
    """0-based rank of every column within each row, descending, ties broken by column index."""
    order = np.argsort(-scores, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(scores.shape[1])[None, :].repeat(scores.shape[0], 0), axis=1)
    return ranks


def retrieval_metrics(scores: np.ndarray, text_to_image: np.ndarray, k_values=(1, 5, 10)) -> dict:
    """`scores` `(T, B)` caption-by-image, `text_to_image` `(T,)` own image per caption."""
    scores = np.asarray(scores, dtype=np.float64)
    text_to_image = np.asarray(text_to_image, dtype=np.int64)
    t2i = stable_ranks(scores)[np.arange(len(text_to_image)), text_to_image]
    caption_ranks = stable_ranks(scores.T)  # (B, T)
    images = np.unique(text_to_image)
    i2t = np.array([caption_ranks[b, text_to_image == b].min() for b in images])
    result = {}
    for name, ranks in (("text_to_image", t2i), ("image_to_text", i2t)):
        for k in k_values:
            result[f"{name}_R@{k}"] = float(100.0 * np.mean(ranks < k))
        result[f"{name}_mean_rank"] = float(np.mean(ranks + 1))
        result[f"{name}_median_rank"] = float(np.floor(np.median(ranks)) + 1)
    result["num_texts"], result["num_images"] = int(scores.shape[0]), int(scores.shape[1])
    return result


class FlairRetrieval(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, k_values=(1, 5, 10)):
        return retrieval_metrics(np.asarray(predictions), np.asarray(references), k_values)
