"""Training data: brace patterns, source mixing, splitting, shuffling, sub-captions, corrupt data."""

import itertools
import random

import pytest
import torch

from flair_hf_benchmarks.synthetic import write_shard
from shards import write_corrupt_shard

from flair_hf_training import data
from flair_hf_training.data import DataError, FlairTrainingStream, RandomResizedCropTransform, check_shards, expand_braces, make_collate, parse_sources


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    for index in range(4):
        write_shard(root / f"train-{index:04d}.tar", start=index * 5, count=5, extension="png" if index == 3 else "jpg")
    return root


def test_brace_patterns_and_sources():
    assert expand_braces("cc3m-{0000..0002}.tar") == ["cc3m-0000.tar", "cc3m-0001.tar", "cc3m-0002.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    sources = parse_sources("x-{0..1}.tar::y.tar", "0.75::0.25")
    assert sources == [(["x-0.tar", "x-1.tar"], 0.75), (["y.tar"], 0.25)]
    with pytest.raises(ValueError, match="2 sources but 1 weights"):
        parse_sources("a::b", "1")


def keys_of(stream):
    return [tuple(texts) for _, texts in stream]


def test_stream_reads_every_sample_once_per_epoch_and_is_reproducible(shard_dir):
    sources = parse_sources(str(shard_dir / "train-{0000..0003}.tar"))
    stream = FlairTrainingStream(sources, captions_per_image=4, shuffle_buffer=6, seed=1)
    samples = list(stream)
    assert len(samples) == 20
    pixels, texts = samples[0]
    assert pixels.shape == (3, 224, 224) and len(texts) == 4 and all(isinstance(t, str) and t for t in texts)
    assert keys_of(FlairTrainingStream(sources, captions_per_image=4, shuffle_buffer=6, seed=1)) == keys_of(samples)
    stream.set_epoch(1)
    assert keys_of(stream) != keys_of(samples)


def test_ranks_get_disjoint_shards(shard_dir):
    sources = parse_sources(str(shard_dir / "train-{0000..0003}.tar"))
    per_rank = [
        {float(p.sum()) for p, _ in FlairTrainingStream(sources, captions_per_image=2, rank=r, world_size=2, shuffle_buffer=1)}
        for r in range(2)
    ]
    assert len(per_rank[0]) == len(per_rank[1]) == 10 and not per_rank[0] & per_rank[1]


def test_dataloader_workers_split_shards(shard_dir):
    from flair_hf import FlairTokenizer

    sources = parse_sources(str(shard_dir / "train-{0000..0003}.tar"))
    stream = FlairTrainingStream(sources, captions_per_image=3, shuffle_buffer=2)
    loader = torch.utils.data.DataLoader(stream, batch_size=4, num_workers=2, collate_fn=make_collate(FlairTokenizer.from_bpe_vocab()))
    batches = list(loader)
    assert sum(b["pixel_values"].shape[0] for b in batches) == 20
    assert batches[0]["input_ids"].shape == (12, 77)


def test_corrupt_sample_and_shard_are_skipped_and_counted(tmp_path, caplog):
    write_shard(tmp_path / "good.tar", 0, 4, corrupt_index=2)
    write_corrupt_shard(tmp_path / "broken.tar")
    stream = FlairTrainingStream(parse_sources(f"{tmp_path}/{{good,broken}}.tar"), captions_per_image=2, shuffle_buffer=1)
    samples = list(stream)
    assert stream.stats.corrupt_samples >= 1 and stream.stats.corrupt_shards == 1
    assert 3 <= len(samples) < 7
    assert "skipping corrupt sample" in caplog.text and "skipping the rest of corrupt shard" in caplog.text


def test_weighted_sources_are_resampled_in_proportion(tmp_path):
    write_shard(tmp_path / "a.tar", 0, 2)
    write_shard(tmp_path / "b.tar", 100, 2)
    stream = FlairTrainingStream(parse_sources(f"{tmp_path}/a.tar::{tmp_path}/b.tar", "0.9::0.1"), captions_per_image=1, shuffle_buffer=1)
    shards = list(itertools.islice(stream._shard_order(), 400))
    share = shards.count(str(tmp_path / "a.tar")) / len(shards)
    assert 0.8 < share < 0.97


def test_datasets_image_text_dataset(tmp_path):
    import datasets
    from PIL import Image

    paths = []
    for i in range(6):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (30, 20), (i * 40, 0, 0)).save(paths[-1])
    dataset = datasets.Dataset.from_dict({"img": paths, "text": [f"Sentence {i}. Another" for i in range(6)]}).cast_column("img", datasets.Image())
    stream = FlairTrainingStream(dataset=dataset, image_column="img", caption_column="text", captions_per_image=2, rank=1, world_size=2, shuffle_buffer=1)
    samples = list(stream)
    assert len(samples) == 3 and all(len(texts) == 2 for _, texts in samples)


