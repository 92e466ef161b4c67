"""Training data for FLAIR: webdataset shards (through `datasets`' streaming webdataset loader) or any `datasets`
image-text dataset, with per-rank/worker splitting, buffer shuffling, source mixing, sub-caption sampling and the
training image transform. Corrupt samples and shards are skipped, warned about once per worker and counted in
counters shared by all DataLoader workers; a stream whose first samples are all unusable stops with a summary.
"""

import io
import itertools
import logging
import math
import multiprocessing
import os
import random
import re
import zlib
from collections import namedtuple
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from flair_hf import FlairImageProcessor
from flair_hf.captions import DREAMLIP_KEYS, caption_sentences, sample_subcaptions

logger = logging.getLogger(__name__)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
Skipped = namedtuple("Skipped", "kind message")  # an unusable sample: its DataStats counter and why
CHECK_FIRST = 200  # a worker whose first CHECK_FIRST samples are all unusable stops the run


class DataError(ValueError):
    """Training data that cannot be used: the message is one line naming the cause and the fix."""


def check_shards(sources: list[tuple[list[str], float]]) -> None:
    """Every local shard must be an existing file (URLs and `pipe:` commands are left to the loader)."""
    local = [shard for files, _ in sources for shard in files if "://" not in shard and not shard.startswith("pipe:")]
    directories = [shard for shard in local if os.path.isdir(shard)]
    if directories:
        raise DataError(
            f"--train-data {directories[0]} is a directory: name the shard files, e.g. "
            f"'{directories[0].rstrip('/')}/train-{{0000..0099}}.tar' (brace patterns expand)"
        )
    missing = [shard for shard in local if not os.path.isfile(shard)]
    if missing:
        raise DataError(
            f"--train-data: {len(missing)} of {len(local)} shards do not exist (first: {missing[0]}); "
            "check the path and the brace pattern"
        )


