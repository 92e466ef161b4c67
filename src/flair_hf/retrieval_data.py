"""The eight FLAIR retrieval benchmarks as `datasets.Dataset`s with one schema, from their original layouts.

Every benchmark becomes one row per unique image:

- `image` (`datasets.Image`, from the file path), `image_path` (str), `image_id` (int, row order),
- `captions` (list of str: exactly the text the original evaluation fed the tokenizer),
- `caption_ids` (list of int: the caption's position in the original caption order).

`load_benchmark(name, data_root)` reads the original layout under `data_root` (see `LAYOUTS`);
`load_hub_benchmark(...)` reads a Hub copy (online only) with configurable columns.
"""

import json
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from .captions import rejoin_sentences

# where each benchmark's files live under the data root (also used in error messages)
LAYOUTS = {
    "coco": "coco/annotations/captions_val2017.json, images coco/images/val2017/<file_name>",
    "flickr30k": "flickr30k-images/flickr30k_val.json (the file the original ships), images flickr30k-images/<id>.jpg",
    "flickr30k-test": "flickr30k-images/flickr30k_test.json, images flickr30k-images/<id>.jpg",
    "docci": "docci/annotations/test_annotations.json, images docci/images/<image>",
    "iiw": "imageinwords/test_annotations.json, images imageinwords/<image>",
    "iiw-long": "imageinwords/{DOCCI_Test,IIW-400,DCI_Test}/data.jsonl, images imageinwords/{docci,docci_aar,dci}/",
    "dci-long": "dci/densely_captioned_images/splits.json + annotations/<file>, images .../photos/<image>",
    "urban1k": "Urban1k/annotations/annotations.json, images Urban1k/images/<image>",
    "sharegpt4v-1k": "share4v/share4v_sam_10k.json (first 1,000 records), images under share4v/",
    "sharegpt4v-10k": "share4v/share4v_sam_10k.json (first 10,000 records), images under share4v/",
    "fashion-mosaics": "fashion-mosaics/annotations/items.json, images fashion-mosaics/images/<image> (training/mosaics.py --split test)",
    "fashion-mosaics-long": "fashion-mosaics/annotations/long.json, images fashion-mosaics/images/<image> (training/mosaics.py --split test)",
}


class BenchmarkDataError(ValueError):
    """Missing or malformed benchmark files; the message names the file and the expected layout."""


def _read_json(path: Path, benchmark: str):
    if not path.is_file():
        raise BenchmarkDataError(f"{benchmark}: missing annotation file {path} (expected layout: {LAYOUTS[benchmark]})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise BenchmarkDataError(f"{benchmark}: {path} is not valid JSON: {error}") from error


def _group(records: list[tuple[str, str]]) -> list[tuple[str, list[str], list[int]]]:
    """(image path, caption) pairs in caption order -> per image (first-seen order): captions and caption ids."""
    images: dict[str, tuple[list[str], list[int]]] = {}
    for caption_id, (path, caption) in enumerate(records):
        captions, ids = images.setdefault(path, ([], []))
        captions.append(caption)
        ids.append(caption_id)
    return [(path, captions, ids) for path, (captions, ids) in images.items()]


def _coco(root: Path):
    data = _read_json(root / "coco" / "annotations" / "captions_val2017.json", "coco")
    files = {image["id"]: image["file_name"] for image in data["images"]}
    by_image = {image_id: ([], []) for image_id in files}
    for caption_id, annotation in enumerate(data["annotations"]):
        if annotation["image_id"] not in by_image:
            raise BenchmarkDataError(
                f"coco: caption {annotation.get('id', caption_id)} refers to image_id {annotation['image_id']}, which is "
                "not among the file's images: the annotation file is inconsistent (use the original captions_val2017.json)"
            )
        captions, ids = by_image[annotation["image_id"]]
        captions.append(annotation["caption"])
        ids.append(caption_id)
    folder = root / "coco" / "images" / "val2017"
    return [(str(folder / files[i]), captions, ids) for i, (captions, ids) in by_image.items() if captions]


def _flickr(root: Path, split: str):
    data = _read_json(root / "flickr30k-images" / f"flickr30k_{split}.json", "flickr30k" if split == "val" else "flickr30k-test")
    return _group([(str(root / record["image"]), caption) for record in data for caption in record["caption"]])


def _annotations_file(path: Path, benchmark: str, image_folder: Path):
    """DOCCI / IIW fine-grained / Urban-1K format: `{"annotations": [{"image", "caption", ...}]}`."""
    data = _read_json(path, benchmark)
    annotations = data["annotations"] if isinstance(data, dict) else data
    if "caption_id" in annotations[0]:
        annotations = sorted(annotations, key=lambda a: a["caption_id"])
    return _group([(str(image_folder / a["image"]), a["caption"]) for a in annotations])


def _iiw_long(root: Path):
    records = []
    for subset, folder in (("DOCCI_Test", "docci"), ("IIW-400", "docci_aar"), ("DCI_Test", "dci")):
        path = root / "imageinwords" / subset / "data.jsonl"
        if not path.is_file():
            raise BenchmarkDataError(f"iiw-long: missing annotation file {path} (expected layout: {LAYOUTS['iiw-long']})")
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            name = record.get("image", record.get("image/key"))
            name = name if name.endswith(".jpg") else f"{name}.jpg"
            records.append((str(root / "imageinwords" / folder / name), rejoin_sentences(record["IIW"])))
    return _group(records)


def _dci_long(root: Path):
    base = root / "dci" / "densely_captioned_images"
    splits = _read_json(base / "splits.json", "dci-long")
    records = []
    for split in ("train", "valid", "test"):
        for file_name in splits[split]:
            annotation = _read_json(base / "annotations" / file_name, "dci-long")
            text = annotation["short_caption"] + "\n" + annotation["extra_caption"]
            records.append((str(base / "photos" / annotation["image"]), rejoin_sentences(text)))
    return _group(records)


def _share4v(root: Path, count: int, benchmark: str):
    data = _read_json(root / "share4v" / "share4v_sam_10k.json", benchmark)[:count]
    records = []
    for record in data:
        relative = "/".join(part for part in record["image"].split("/") if part != "images")
        records.append((str(root / "share4v" / relative), rejoin_sentences(record["conversations"][1]["value"])))
    return _group(records)


LOADERS: dict[str, Callable[[Path], list]] = {
    "coco": _coco,
    "flickr30k": lambda root: _flickr(root, "val"),
    "flickr30k-test": lambda root: _flickr(root, "test"),
    "docci": lambda root: _annotations_file(root / "docci" / "annotations" / "test_annotations.json", "docci", root / "docci" / "images"),
    "iiw": lambda root: _annotations_file(root / "imageinwords" / "test_annotations.json", "iiw", root / "imageinwords"),
    "iiw-long": _iiw_long,
    "dci-long": _dci_long,
    "urban1k": lambda root: _annotations_file(root / "Urban1k" / "annotations" / "annotations.json", "urban1k", root / "Urban1k" / "images"),
    "sharegpt4v-1k": lambda root: _share4v(root, 1_000, "sharegpt4v-1k"),
    "sharegpt4v-10k": lambda root: _share4v(root, 10_000, "sharegpt4v-10k"),
    **{
        name: lambda root, name=name, file=file: _annotations_file(root / "fashion-mosaics" / "annotations" / file, name, root / "fashion-mosaics" / "images")
        for name, file in (("fashion-mosaics", "items.json"), ("fashion-mosaics-long", "long.json"))
    },
}


def check_images(paths: list[str], benchmark: str) -> None:
    """Raise `BenchmarkDataError` naming the first missing or unreadable image (and how many more) before any model work."""
    bad = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except FileNotFoundError:
            bad.append((path, "missing"))
        except Exception as error:  # noqa: BLE001 - any decoder error means unreadable
            bad.append((path, f"unreadable: {error}"))
    if bad:
        path, reason = bad[0]
        more = f" (and {len(bad) - 1} more missing or unreadable images)" if len(bad) > 1 else ""
        raise BenchmarkDataError(f"{benchmark}: image {path} is {reason}{more}")


def _to_dataset(rows: list[tuple[str, list[str], list[int]]]):
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "image_path": datasets.Value("string"),
            "image_id": datasets.Value("int64"),
            "captions": datasets.Sequence(datasets.Value("string")),
            "caption_ids": datasets.Sequence(datasets.Value("int64")),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "image": [path for path, _, _ in rows],
            "image_path": [path for path, _, _ in rows],
            "image_id": list(range(len(rows))),
            "captions": [captions for _, captions, _ in rows],
            "caption_ids": [ids for _, _, ids in rows],
        },
        features=features,
    )


