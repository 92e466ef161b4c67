"""Zero-shot semantic segmentation with FLAIR, following the SCLIP scheme the FLAIR/COSMOS authors evaluate with.

- Text: every class query (synonyms `a, b` on one line of a class-name file are separate queries of one class) through
  the 80 OpenAI ImageNet templates, each embedding L2-normalised, averaged, normalised again (`class_query_embeddings`).
- Image: short side resized to `short_side` (long side capped at 2048, bilinear), CLIP normalisation; 224x224 windows
  with stride 112 clamped inside the image; per window the projected, L2-normalised patch tokens times the query
  embeddings -> `(Q, h, w)`, bilinear to the window, summed over windows and divided by the count
  (`sliding_window_logits`); then bilinear to the original size. `method="attention"` uses the pooling head's caption
  attention maps (`flair_hf.dense`) with the class queries as captions instead of the cosine.
- Prediction (`predict_labels`): softmax over queries of `logit_scale * score`, max over a class's synonyms, optional
  `area_thd` (small foreground classes dropped), argmax, pixels whose best probability is under `prob_thd` -> 0.
- Metric (`IoUAccumulator`): intersection / union / prediction / label pixel counts per class over the whole set,
  ignore index 255; mIoU over classes with a non-zero union, pixel accuracy, per-class IoU, in percent.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from .dense import caption_attention_maps
from .scoring import pairwise_cosine
from .zero_shot import class_query_embeddings, data_text, imagenet_templates

IGNORE_INDEX = 255


@dataclass(frozen=True)
class SegmentationSet:
    class_file: str
    logit_scale: float = 40.0
    prob_thd: float = 0.0
    area_thd: float | None = None
    short_side: int = 336
    reduce_zero_label: bool = False


SEGMENTATION_SETS = {
    "voc21": SegmentationSet("voc21", logit_scale=65, prob_thd=0.1, area_thd=0.1),
    "voc20": SegmentationSet("voc20", reduce_zero_label=True),
    "context60": SegmentationSet("context60", logit_scale=50, prob_thd=0.1),
    "context59": SegmentationSet("context59", reduce_zero_label=True),
    "coco_object": SegmentationSet("coco_object", logit_scale=50, prob_thd=0.1),
    "coco_stuff": SegmentationSet("coco_stuff", short_side=448),
    "cityscapes": SegmentationSet("city_scapes", short_side=560),
    "ade20k": SegmentationSet("ade20k", reduce_zero_label=True),
    "fashion-mosaics": SegmentationSet("fashion_mosaics", short_side=96),  # label 0 the background, 1 + k class k
}


def class_names(benchmark: str) -> list[list[str]]:
    """Per class (label order), its synonyms: SCLIP's class-name file, `a, b` on a line = one class."""
    text = data_text("class_names", f"{SEGMENTATION_SETS[benchmark].class_file}.txt")
    return [[name.strip() for name in line.split(",") if name.strip()] for line in text.splitlines() if line.strip()]


