"""Training data for FLAIR: webdataset shards (through `datasets`' streaming webdataset loader) or any `datasets`
image-text dataset, with per-rank/worker splitting, buffer shuffling, source mixing, sub-caption sampling and the
training image transform. Corrupt samples and shards are skipped with a warning and counted.
"""

import io
import itertools
import logging
import math
import random
import re
import zlib
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from flair_hf import FlairImageProcessor
from flair_hf.captions import DREAMLIP_KEYS, caption_sentences, sample_subcaptions

logger = logging.getLogger(__name__)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


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
        raise ValueError(f"{len(sources)} sources but {len(values)} weights: {spec!r} / {weights!r}")
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


@dataclass
class DataStats:
    """Counters of skipped data (per worker; logged by the trainer)."""

    corrupt_samples: int = 0
    corrupt_shards: int = 0
    skipped: list = field(default_factory=list)


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
            raise ValueError(f"rank {self.rank} worker {self._worker()[0]} has no shards: use fewer ranks/workers or more shards")
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
            self.stats.corrupt_shards += 1
            self.stats.skipped.append(shard)
            logger.warning("skipping the rest of corrupt shard %s: %s", shard, error)

    def _webdataset_samples(self):
        for shard in self._shard_order():
            for record in self._shard_records(shard):
                image = next((record[key] for key in IMAGE_KEYS if record.get(key) is not None), None)
                yield record.get("__key__"), image, record.get("json")

    def _dataset_samples(self):
        from datasets.distributed import split_dataset_by_node

        worker, num_workers = self._worker()
        part = split_dataset_by_node(self.dataset, rank=self.rank * num_workers + worker, world_size=self.world_size * num_workers)
        if hasattr(part, "shuffle") and not hasattr(part, "n_shards"):  # map-style: reshuffle each epoch
            part = part.shuffle(seed=zlib.crc32(repr((self.seed, self.epoch)).encode()))
        for index, row in enumerate(part):
            caption = row[self.caption_column]
            yield index, row[self.image_column], {"caption": caption} if isinstance(caption, str) else caption

    def _decode(self, key, image, captions) -> tuple[torch.Tensor, list[str]] | None:
        try:
            if isinstance(image, dict):
                image = Image.open(io.BytesIO(image["bytes"])) if image.get("bytes") else Image.open(image["path"])
            image.load()
            sentences = caption_sentences(captions or {}, self.caption_keys)
            rng = self._rng(str(key))
            texts = sample_subcaptions(sentences, self.captions_per_image, self.max_merged, rng)
            return self.transform(image, rng), texts
        except Exception as error:  # noqa: BLE001 - a broken sample must not end the run
            self.stats.corrupt_samples += 1
            logger.warning("skipping corrupt sample %s: %s", key, error)
            return None

    def __iter__(self):
        samples = self._webdataset_samples() if self.sources is not None else self._dataset_samples()
        rng, buffer = self._rng(3), []
        for raw in samples:
            sample = self._decode(*raw)
            if sample is None:
                continue
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


__all__ = ["FlairTrainingStream", "RandomResizedCropTransform", "expand_braces", "make_collate", "parse_sources"]