def load_benchmark(name: str, data_root: str | Path, verify_images: bool = True):
    """The benchmark `name` (one of `LAYOUTS`) from its original layout under `data_root`, as a `datasets.Dataset`."""
    if name not in LOADERS:
        raise BenchmarkDataError(f"unknown benchmark {name!r}; choose from {', '.join(LOADERS)}")
    rows = LOADERS[name](Path(data_root))
    if not rows:
        raise BenchmarkDataError(f"{name}: no image-caption pairs found under {data_root}")
    if verify_images:
        check_images([path for path, _, _ in rows], name)
    return _to_dataset(rows)


def load_hub_benchmark(
    dataset_id: str,
    split: str = "test",
    image_column: str = "image",
    caption_column: str = "caption",
    revision: str | None = None,
):
    """A Hub copy of a benchmark mapped to the same schema (one row per image; a caption column of str or list).

    Hub copies differ from the local layouts (splits, caption text); prefer `load_benchmark` for paper numbers.
    Offline this fails with a message naming the local alternative.
    """
    import datasets

    try:
        hub = datasets.load_dataset(dataset_id, split=split, revision=revision)
    except Exception as error:  # noqa: BLE001 - any Hub failure gets the same actionable message
        raise BenchmarkDataError(
            f"could not load the Hub dataset {dataset_id!r} ({type(error).__name__}: {error}). Offline? Use the local "
            f"original layout instead: --data-root DIR with one of: "
            + "; ".join(f"{name}: {layout}" for name, layout in LAYOUTS.items())
        ) from error
    for column in (image_column, caption_column):
        if column not in hub.column_names:
            raise BenchmarkDataError(f"{dataset_id}: no column {column!r}; columns are {hub.column_names}")
    captions, caption_ids, next_id = [], [], 0
    for value in hub[caption_column]:
        texts = [value] if isinstance(value, str) else list(value)
        captions.append(texts)
        caption_ids.append(list(range(next_id, next_id + len(texts))))
        next_id += len(texts)
    hub = hub.select_columns([image_column])
    if image_column != "image":
        hub = hub.rename_column(image_column, "image")
    hub = hub.add_column("image_path", [f"{dataset_id}/{split}/{i}" for i in range(len(hub))])
    hub = hub.add_column("image_id", list(range(len(hub))))
    hub = hub.add_column("captions", captions)
    return hub.add_column("caption_ids", caption_ids)


__all__ = ["LAYOUTS", "BenchmarkDataError", "check_images", "load_benchmark", "load_hub_benchmark"]
