"""FLAIR mosaics: Fashion-MNIST photos tinted and placed on a canvas, with item-by-item captions and class masks.

The photos are real Zalando product pictures (MIT licence); each mosaic has DreamLIP-style captions that describe
every item sentence by sentence, and a per-pixel class mask.

    python training/mosaics.py --split train --seed 0 --count 20000 --output data/mosaics-train
    python training/mosaics.py --split test --seed 1 --count 500 --output data/mosaics-test

A mosaic is `SIZE` x `SIZE` pixels: a background colour and 2 to 4 items in distinct cells of a 3 x 3 grid, each
a photo of one of the ten classes, tinted in a named colour, small or large. Its caption record (the keys FLAIR's
training reads): `raw_caption` (how many items, on what), `shortSV_captions` (one item's sentence) and
`longSV_captions` (a sentence for the background, then one per item, e.g. "A large red sneaker at the top left").

- `--split train` takes the photos of Fashion-MNIST's training file and writes webdataset shards
  `mosaics-NNNN.tar` (`<key>.png`, `<key>.json`) for `training/train.py --train-data`.
- `--split test` takes the photos of its test file (never seen in training) and writes, under
  `OUTPUT/fashion-mosaics/`, `images/<key>.png`, `masks/<key>.png` (0 background, 1 + class index per item pixel)
  and `annotations/{items,long}.json`: the retrieval queries, each with its one correct image (one item's sentence,
  where that sentence describes no other mosaic; the whole long caption). `--data-root OUTPUT` then serves
  `benchmarks/evaluate_retrieval.py --benchmark fashion-mosaics` (and `fashion-mosaics-long`) and
  `benchmarks/evaluate_segmentation.py --benchmark fashion-mosaics`. It also writes `OUTPUT/fashion-items/`, an
  ImageFolder (`<class>/<key>-<n>.png`, spaces as underscores) of each item alone (the others' cells painted with the
  background) for `benchmarks/evaluate_classification.py --data-root OUTPUT/fashion-items`.

The same arguments give the same bytes. Photos come from Debian's `dataset-fashion-mnist` (or `--source DIR`
holding the four `*-ubyte.gz` files).
"""

import argparse
import gzip
import io
import json
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from flair_hf.segmentation import class_names
from flair_hf_training.outputs import written_whole

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
SOURCE_FILES = {"train": "train", "test": "t10k"}  # the split's photos: Fashion-MNIST's own train / test file
SIZE, CELL = 96, 32  # the canvas and its 3 x 3 grid of cells
ITEM_SIZES = {"small": 18, "large": 30}
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 90, 230), "yellow": (240, 215, 40),
           "purple": (150, 60, 200), "orange": (245, 135, 25), "white": (245, 245, 245)}  # fmt: skip
BACKGROUNDS = {"black": (15, 15, 15), "gray": (110, 110, 110)}
PLACES = ("at the top left", "at the top", "at the top right", "on the left", "in the centre", "on the right",
          "at the bottom left", "at the bottom", "at the bottom right")  # fmt: skip
FASHION_CLASSES = [names[0] for names in class_names("fashion-mosaics")[1:]]  # label k, mask value 1 + k
SAMPLES_PER_SHARD = 1000
ITEM_THRESHOLD = 0.3  # a photo pixel at least this bright (of 1) is the item's, in the mask


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzip): images `(N, 28, 28)` or labels `(N,)` as uint8."""
    data = gzip.decompress(path.read_bytes())
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_photos(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = SOURCE_FILES[split]
    paths = [source / f"{prefix}-images-idx3-ubyte.gz", source / f"{prefix}-labels-idx1-ubyte.gz"]
    missing = [path for path in paths if not path.is_file()]
    if missing:
        raise SystemExit(
            f"error: Fashion-MNIST not found ({missing[0]}): install it with `apt-get install dataset-fashion-mnist`, "
            "or pass --source DIR holding the *-ubyte.gz files"
        )
    return read_idx(paths[0]), read_idx(paths[1])


def item_sentence(size: str, colour: str, label: int, place: int) -> str:
    return f"A {size} {colour} {FASHION_CLASSES[label]} {PLACES[place]}"


def draw_mosaic(rng: np.random.Generator, photos: np.ndarray, labels: np.ndarray, next_photo) -> tuple[np.ndarray, np.ndarray, dict]:
    """One mosaic: `(SIZE, SIZE, 3)` uint8 pixels, `(SIZE, SIZE)` uint8 mask and its description."""
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    canvas = np.empty((SIZE, SIZE, 3), dtype=np.float32)
    canvas[:] = BACKGROUNDS[background]
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    items = []
    for place in sorted(rng.choice(len(PLACES), size=int(rng.integers(2, 5)), replace=False).tolist()):
        photo = next_photo()
        size = list(ITEM_SIZES)[rng.integers(len(ITEM_SIZES))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        side = ITEM_SIZES[size]
        slack = CELL - side
        top = (place // 3) * CELL + int(rng.integers(slack + 1))
        left = (place % 3) * CELL + int(rng.integers(slack + 1))
        alpha = np.asarray(Image.fromarray(photos[photo]).resize((side, side), Image.BILINEAR), dtype=np.float32)[..., None] / 255
        region = canvas[top : top + side, left : left + side]
        region[:] = region * (1 - alpha) + np.asarray(COLOURS[colour], dtype=np.float32) * alpha
        mask[top : top + side, left : left + side][alpha[..., 0] >= ITEM_THRESHOLD] = 1 + int(labels[photo])
        items.append({"sentence": item_sentence(size, colour, int(labels[photo]), place), "label": int(labels[photo]),
                      "colour": colour, "size": size, "place": PLACES[place], "photo": int(photo)})  # fmt: skip
    return np.rint(canvas).astype(np.uint8), mask, {"background": background, "items": items}


def caption_record(description: dict, rng: np.random.Generator) -> dict:
    """DreamLIP-style captions: raw, one short (one item), one long (every item, a sentence each)."""
    items, background = description["items"], description["background"]
    opening = f"{len(items)} fashion items on a {background} background"
    long = ". ".join([opening] + [item["sentence"] for item in items]) + "."
    return {
        "raw_caption": [f"fashion items on {background}"],
        "shortSV_captions": [items[int(rng.integers(len(items)))]["sentence"] + "."],
        "longSV_captions": [long],
    }


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def add_file(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)  # mtime, owner and mode fixed: the same seed gives the same bytes
    info.size, info.mode = len(payload), 0o644
    tar.addfile(info, io.BytesIO(payload))


def generate(source: Path, split: str, seed: int, count: int):
    """`(key, image, mask, description, captions)` for each of `count` mosaics, photos drawn without replacement
    (cycling through the file again only past its size)."""
    photos, labels = load_photos(source, split)
    rng = np.random.default_rng([seed, list(SOURCE_FILES).index(split)])
    order, used = rng.permutation(len(photos)), [0]

    def next_photo() -> int:
        used[0] += 1
        return int(order[(used[0] - 1) % len(order)])

    for index in range(count):
        image, mask, description = draw_mosaic(rng, photos, labels, next_photo)
        yield f"{split}-{index:06d}", image, mask, description, caption_record(description, rng)


def write_train(mosaics, output: Path) -> int:
    shards, tar = 0, None
    for index, (key, image, _, description, captions) in enumerate(mosaics):
        if index % SAMPLES_PER_SHARD == 0:
            if tar:
                tar.close()
            tar, shards = tarfile.open(output / f"mosaics-{shards:04d}.tar", "w", format=tarfile.USTAR_FORMAT), shards + 1
        add_file(tar, f"{key}.png", png_bytes(image))
        add_file(tar, f"{key}.json", json.dumps({**captions, "mosaic": description}, sort_keys=True).encode())
    tar.close()
    return shards


def cell_of(place: str) -> tuple[slice, slice]:
    row, column = divmod(PLACES.index(place), 3)
    return slice(row * CELL, (row + 1) * CELL), slice(column * CELL, (column + 1) * CELL)


def single_items(image: np.ndarray, description: dict):
    """`(label, pixels)` per item: the mosaic with every other item's cell painted with the background."""
    for item in description["items"]:
        alone = image.copy()
        for other in description["items"]:
            if other is not item:
                alone[cell_of(other["place"])] = BACKGROUNDS[description["background"]]
        yield item["label"], alone


