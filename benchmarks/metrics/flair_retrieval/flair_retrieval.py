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

from flair_hf.evaluation import retrieval_metrics

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