def test_random_resized_crop_keeps_most_of_the_image():
    transform = RandomResizedCropTransform()
    rng = random.Random(0)
    for _ in range(100):
        left, top, right, bottom = transform.crop_box(400, 300, rng)
        area = (right - left) * (bottom - top) / (400 * 300)
        assert 0.85 <= area <= 1.0 and 0 <= left and right <= 400 and 0 <= top and bottom <= 300
    from PIL import Image

    pixels = transform(Image.new("L", (50, 80)), rng)
    assert pixels.shape == (3, 224, 224)


def test_txt_captions_are_used(tmp_path):
    write_shard(tmp_path / "txt.tar", 0, 3, captions="A cat on a mat. It sleeps")
    samples = list(FlairTrainingStream(parse_sources(str(tmp_path / "txt.tar")), captions_per_image=2, shuffle_buffer=1))
    assert len(samples) == 3
    assert all(set(". ".join(texts).split(". ")) <= {"A cat on a mat", "It sleeps"} for _, texts in samples)


@pytest.mark.parametrize("captions", [{}, {"captions": ["a dog"]}])
def test_unusable_captions_stop_with_one_summary(tmp_path, caplog, captions):
    write_shard(tmp_path / "bad.tar", 0, 6, captions=captions)
    stream = FlairTrainingStream(parse_sources(str(tmp_path / "bad.tar")), shuffle_buffer=1)
    with pytest.raises(DataError) as error:
        list(stream)
    message = str(error.value)
    assert message.startswith("all 6 training samples are unusable: no usable captions: expected a .json with one of the keys raw_caption")
    assert "(--caption-keys)" in message and "found sample fields jpg, json and json keys " + ("captions" if captions else "none") in message
    assert stream.stats.unusable_captions == 6
    assert caplog.text.count("no usable captions") == 1  # one warning, not one per sample


def test_a_long_run_of_unusable_samples_stops_early(tmp_path, monkeypatch):

    monkeypatch.setattr(data, "CHECK_FIRST", 4)
    write_shard(tmp_path / "bad.tar", 0, 10, captions={})
    stream = FlairTrainingStream(parse_sources(str(tmp_path / "bad.tar")), shuffle_buffer=1)
    with pytest.raises(DataError, match="the first 4 training samples are all unusable"):
        list(stream)
    assert stream.stats.unusable_captions == 4


def test_missing_shards_and_directories_are_named(tmp_path):
    write_shard(tmp_path / "a.tar", 0, 2)
    with pytest.raises(DataError, match=r"2 of 3 shards do not exist \(first: .*b.tar\)"):
        check_shards(parse_sources(f"{tmp_path}/{{a,b,c}}.tar"))
    with pytest.raises(DataError, match="is a directory: name the shard files"):
        check_shards(parse_sources(str(tmp_path)))
    check_shards(parse_sources(f"{tmp_path}/a.tar::https://example.org/x.tar"))