def write_test(mosaics, output: Path) -> tuple[int, int]:
    root, items_root = output / "fashion-mosaics", output / "fashion-items"
    for folder in ("images", "masks", "annotations"):
        (root / folder).mkdir(parents=True)
    for name in FASHION_CLASSES:
        (items_root / name.replace(" ", "_")).mkdir(parents=True)
    records = []
    for key, image, mask, description, captions in mosaics:
        (root / "images" / f"{key}.png").write_bytes(png_bytes(image))
        (root / "masks" / f"{key}.png").write_bytes(png_bytes(mask))
        for n, (label, alone) in enumerate(single_items(image, description)):
            (items_root / FASHION_CLASSES[label].replace(" ", "_") / f"{key}-{n}.png").write_bytes(png_bytes(alone))
        records.append((f"{key}.png", description, captions["longSV_captions"][0]))
    counts = Counter(item["sentence"] for _, description, _ in records for item in description["items"])
    items = [{"image": image, "caption": unique[0] + "."}
             for image, description, _ in records
             if (unique := [item["sentence"] for item in description["items"] if counts[item["sentence"]] == 1])]  # fmt: skip
    long = [{"image": image, "caption": caption} for image, _, caption in records]
    for name, annotations in (("items", items), ("long", long)):
        (root / "annotations" / f"{name}.json").write_text(json.dumps({"annotations": annotations}, indent=1))
    (root / "annotations" / "mosaics.json").write_text(json.dumps({image: d for image, d, _ in records}, indent=1, sort_keys=True))
    return len(items), len(long)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", required=True, help="train (webdataset shards) or test (retrieval and segmentation layouts)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the layouts, colours and photo order (default: 0)")
    parser.add_argument("--count", type=int, required=True, help="how many mosaics")
    parser.add_argument("--output", required=True, help="a new (or empty) directory")
    parser.add_argument("--source", default=str(FASHION_MNIST), help=f"folder of Fashion-MNIST's *-ubyte.gz files (default: {FASHION_MNIST})")
    args = parser.parse_args(argv)
    if args.split not in SOURCE_FILES:
        raise SystemExit(f"error: --split {args.split}: choose train or test")
    if args.count < 1:
        raise SystemExit(f"error: --count {args.count}: make at least one mosaic")
    output = Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise SystemExit(f"error: --output {output} exists and is not an empty directory: pick a new one")
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    output, source = Path(args.output), Path(args.source)
    load_photos(source, args.split)  # a missing dataset is an error before anything is written
    with written_whole(output) as partial:
        mosaics = generate(source, args.split, args.seed, args.count)
        if args.split == "train":
            shards = write_train(mosaics, partial)
            done = f"{shards} shard(s): --train-data '{output}/mosaics-{{0000..{shards - 1:04d}}}.tar' --train-num-samples {args.count}"
        else:
            items, long = write_test(mosaics, partial)
            done = f"{long} mosaics, {items} one-item queries and {long} long-caption queries: --data-root {output}"
    print(f"wrote {output}: {done}", file=sys.stderr)
    return output


if __name__ == "__main__":
    main()
