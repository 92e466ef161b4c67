"""Tiny copies of every benchmark's original layout: shipped annotation subsets plus generated images."""

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

SUBSETS = Path(__file__).resolve().parent / "fixtures" / "benchmarks"

DCI_ANNOTATIONS = {
    "train": {"image": "sa_1.jpg", "short_caption": "A red car.", "extra_caption": "It is parked.\nThe sky is 3.5 shades of blue"},
    "valid": {"image": "sa_2.jpg", "short_caption": "Two dogs", "extra_caption": "They run. </s> Grass"},
    "test": {"image": "sa_3.jpg", "short_caption": "A lamp", "extra_caption": ""},
}
IIW_LONG = {
    "DOCCI_Test": [{"image": "test_1", "IIW": "A cat sits.\nIt is grey. "}],
    "IIW-400": [{"image/key": "aar_1.jpg", "IIW": "A bridge over water. Boats pass</s>Evening light."}],
    "DCI_Test": [{"image": "dci_1", "IIW": "Mountains.. Snow on top"}, {"image": "dci_2.jpg", "IIW": "A market."}],
}
SHARE4V = [
    {"image": "sam/images/sa_10.jpg", "conversations": [{"value": "q"}, {"value": "A street.\n\nPeople walk. Shops 2.0"}]},
    {"image": "sam/images/sa_11.jpg", "conversations": [{"value": "q"}, {"value": "A beach"}]},
]


def write_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (24 + seed % 7, 32, 3), dtype=np.uint8)).save(path)


def build_data_root(root: Path) -> Path:
    """Write every benchmark's tiny original layout under `root` and return it."""
    coco = json.loads((SUBSETS / "coco_captions_val2017_subset.json").read_text())
    (root / "coco" / "annotations").mkdir(parents=True)
    shutil.copy(SUBSETS / "coco_captions_val2017_subset.json", root / "coco" / "annotations" / "captions_val2017.json")
    for i, image in enumerate(coco["images"]):
        write_image(root / "coco" / "images" / "val2017" / image["file_name"], i)

    flickr = json.loads((SUBSETS / "flickr30k_val_subset.json").read_text())
    (root / "flickr30k-images").mkdir()
    for split in ("val", "test"):
        shutil.copy(SUBSETS / "flickr30k_val_subset.json", root / "flickr30k-images" / f"flickr30k_{split}.json")
    for i, record in enumerate(flickr):
        write_image(root / record["image"], 10 + i)

    iiw = json.loads((SUBSETS / "iiw_test_annotations_subset.json").read_text())
    (root / "imageinwords").mkdir()
    shutil.copy(SUBSETS / "iiw_test_annotations_subset.json", root / "imageinwords" / "test_annotations.json")
    for i, name in enumerate(sorted({a["image"] for a in iiw["annotations"]})):
        write_image(root / "imageinwords" / name, 20 + i)
    docci = {"annotations": [dict(a, image=Path(a["image"]).name) for a in iiw["annotations"]]}
    (root / "docci" / "annotations").mkdir(parents=True)
    (root / "docci" / "annotations" / "test_annotations.json").write_text(json.dumps(docci))
    for i, name in enumerate(sorted({a["image"] for a in docci["annotations"]})):
        write_image(root / "docci" / "images" / name, 30 + i)

    folders = {"DOCCI_Test": "docci", "IIW-400": "docci_aar", "DCI_Test": "dci"}
    for subset, records in IIW_LONG.items():
        (root / "imageinwords" / subset).mkdir()
        (root / "imageinwords" / subset / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        for i, record in enumerate(records):
            name = record.get("image", record.get("image/key"))
            write_image(root / "imageinwords" / folders[subset] / (name if name.endswith(".jpg") else name + ".jpg"), 40 + i)

    dci = root / "dci" / "densely_captioned_images"
    (dci / "annotations").mkdir(parents=True)
    splits = json.loads((SUBSETS / "dci_splits_subset.json").read_text())
    (dci / "splits.json").write_text(json.dumps(splits))
    for i, (split, files) in enumerate(splits.items()):
        (dci / "annotations" / files[0]).write_text(json.dumps(DCI_ANNOTATIONS[split]))
        write_image(dci / "photos" / DCI_ANNOTATIONS[split]["image"], 50 + i)

    (root / "Urban1k" / "annotations").mkdir(parents=True)
    shutil.copy(SUBSETS / "urban1k_annotations_subset.json", root / "Urban1k" / "annotations" / "annotations.json")
    for i, a in enumerate(json.loads((SUBSETS / "urban1k_annotations_subset.json").read_text())["annotations"]):
        write_image(root / "Urban1k" / "images" / a["image"], 60 + i)

    (root / "share4v").mkdir()
    (root / "share4v" / "share4v_sam_10k.json").write_text(json.dumps(SHARE4V))
    for i, record in enumerate(SHARE4V):
        write_image(root / "share4v" / record["image"].replace("/images", ""), 70 + i)

    mosaics = root / "fashion-mosaics"  # as training/mosaics.py --split test writes it
    (mosaics / "annotations").mkdir(parents=True)
    for name, captions in (("items", ["A small red bag on the left.", "A large blue coat in the centre."]),
                           ("long", ["2 fashion items on a gray background. A small red bag on the left. A large white shirt at the top.",
                                     "3 fashion items on a black background. A large blue coat in the centre. A small green sandal at the bottom. A small white dress at the top right."])):  # fmt: skip
        annotations = [{"image": f"test-{i:06d}.png", "caption": caption} for i, caption in enumerate(captions)]
        (mosaics / "annotations" / f"{name}.json").write_text(json.dumps({"annotations": annotations}))
    for i in range(2):
        write_image(mosaics / "images" / f"test-{i:06d}.png", 80 + i)
    return root
