"""Benchmark loaders: pairs and exact caption texts from tiny copies of the original layouts."""

import json

import pytest

from benchmark_layouts import IIW_LONG, SHARE4V, SUBSETS, build_data_root
from flair_hf.captions import rejoin_sentences, split_sentences
from flair_hf.retrieval_data import LAYOUTS, BenchmarkDataError, load_benchmark, load_hub_benchmark


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return build_data_root(tmp_path_factory.mktemp("benchmarks"))


def test_sentence_rejoin_matches_the_original_rule():
    assert split_sentences("A.  B\nC</s>D. 3.5 m.") == ["A", "B", "C", "D", "3", "5 m"]
    assert rejoin_sentences("Mountains.. Snow on top") == "Mountains. Snow on top"
    assert rejoin_sentences("") == ""


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_benchmark_loads_with_the_uniform_schema(data_root, name):
    dataset = load_benchmark(name, data_root)
    assert set(dataset.column_names) == {"image", "image_path", "image_id", "captions", "caption_ids"}
    assert dataset["image_id"] == list(range(len(dataset)))
    ids = sorted(i for row in dataset["caption_ids"] for i in row)
    assert ids == list(range(len(ids)))
    assert dataset[0]["image"].size[0] == 32


def test_coco_pairs_follow_the_annotation_file(data_root):
    coco = json.loads((SUBSETS / "coco_captions_val2017_subset.json").read_text())
    dataset = load_benchmark("coco", data_root)
    assert [p.rsplit("/", 1)[-1] for p in dataset["image_path"]] == [im["file_name"] for im in coco["images"]]
    for row, image in zip(dataset, coco["images"]):
        expected = [(i, a["caption"]) for i, a in enumerate(coco["annotations"]) if a["image_id"] == image["id"]]
        assert list(zip(row["caption_ids"], row["captions"])) == expected


def test_flickr_and_fine_grained_pairs(data_root):
    flickr = json.loads((SUBSETS / "flickr30k_val_subset.json").read_text())
    dataset = load_benchmark("flickr30k", data_root)
    assert dataset["captions"] == [r["caption"] for r in flickr]
    assert dataset["caption_ids"][1] == [5, 6, 7, 8, 9]
    iiw = json.loads((SUBSETS / "iiw_test_annotations_subset.json").read_text())["annotations"]
    dataset = load_benchmark("iiw", data_root)
    assert len(dataset) == 2 and sum(len(c) for c in dataset["captions"]) == len(iiw)
    assert dataset[0]["captions"][0] == iiw[0]["caption"]  # fine-grained sub-captions: as is


def test_long_benchmarks_rejoin_sentences(data_root):
    long = load_benchmark("iiw-long", data_root)
    assert [c[0] for c in long["captions"]] == [
        "A cat sits. It is grey", "A bridge over water. Boats pass. Evening light", "Mountains. Snow on top", "A market",
    ]  # fmt: skip
    assert long["image_path"][1].endswith("imageinwords/docci_aar/aar_1.jpg")
    assert long["image_path"][0].endswith("imageinwords/docci/test_1.jpg")
    assert sum(len(r) for r in IIW_LONG.values()) == len(long)
    dci = load_benchmark("dci-long", data_root)
    assert dci["captions"] == [["A red car. It is parked. The sky is 3. 5 shades of blue"], ["Two dogs. They run. Grass"], ["A lamp"]]
    share = load_benchmark("sharegpt4v-1k", data_root)
    assert share["captions"] == [["A street. People walk. Shops 2. 0"], ["A beach"]]
    assert share["image_path"][0].endswith("share4v/sam/sa_10.jpg") and len(SHARE4V) == 2
    urban = load_benchmark("urban1k", data_root)
    original = json.loads((SUBSETS / "urban1k_annotations_subset.json").read_text())["annotations"]
    assert [c[0] for c in urban["captions"]] == [a["caption"] for a in original]  # Urban-1K: as is


def test_missing_and_unreadable_images_are_named_before_model_work(data_root, tmp_path):
    root = build_data_root(tmp_path / "copy")
    dataset = load_benchmark("coco", root)
    first, second = dataset["image_path"][:2]
    import pathlib

    pathlib.Path(first).unlink()
    pathlib.Path(second).write_bytes(b"not an image")
    with pytest.raises(BenchmarkDataError, match=r"coco: image .*\.jpg is missing \(and 1 more missing or unreadable images\)"):
        load_benchmark("coco", root)


def test_missing_annotation_file_names_the_expected_layout(tmp_path):
    with pytest.raises(BenchmarkDataError, match="urban1k: missing annotation file .*Urban1k/annotations/annotations.json"):
        load_benchmark("urban1k", tmp_path)
    with pytest.raises(BenchmarkDataError, match="unknown benchmark 'nope'"):
        load_benchmark("nope", tmp_path)


def test_hub_loader_offline_names_the_local_alternative(monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(BenchmarkDataError, match="Offline\\? Use the local original layout instead: --data-root"):
        load_hub_benchmark("nlphuji/flickr30k-does-not-exist-locally")


def test_hub_loader_maps_columns(monkeypatch, tmp_path):
    import datasets
    from PIL import Image

    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(path)
    fake = datasets.Dataset.from_dict({"img": [str(path), str(path)], "sentences": [["a", "b"], ["c"]]}).cast_column("img", datasets.Image())
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: fake)
    dataset = load_hub_benchmark("someone/flickr", image_column="img", caption_column="sentences")
    assert dataset["captions"] == [["a", "b"], ["c"]] and dataset["caption_ids"] == [[0, 1], [2]]
    assert dataset["image_id"] == [0, 1]
