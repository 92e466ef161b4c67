"""The zero-shot segmentation benchmarks as `datasets.Dataset`s (`image`, `label`, `image_path`, `label_path`), read
from their standard (mmsegmentation) layouts under a data root. Labels are the files' values; the per-set label
transform (`reduce_zero_label`) is applied by `flair_hf.segmentation.label_array`."""

from pathlib import Path

from .retrieval_data import BenchmarkDataError

_VOC = "VOCdevkit/VOC2012/{JPEGImages/<id>.jpg, SegmentationClass/<id>.png, ImageSets/Segmentation/val.txt}"
_CONTEXT = "VOCdevkit/VOC2010/{JPEGImages/<id>.jpg, SegmentationClassContext/<id>.png, ImageSets/SegmentationContext/val.txt}"
SEGMENTATION_LAYOUTS = {
    "voc21": _VOC,
    "voc20": _VOC + " (background dropped: labels - 1, 0 -> ignore)",
    "context60": _CONTEXT,
    "context59": _CONTEXT + " (background dropped: labels - 1, 0 -> ignore)",
    "coco_object": "coco_stuff164k/{images/val2017/<name>.jpg, annotations/val2017/<name>_instanceTrainIds.png}",
    "coco_stuff": "coco_stuff164k/{images/val2017/<name>.jpg, annotations/val2017/<name>_labelTrainIds.png}",
    "cityscapes": "cityscapes/{leftImg8bit/val/<city>/<x>_leftImg8bit.png, gtFine/val/<city>/<x>_gtFine_labelTrainIds.png}",
    "ade20k": "ADEChallengeData2016/{images/validation/<x>.jpg, annotations/validation/<x>.png}",
    "fashion-mosaics": "fashion-mosaics/{images/<key>.png, masks/<key>.png} (training/mosaics.py --split test)",
}


def _require(path: Path, benchmark: str) -> Path:
    if not path.exists():
        raise BenchmarkDataError(f"{benchmark}: missing {path} (expected layout: {SEGMENTATION_LAYOUTS[benchmark]})")
    return path


def _voc_pairs(root: Path, benchmark: str, year: str, labels: str, split_dir: str) -> list[tuple[Path, Path]]:
    base = root / "VOCdevkit" / year
    ids = _require(base / "ImageSets" / split_dir / "val.txt", benchmark).read_text().split()
    return [(base / "JPEGImages" / f"{i}.jpg", base / labels / f"{i}.png") for i in ids]


def _coco_pairs(root: Path, benchmark: str, suffix: str) -> list[tuple[Path, Path]]:
    images = _require(root / "coco_stuff164k" / "images" / "val2017", benchmark)
    labels = root / "coco_stuff164k" / "annotations" / "val2017"
    return [(path, labels / f"{path.stem}{suffix}") for path in sorted(images.glob("*.jpg"))]


def _cityscapes_pairs(root: Path, benchmark: str) -> list[tuple[Path, Path]]:
    images = _require(root / "cityscapes" / "leftImg8bit" / "val", benchmark)
    pairs = []
    for path in sorted(images.glob("*/*_leftImg8bit.png")):
        name = path.name.replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png")
        pairs.append((path, root / "cityscapes" / "gtFine" / "val" / path.parent.name / name))
    return pairs


def _ade_pairs(root: Path, benchmark: str) -> list[tuple[Path, Path]]:
    base = root / "ADEChallengeData2016"
    images = _require(base / "images" / "validation", benchmark)
    return [(path, base / "annotations" / "validation" / f"{path.stem}.png") for path in sorted(images.glob("*.jpg"))]


def _mosaic_pairs(root: Path, benchmark: str) -> list[tuple[Path, Path]]:
    images = _require(root / "fashion-mosaics" / "images", benchmark)
    return [(path, root / "fashion-mosaics" / "masks" / path.name) for path in sorted(images.glob("*.png"))]


PAIRS = {
    "voc21": lambda root, name: _voc_pairs(root, name, "VOC2012", "SegmentationClass", "Segmentation"),
    "voc20": lambda root, name: _voc_pairs(root, name, "VOC2012", "SegmentationClass", "Segmentation"),
    "context60": lambda root, name: _voc_pairs(root, name, "VOC2010", "SegmentationClassContext", "SegmentationContext"),
    "context59": lambda root, name: _voc_pairs(root, name, "VOC2010", "SegmentationClassContext", "SegmentationContext"),
    "coco_object": lambda root, name: _coco_pairs(root, name, "_instanceTrainIds.png"),
    "coco_stuff": lambda root, name: _coco_pairs(root, name, "_labelTrainIds.png"),
    "cityscapes": _cityscapes_pairs,
    "ade20k": _ade_pairs,
    "fashion-mosaics": _mosaic_pairs,
}


def load_segmentation_benchmark(name: str, data_root, max_images: int | None = None):
    """`datasets.Dataset` of (image, label) pairs of benchmark `name`; every file is checked to exist first."""
    import datasets

    if name not in PAIRS:
        raise BenchmarkDataError(f"unknown segmentation benchmark {name!r}: choose from {', '.join(PAIRS)}")
    pairs = PAIRS[name](Path(data_root), name)[:max_images]
    missing = [str(path) for pair in pairs for path in pair if not path.is_file()]
    if missing:
        raise BenchmarkDataError(
            f"{name}: {len(missing)} missing file(s), first {missing[0]} (expected layout: {SEGMENTATION_LAYOUTS[name]})"
        )
    if not pairs:
        raise BenchmarkDataError(f"{name}: no images found under {data_root} (expected layout: {SEGMENTATION_LAYOUTS[name]})")
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.Image(), "image_path": datasets.Value("string"), "label_path": datasets.Value("string")}
    )
    rows = {"image": [str(i) for i, _ in pairs], "label": [str(label) for _, label in pairs]}
    rows.update(image_path=rows["image"], label_path=rows["label"])
    return datasets.Dataset.from_dict(rows, features=features)


__all__ = ["SEGMENTATION_LAYOUTS", "load_segmentation_benchmark"]