def preprocess_image(image: Image.Image, short_side: int, max_long_side: int = 2048) -> torch.Tensor:
    """`(1, 3, H, W)` CLIP-normalised pixels, aspect kept: short side `short_side` unless the long side would pass
    `max_long_side` (mmcv's rescale); bilinear without antialiasing, rounded to 8 bits, as cv2 in mmcv."""
    width, height = image.size
    scale = min(short_side / min(width, height), max_long_side / max(width, height))
    size = (int(height * scale + 0.5), int(width * scale + 0.5))
    array = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None]
    resized = F.interpolate(array, size=size, mode="bilinear", align_corners=False).round().clamp(0, 255) / 255.0
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (resized - mean) / std


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Window offsets along one side: `max(size - crop + stride - 1, 0) // stride + 1` windows, clamped inside."""
    count = max(size - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride, size - crop), 0) for i in range(count)]


@torch.no_grad()
def sliding_window_logits(
    model, pixel_values: torch.Tensor, query_embeds: torch.Tensor, crop: int = 224, stride: int = 112,
    method: str = "similarity", window_batch: int = 16,
) -> torch.Tensor:  # fmt: skip
    """`(Q, H, W)` per-pixel scores of one image `(1, 3, H, W)`: each window's patch scores bilinearly upsampled to
    the window, summed over overlapping windows and divided by the per-pixel count."""
    _, _, height, width = pixel_values.shape
    crop_h, crop_w = min(crop, height), min(crop, width)
    boxes = [(top, left) for top in window_starts(height, crop_h, stride) for left in window_starts(width, crop_w, stride)]
    patch = model.config.vision_config.patch_size
    grid = (crop_h // patch, crop_w // patch)
    interpolate = (crop_h, crop_w) != (model.config.vision_config.image_size,) * 2
    device = model.device
    queries = query_embeds.to(device)
    totals = torch.zeros(queries.shape[0], height, width, device=device)
    counts = torch.zeros(1, height, width, device=device)
    for start in range(0, len(boxes), window_batch):
        chunk = boxes[start : start + window_batch]
        windows = torch.cat([pixel_values[..., t : t + crop_h, l : l + crop_w] for t, l in chunk]).to(device, model.dtype)
        tokens = model.get_image_token_features(windows, interpolate_pos_encoding=interpolate)
        if method == "attention":
            scores = caption_attention_maps(model.text_conditioned_pooling, queries.to(tokens.dtype), tokens, grid)
        else:
            scores = pairwise_cosine(tokens.float(), queries.float()).transpose(1, 2).unflatten(-1, grid)
        scores = F.interpolate(scores.float(), size=(crop_h, crop_w), mode="bilinear", align_corners=False)
        for (top, left), window_scores in zip(chunk, scores):
            totals[:, top : top + crop_h, left : left + crop_w] += window_scores
            counts[:, top : top + crop_h, left : left + crop_w] += 1
    return totals / counts


def predict_labels(
    scores: torch.Tensor, query_to_class: torch.Tensor, logit_scale: float, prob_thd: float = 0.0,
    area_thd: float | None = None,
) -> torch.Tensor:  # fmt: skip
    """`(H, W)` class labels from `(Q, H, W)` query scores (SCLIP's post-processing)."""
    probabilities = torch.softmax(scores * logit_scale, dim=0)
    num_classes = int(query_to_class.max()) + 1
    index = query_to_class.to(scores.device)[:, None, None].expand_as(probabilities)
    per_class = torch.zeros(num_classes, *scores.shape[1:], device=scores.device).scatter_reduce(
        0, index, probabilities, reduce="amax", include_self=False
    )
    if area_thd is not None:
        winners = per_class.argmax(dim=0)
        foreground = (winners > 0).sum()
        areas = torch.bincount(winners.flatten(), minlength=num_classes)
        small = (areas <= area_thd * foreground) & (torch.arange(num_classes, device=scores.device) > 0)
        per_class[small] = 0
    best, labels = per_class.max(dim=0)
    labels[best < prob_thd] = 0
    return labels


class IoUAccumulator:
    """Per-class intersection, union, prediction and label pixel counts over a whole set (mmseg's IoUMetric)."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.intersection = np.zeros(num_classes, dtype=np.int64)
        self.union = np.zeros(num_classes, dtype=np.int64)
        self.predicted = np.zeros(num_classes, dtype=np.int64)
        self.labelled = np.zeros(num_classes, dtype=np.int64)

    def add(self, prediction, label) -> None:
        prediction, label = np.asarray(prediction).astype(np.int64), np.asarray(label).astype(np.int64)
        if prediction.shape != label.shape:
            raise ValueError(f"prediction {prediction.shape} and label {label.shape} differ in size")
        keep = label != self.ignore_index
        prediction, label = prediction[keep], label[keep]
        n = self.num_classes
        intersection = np.bincount(label[prediction == label], minlength=n)[:n]
        predicted, labelled = np.bincount(prediction, minlength=n)[:n], np.bincount(label, minlength=n)[:n]
        self.intersection += intersection
        self.predicted += predicted
        self.labelled += labelled
        self.union += predicted + labelled - intersection

    def compute(self, class_labels: list[str] | None = None) -> dict:
        """mIoU over classes with a non-zero union, pixel accuracy, per-class IoU (percent; None where undefined)."""
        present = self.union > 0
        iou = np.where(present, self.intersection / np.maximum(self.union, 1), np.nan) * 100
        names = class_labels or [str(i) for i in range(self.num_classes)]
        return {
            "mIoU": float(np.nanmean(iou)) if present.any() else math.nan,
            "pixel_accuracy": float(self.intersection.sum() / max(self.labelled.sum(), 1) * 100),
            "per_class_IoU": {name: (None if math.isnan(v) else float(v)) for name, v in zip(names, iou)},
            "num_classes_present": int(present.sum()),
        }


def check_label(row: dict) -> None:
    """A label must be a single-channel class-index PNG of its image's size; `BenchmarkDataError` names the file."""
    from .retrieval_data import BenchmarkDataError

    label, image, where = row["label"], row["image"], row.get("label_path", "a label")
    if label.mode not in ("L", "P", "I", "I;16"):
        raise BenchmarkDataError(
            f"{where} is a {label.mode} image: labels are single-channel PNGs of class indices (mode L or P), as "
            "mmsegmentation's dataset preparation writes them"
        )
    if label.size != image.size:
        raise BenchmarkDataError(
            f"{where} is {label.size[0]}x{label.size[1]} but its image {row.get('image_path', '')} is "
            f"{image.size[0]}x{image.size[1]}: a label must match its image"
        )


def label_array(label: Image.Image, reduce_zero_label: bool = False) -> np.ndarray:
    """A label PNG as class indices; `reduce_zero_label`: 0 -> 255 (ignored), k -> k - 1."""
    array = np.asarray(label, dtype=np.uint8).astype(np.int64)
    if reduce_zero_label:
        array = np.where(array == 0, IGNORE_INDEX, array - 1)
        array[array == IGNORE_INDEX - 1] = IGNORE_INDEX
    return array


__all__ = [
    "IGNORE_INDEX",
    "IoUAccumulator",
    "SEGMENTATION_SETS",
    "SegmentationSet",
    "check_label",
    "class_names",
    "evaluate_segmentation",
    "label_array",
    "predict_labels",
    "preprocess_image",
    "segment_image",
    "sliding_window_logits",
    "window_starts",
]


@torch.no_grad()
def segment_image(model, image: Image.Image, query_embeds, query_to_class, settings: SegmentationSet, method="similarity",
                  crop: int = 224, stride: int = 112, window_batch: int = 16) -> torch.Tensor:  # fmt: skip
    """`(H, W)` labels at the image's own size: resize, sliding-window scores, bilinear back, SCLIP prediction."""
    pixels = preprocess_image(image, settings.short_side)
    scores = sliding_window_logits(model, pixels, query_embeds, crop, stride, method, window_batch)
    scores = F.interpolate(scores[None], size=(image.height, image.width), mode="bilinear", align_corners=False)[0]
    return predict_labels(scores, query_to_class, settings.logit_scale, settings.prob_thd, settings.area_thd).cpu()


def evaluate_segmentation(model, tokenizer, dataset, benchmark: str, method: str = "similarity", settings=None,
                          crop: int = 224, stride: int = 112, window_batch: int = 16, progress: bool = True) -> dict:  # fmt: skip
    """mIoU, pixel accuracy and per-class IoU of `model` on a `load_segmentation_benchmark` dataset."""
    from tqdm.auto import tqdm

    if method not in ("similarity", "attention"):
        raise ValueError(f"unknown method {method!r}: use similarity or attention")
    settings = settings or SEGMENTATION_SETS[benchmark]
    classes = class_names(benchmark)
    queries, query_to_class = class_query_embeddings(model, tokenizer, classes, imagenet_templates(), progress=progress)
    accumulator = IoUAccumulator(len(classes))
    for row in tqdm(dataset, desc=f"segmenting {benchmark}", unit="image", disable=not progress):
        check_label(row)
        labels = segment_image(model, row["image"], queries, query_to_class, settings, method, crop, stride, window_batch)
        accumulator.add(labels.numpy(), label_array(row["label"], settings.reduce_zero_label))
    return {**accumulator.compute([synonyms[0] for synonyms in classes]), "num_images": len(dataset)}
