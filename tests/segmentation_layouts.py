"""Tiny copies of every segmentation benchmark's layout: generated images and label PNGs with known values."""

from pathlib import Path

import numpy as np
from PIL import Image

LABEL = np.array([[0, 1, 2, 255], [3, 1, 0, 2]], dtype=np.uint8).repeat(8, axis=0).repeat(8, axis=1)  # (16, 32)


def _write(image_path: Path, label_path: Path, seed: int, label=LABEL) -> None:
    for path in (image_path, label_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*label.shape, 3), dtype=np.uint8)).save(image_path)
    Image.fromarray(label).save(label_path)


def build_segmentation_root(root: Path) -> Path:
    """Two images per benchmark layout, every label PNG equal to `LABEL`."""
    for year, labels, split in (("VOC2012", "SegmentationClass", "Segmentation"), ("VOC2010", "SegmentationClassContext", "SegmentationContext")):
        base = root / "VOCdevkit" / year
        (base / "ImageSets" / split).mkdir(parents=True)
        (base / "ImageSets" / split / "val.txt").write_text("2007_000001\n2007_000002\n")
        for i, name in enumerate(("2007_000001", "2007_000002")):
            _write(base / "JPEGImages" / f"{name}.jpg", base / labels / f"{name}.png", i)
    coco = root / "coco_stuff164k"
    for i, name in enumerate(("000000000139", "000000000285")):
        _write(coco / "images" / "val2017" / f"{name}.jpg", coco / "annotations" / "val2017" / f"{name}_labelTrainIds.png", i)
        Image.fromarray(LABEL).save(coco / "annotations" / "val2017" / f"{name}_instanceTrainIds.png")
    for i, city in enumerate(("frankfurt", "lindau")):
        stem = f"{city}_000000_00001{i}"
        _write(root / "cityscapes" / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png",
               root / "cityscapes" / "gtFine" / "val" / city / f"{stem}_gtFine_labelTrainIds.png", i)  # fmt: skip
    ade = root / "ADEChallengeData2016"
    for i, name in enumerate(("ADE_val_00000001", "ADE_val_00000002")):
        _write(ade / "images" / "validation" / f"{name}.jpg", ade / "annotations" / "validation" / f"{name}.png", i)
    for i, name in enumerate(("test-000000", "test-000001")):
        _write(root / "fashion-mosaics" / "images" / f"{name}.png", root / "fashion-mosaics" / "masks" / f"{name}.png", i)
    return root
