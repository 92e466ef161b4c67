"""Semantic segmentation mIoU with mmsegmentation's IoUMetric protocol, as an `evaluate` metric.

    metric = evaluate.load("benchmarks/metrics/flair_segmentation")
    metric.compute(predictions=label_maps, references=ground_truth_maps, num_labels=21, ignore_index=255)

Intersection, union, prediction and label pixel counts are summed per class over the whole set (pixels labelled
`ignore_index` left out); IoU = sum I / sum U; mIoU is the mean over classes with a non-zero union, in percent; also
pixel accuracy and per-class IoU.
"""

import datasets
import evaluate
import numpy as np

from flair_hf.segmentation import IGNORE_INDEX, IoUAccumulator

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of 2-D label maps (int).
    references: list of 2-D ground-truth maps of the same sizes.
    num_labels: number of classes.
    ignore_index: label left out of every count (default 255).
Returns:
    dict with `mIoU`, `pixel_accuracy` (percent), `per_class_IoU` and `num_classes_present`.
"""


class FlairSegmentation(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
                }
            ),
        )

    def _compute(self, predictions, references, num_labels: int, ignore_index: int = IGNORE_INDEX):
        accumulator = IoUAccumulator(num_labels, ignore_index)
        for prediction, reference in zip(predictions, references):
            accumulator.add(np.asarray(prediction), np.asarray(reference))
        return accumulator.compute()