def expand_braces(pattern: str) -> list[str]:
    """`cc3m-{0000..0002}.tar` -> three names (zero padding kept); `{a,b}` lists; several groups multiply."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end() :]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(first), int(last) + 1)]
    else:
        options = body.split(",")
    return [name for option in options for name in expand_braces(head + option + tail)]


def parse_sources(spec: str, weights: str | None = None) -> list[tuple[list[str], float]]:
    """`"a-{0..9}.tar::b-{0..4}.tar"` (+ optional `"0.7::0.3"`) -> [(shards, weight), ...]."""
    sources = [expand_braces(part) for part in spec.split("::")]
    values = [1.0] * len(sources) if weights is None else [float(w) for w in str(weights).split("::")]
    if len(values) != len(sources):
        raise DataError(f"{len(sources)} sources but {len(values)} weights: {spec!r} / {weights!r}")
    return list(zip(sources, values))


class RandomResizedCropTransform:
    """Training transform without torchvision: random resized crop (scale (0.9, 1.0), ratio 3/4..4/3, bicubic) as
    torchvision's `RandomResizedCrop`, then RGB and the CLIP normalisation of `FlairImageProcessor`."""

    def __init__(self, size: int = 224, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = size, scale, ratio
        self.normalize = FlairImageProcessor(do_resize=False, do_center_crop=False)

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top, left = rng.randint(0, height - h), rng.randint(0, width - w)
                return left, top, left + w, top + h
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def __call__(self, image: Image.Image, rng: random.Random) -> torch.Tensor:
        box = self.crop_box(*image.size, rng)
        image = image.resize((self.size, self.size), Image.BICUBIC, box=box)
        return self.normalize(image, return_tensors="pt")["pixel_values"][0]


class DataStats:
    """Counts of skipped data, in shared memory so that every DataLoader worker adds to the same counters."""

    FIELDS = ("corrupt_samples", "unusable_captions", "corrupt_shards")

    def __init__(self):
        self._counts = multiprocessing.Array("q", len(self.FIELDS))

    def add(self, name: str, count: int = 1) -> None:
        with self._counts.get_lock():
            self._counts[self.FIELDS.index(name)] += count

    def as_dict(self) -> dict[str, int]:
        return dict(zip(self.FIELDS, self._counts[:]))

    def __getattr__(self, name: str) -> int:
        if name in DataStats.FIELDS:
            return self._counts[DataStats.FIELDS.index(name)]
        raise AttributeError(name)


class FlairTrainingStream(IterableDataset):
    """Samples `(pixel_values (3, S, S), K sub-captions)` from webdataset shards or a `datasets` dataset.

    Shards are split across ranks, then across dataloader workers; each worker shuffles its shard order per epoch
    and its samples through a buffer, seeded by (seed, epoch, rank, worker), so a run is reproducible. With several
    weighted sources, shards are drawn with replacement in proportion to the weights (the original's Merged-30M mix).
    """

    def __init__(
        self,
        sources: list[tuple[list[str], float]] | None = None,
        dataset=None,
        image_column: str = "image",
        caption_column: str = "caption",
        captions_per_image: int = 8,
        max_merged: int = 3,
        caption_keys: tuple[str, ...] = DREAMLIP_KEYS,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        image_size: int = 224,
        resampled: bool | None = None,
    ):
        if (sources is None) == (dataset is None):
            raise ValueError("give webdataset `sources` or a `datasets` `dataset`")
        self.sources, self.dataset = sources, dataset
        self.image_column, self.caption_column = image_column, caption_column
        self.captions_per_image, self.max_merged, self.caption_keys = captions_per_image, max_merged, caption_keys
        self.shuffle_buffer, self.seed, self.rank, self.world_size = shuffle_buffer, seed, rank, world_size
        self.resampled = resampled if resampled is not None else bool(sources and len(sources) > 1)
        self.transform = RandomResizedCropTransform(image_size)
        self.epoch = 0
        self.stats = DataStats()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def _rng(self, purpose: int | str) -> random.Random:
        """A generator seeded by (seed, epoch, rank, worker, purpose), stable across processes."""
        worker, _ = self._worker()
        return random.Random(zlib.crc32(repr((self.seed, self.epoch, self.rank, worker, purpose)).encode()))

    def _my_shards(self) -> list[tuple[str, float]]:
        worker, num_workers = self._worker()
        shards = [(shard, weight / len(files)) for files, weight in self.sources for shard in files]
        return shards[self.rank :: self.world_size][worker::num_workers]

    def _shard_order(self):
        shards, rng = self._my_shards(), self._rng(1)
        if not shards:
            raise DataError(f"rank {self.rank} worker {self._worker()[0]} has no shards: use fewer ranks/workers or more shards")
        if self.resampled:
            names, weights = zip(*shards)
            while True:
                yield rng.choices(names, weights=weights)[0]
        else:
            names = [name for name, _ in shards]
            rng.shuffle(names)
            yield from names

    def _shard_records(self, shard: str):
        import datasets

        try:
            stream = datasets.load_dataset("webdataset", data_files={"train": [shard]}, split="train", streaming=True)
            image_keys = [key for key in IMAGE_KEYS if key in (stream.features or {})]
            for key in image_keys:
                stream = stream.cast_column(key, datasets.Image(decode=False))
            # `.iter` does not re-split shards across torch workers (this stream already holds one worker's shard)
            for batch in stream.iter(batch_size=1):
                yield {key: values[0] for key, values in batch.items()}
        except Exception as error:  # noqa: BLE001 - a broken shard must not end the run
            self.stats.add("corrupt_shards")
            logger.warning("skipping the rest of corrupt shard %s: %s", shard, error)

    def _webdataset_samples(self):
        for shard in self._shard_order():
            for record in self._shard_records(shard):
                image = next((record[key] for key in IMAGE_KEYS if record.get(key) is not None), None)
                captions = record.get("json") if isinstance(record.get("json"), dict) else {}
                if isinstance(record.get("txt"), str) and "caption" not in captions:
                    captions = {**captions, "caption": record["txt"]}  # img2dataset's .txt caption
                fields = sorted(key for key, value in record.items() if not key.startswith("__") and value is not None)
                yield record.get("__key__"), image, captions, fields

    def _dataset_samples(self):
        from datasets.distributed import split_dataset_by_node

        worker, num_workers = self._worker()
        part = split_dataset_by_node(self.dataset, rank=self.rank * num_workers + worker, world_size=self.world_size * num_workers)
        if hasattr(part, "shuffle") and not hasattr(part, "n_shards"):  # map-style: reshuffle each epoch
            part = part.shuffle(seed=zlib.crc32(repr((self.seed, self.epoch)).encode()))
        for index, row in enumerate(part):
            caption = row[self.caption_column]
            yield index, row[self.image_column], {"caption": caption} if isinstance(caption, str) else caption, [self.caption_column]

    def _caption_problem(self, captions, fields: list[str]) -> str:
        found = sorted(captions) if isinstance(captions, dict) and captions else "none"
        return (
            f"no usable captions: expected a .json with one of the keys {', '.join(self.caption_keys)} (--caption-keys) "
            f"or a 'caption' string, or a .txt caption; found sample fields {', '.join(fields) or 'none'} and json keys "
            f"{', '.join(found) if isinstance(found, list) else found}"
        )

    def _decode(self, key, image, captions, fields) -> tuple[torch.Tensor, list[str]] | Skipped:
        """`(pixels, sub-captions)`, or why the sample is unusable (counted in `stats`)."""
        sentences = caption_sentences(captions, self.caption_keys) if isinstance(captions, dict) else []
        if not sentences:
            self.stats.add("unusable_captions")
            return Skipped("unusable_captions", self._caption_problem(captions, fields))
        try:
            if isinstance(image, dict):
                image = Image.open(io.BytesIO(image["bytes"])) if image.get("bytes") else Image.open(image["path"])
            image.load()
        except Exception as error:  # noqa: BLE001 - a broken sample must not end the run
            self.stats.add("corrupt_samples")
            return Skipped("corrupt_samples", f"skipping corrupt sample {key}: {error}")
        rng = self._rng(str(key))
        texts = sample_subcaptions(sentences, self.captions_per_image, self.max_merged, rng)
        return self.transform(image, rng), texts

    def _usable_samples(self):
        """Decoded samples; problems are warned about once per kind, and a worker whose first `CHECK_FIRST` samples
        (or all, if fewer) are unusable raises `DataError` with the last problem."""
        seen, usable, warned = 0, 0, set()
        samples = self._webdataset_samples() if self.sources is not None else self._dataset_samples()
        for raw in samples:
            seen += 1
            sample = self._decode(*raw)
            if isinstance(sample, Skipped):
                if sample.kind not in warned:
                    warned.add(sample.kind)
                    logger.warning("%s (further ones are counted as %s, not shown)", sample.message, sample.kind)
                if usable == 0 and seen >= CHECK_FIRST:
                    raise DataError(f"the first {seen} training samples are all unusable: {sample.message}")
                last_problem = sample.message
                continue
            usable += 1
            yield sample
        if seen and not usable:
            raise DataError(f"all {seen} training samples are unusable: {last_problem}")

    def __iter__(self):
        rng, buffer = self._rng(3), []
        for sample in self._usable_samples():
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            index = rng.randrange(len(buffer))
            buffer[index], sample = sample, buffer[index]
            yield sample
        rng.shuffle(buffer)
        yield from buffer


def make_collate(tokenizer, context_length: int = 77):
    """Batch `(pixel_values (B, 3, S, S), input_ids (B * K, 77))`; caption k of image i is row i*K + k."""

    def collate(samples):
        pixel_values = torch.stack([pixels for pixels, _ in samples])
        texts = list(itertools.chain.from_iterable(captions for _, captions in samples))
        input_ids = tokenizer(texts, padding="max_length", truncation=True, max_length=context_length, return_tensors="pt")
        return {"pixel_values": pixel_values, "input_ids": input_ids["input_ids"]}

    return collate


__all__ = ["DataError", "DataStats", "FlairTrainingStream", "check_shards", "RandomResizedCropTransform", "expand_braces", "make_collate", "parse_sources"]
