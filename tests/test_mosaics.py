"""FLAIR mosaics (`training/mosaics.py`) from the committed Fashion-MNIST subset: deterministic bytes, the split's
own photos, masks that agree with the captions, and the layouts the trainer and the evaluation CLIs read."""

import gzip
import hashlib
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURES, ROOT

SOURCE = FIXTURES / "fashion-mnist"
MOSAICS = [sys.executable, str(ROOT / "training" / "mosaics.py"), "--source", str(SOURCE)]
PLACES = ["at the top left", "at the top", "at the top right", "on the left", "in the centre", "on the right",
          "at the bottom left", "at the bottom", "at the bottom right"]  # fmt: skip
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


def make(split, seed, count, output):
    result = subprocess.run(MOSAICS + ["--split", split, "--seed", str(seed), "--count", str(count), "--output", str(output)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def labels(prefix):
    return np.frombuffer(gzip.decompress((SOURCE / f"{prefix}-labels-idx1-ubyte.gz").read_bytes()), dtype=np.uint8, offset=8)


def digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def test_split(tmp_path_factory):
    output = tmp_path_factory.mktemp("mosaics") / "test"
    make("test", 1, 30, output)
    return output


@pytest.fixture(scope="module")
def train_split(tmp_path_factory):
    output = tmp_path_factory.mktemp("mosaics") / "train"
    make("train", 0, 60, output)
    return output


def test_the_same_seed_gives_the_same_bytes_and_another_seed_others(test_split, train_split, tmp_path):
    make("test", 1, 30, tmp_path / "again-test")
    make("train", 0, 60, tmp_path / "again-train")
    make("train", 5, 60, tmp_path / "other-train")
    items = sum(len(d["items"]) for d in json.loads((test_split / "fashion-mosaics/annotations/mosaics.json").read_text()).values())
    assert digest(tmp_path / "again-test") == digest(test_split) and len(digest(test_split)) == 63 + items  # 30 images, 30 masks, 3 annotation files, single items
    assert digest(tmp_path / "again-train") == digest(train_split)
    assert digest(tmp_path / "other-train") != digest(train_split)


def test_masks_and_captions_describe_the_same_items_from_the_splits_own_photos(test_split):
    """Per item: its class is the test file's label of its photo, its sentence names class, colour, size and place,
    and the mask holds 1 + that class inside the item's cell only; the rest of the mask is background."""
    root = test_split / "fashion-mosaics"
    mosaics, test_labels = json.loads((root / "annotations" / "mosaics.json").read_text()), labels("t10k")
    long = {a["image"]: a["caption"] for a in json.loads((root / "annotations" / "long.json").read_text())["annotations"]}
    photos = [item["photo"] for description in mosaics.values() for item in description["items"]]
    assert len(set(photos)) == len(photos)  # no photo twice
    for image, description in mosaics.items():
        mask = np.asarray(Image.open(root / "masks" / image))
        assert np.asarray(Image.open(root / "images" / image)).shape == (96, 96, 3) and mask.shape == (96, 96)
        covered = np.zeros_like(mask, dtype=bool)
        for item in description["items"]:
            assert item["label"] == test_labels[item["photo"]]
            place = PLACES.index(item["place"])
            assert item["sentence"] == f"A {item['size']} {item['colour']} {CLASSES[item['label']]} {item['place']}"
            assert item["sentence"] in long[image]
            cell = (slice(32 * (place // 3), 32 * (place // 3) + 32), slice(32 * (place % 3), 32 * (place % 3) + 32))
            assert set(np.unique(mask[cell]).tolist()) == {0, 1 + item["label"]}, image
            covered[cell] = True
        assert not mask[~covered].any(), image
        assert long[image].startswith(f"{len(description['items'])} fashion items on a {description['background']} background.")


def test_single_items_are_each_item_alone_in_its_class_folder(test_split):
    """`fashion-items/<class>/<key>-<n>.png`: item n's cell as in the mosaic, every other pixel the background."""
    root = test_split / "fashion-mosaics"
    mosaics = json.loads((root / "annotations" / "mosaics.json").read_text())
    backgrounds = {"black": (15, 15, 15), "gray": (110, 110, 110)}
    for image, description in mosaics.items():
        mosaic = np.asarray(Image.open(root / "images" / image))
        for n, item in enumerate(description["items"]):
            alone = np.asarray(Image.open(test_split / "fashion-items" / CLASSES[item["label"]].replace(" ", "_") / f"{image[:-4]}-{n}.png"))
            place = PLACES.index(item["place"])
            cell = (slice(32 * (place // 3), 32 * (place // 3) + 32), slice(32 * (place % 3), 32 * (place % 3) + 32))
            assert np.array_equal(alone[cell], mosaic[cell])
            rest = np.ones((96, 96), dtype=bool)
            rest[cell] = False
            assert (alone[rest] == backgrounds[description["background"]]).all()
    assert sorted(p.name for p in (test_split / "fashion-items").iterdir()) == sorted(c.replace(" ", "_") for c in CLASSES)


def test_training_shards_hold_dreamlip_records_from_training_photos(train_split):
    train_labels = labels("train")
    with tarfile.open(train_split / "mosaics-0000.tar") as tar:
        names = tar.getnames()
        records = [json.loads(tar.extractfile(name).read()) for name in names if name.endswith(".json")]
    assert len(records) == 60 and len(names) == 120
    for record in records:
        items = record["mosaic"]["items"]
        assert record["shortSV_captions"][0].removesuffix(".") in [item["sentence"] for item in items]
        assert all(item["label"] == train_labels[item["photo"]] for item in items)
        assert len(record["longSV_captions"][0].split(". ")) == len(items) + 1


def test_the_trainer_trains_on_the_shards(train_split, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "training" / "train.py"), "--config", str(ROOT / "training" / "configs" / "tiny_cpu.yaml"),
                             "--train-data", str(train_split / "mosaics-0000.tar"), "--train-num-samples", "60", "--max-steps", "2",
                             "--output-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2


def test_retrieval_layouts_pair_each_query_with_its_one_image(test_split, tiny_dir, tmp_path):
    from flair_hf.retrieval_data import load_benchmark
    from flair_hf_benchmarks import evaluate_retrieval

    items, long = load_benchmark("fashion-mosaics", test_split), load_benchmark("fashion-mosaics-long", test_split)
    assert len(long) == 30 and 20 <= len(items) <= 30
    queries = [caption for row in items for caption in row["captions"]]
    assert len(set(queries)) == len(queries) == len(items)  # one query an image, none describing another mosaic
    results = evaluate_retrieval.main(["--model", str(tiny_dir), "--benchmark", "fashion-mosaics", "--benchmark", "fashion-mosaics-long",
                                       "--data-root", str(test_split), "--output", str(tmp_path / "r.json")])  # fmt: skip
    assert [r["benchmark"] for r in results] == ["fashion-mosaics", "fashion-mosaics-long"]
    assert all(0 <= r["metrics"]["text_to_image_R@1"] <= 100 for r in results), results


def test_segmentation_layout_is_read_by_the_cli(test_split, tiny_dir, tmp_path):
    from flair_hf_benchmarks import evaluate_segmentation

    evaluate_segmentation.main(["--model", str(tiny_dir), "--benchmark", "fashion-mosaics", "--data-root", str(test_split),
                                "--crop", "96", "--stride", "48", "--max-images", "4", "--output", str(tmp_path / "s.json")])  # fmt: skip
    result = json.loads((tmp_path / "s.json").read_text())
    assert "fashion-mosaics" in json.dumps(result) and "mIoU" in json.dumps(result)


@pytest.mark.parametrize("case", ["no-dataset", "split", "count", "output"])
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    args, message = {
        "no-dataset": (["--split", "test", "--count", "3", "--output", str(tmp_path / "out"), "--source", str(tmp_path)],
                       "error: Fashion-MNIST not found ("),
        "split": (["--split", "val", "--count", "3", "--output", str(tmp_path / "out")], "error: --split val: choose train or test"),
        "count": (["--split", "test", "--count", "0", "--output", str(tmp_path / "out")], "error: --count 0: make at least one mosaic"),
        "output": (["--split", "test", "--count", "3", "--output", str(full)], f"error: --output {full} exists and is not an empty directory"),
    }[case]  # fmt: skip
    result = subprocess.run(MOSAICS + args, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.strip().startswith(message), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"] and [p.name for p in full.iterdir()] == ["keep.txt"]


def test_the_training_quickstart_runs_as_written(tmp_path):
    """The Training page's quickstart from a fresh directory, on Debian's Fashion-MNIST (as CI installs it): the
    mosaics as written; the recipe as written but for its length (20 steps, an evaluation at 10 and 20; the whole run
    is benchmarks/benchmark_learning.py's), with -q: no progress bar, the evaluations and the summary only."""
    import shlex

    from manual import bash_commands, section

    commands = bash_commands(section("training.md", "Quickstart"))[:3]
    assert [c.split()[:2] for c in commands] == [["python", "training/mosaics.py"]] * 2 + [["accelerate", "launch"]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    for command in commands:
        words = shlex.split(command)
        words = [sys.executable, *words[1:]] if words[0] == "python" else [sys.executable, "-m", "accelerate.commands.launch", *words[2:]]
        words = [str(ROOT / word) if (ROOT / word).is_file() and "/" in word else word for word in words]
        words += ["--max-steps", "20", "--eval-every-steps", "10"] if "train.py" in command else []
        result = subprocess.run(words, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "mosaics" / "summary.json").read_text())
    assert summary["steps"] == 20 and "eval/fashion-mosaics-long/text_to_image_R@1" in summary
    evals = [json.loads(line) for line in (tmp_path / "runs" / "mosaics" / "eval.jsonl").read_text().splitlines()]
    assert [(r["step"], r["benchmark"]) for r in evals] == [(s, b) for s in (10, 20) for b in ("fashion-mosaics", "fashion-mosaics-long")]
    assert "training:" not in result.stderr + result.stdout  # -q: no progress bar
    assert "step 20 fashion-mosaics-long (flair): text->image R@1" in result.stdout
