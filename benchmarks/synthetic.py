"""Synthetic inputs shared by the benchmarks and the tests: caption token ids and webdataset shards."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CAPTIONS = ["A red square. It is bright. On white", "A blue circle. Small</s>Centered", "Green stripes.\nThin lines. Many of them"]


def ids_ending_at(ends, generator: torch.Generator) -> torch.Tensor:
    """`(len(ends), 77)` ids: start token, random tokens, end-of-text at `ends[i]`, zero padding after it."""
    ends = torch.as_tensor(ends)
    ids = torch.randint(1, 49406, (len(ends), 77), generator=generator)
    ids[:, 0] = 49406
    ids[torch.arange(len(ends)), ends] = 49407
    ids[torch.arange(77)[None, :] > ends[:, None]] = 0
    return ids


def caption_ids(texts: int, lengths: str, seed: int = 0) -> torch.Tensor:
    """`(texts, 77)` token ids: `flair` lengths (1-3 sentences of 12-28 tokens plus start/end, at most 77) or `full`."""
    generator = torch.Generator().manual_seed(seed)
    if lengths == "full":
        return ids_ending_at(torch.full((texts,), 76), generator)
    sentences = torch.randint(1, 4, (texts,), generator=generator)
    tokens = torch.randint(12, 29, (texts, 3), generator=generator) * (torch.arange(3) < sentences[:, None])
    return ids_ending_at((tokens.sum(1) + 1).clamp(max=76), generator)


def write_shard(
    path: Path, start: int, count: int, corrupt_index: int | None = None, extension: str = "jpg",
    captions: dict | str | None = None, image_size: tuple[int, int] = (48, 64),
) -> None:  # fmt: skip
    """A webdataset tar of `count` samples (a random `image_size` image + DreamLIP/PixelProse-style json, the two
    styles alternating); `corrupt_index` gets undecodable image bytes; `captions`: the same json record (a dict) or
    `.txt` caption (a string) for every sample instead."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + count):
            rng = np.random.default_rng(i)
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (*image_size, 3), dtype=np.uint8)).save(buffer, format="PNG" if extension == "png" else "JPEG")
            data = buffer.getvalue() if i != corrupt_index else b"\xff\xd8 broken"
            record = {"caption": CAPTIONS[i % 3]} if i % 2 else {"raw_caption": [CAPTIONS[i % 3]], "longSV_captions": "Extra sentence. Another one"}
            if isinstance(captions, str):
                caption_file = (f"{i:06d}.txt", captions.encode())
            else:
                caption_file = (f"{i:06d}.json", json.dumps(record if captions is None else captions).encode())
            for name, payload in ((f"{i:06d}.{extension}", data), caption_file):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def synthetic_shards(directory: Path, shards: int = 4, per_shard: int = 64) -> str:
    """`shards` webdataset tars of `per_shard` 256x256 samples in `directory`; returns their brace pattern."""
    for shard in range(shards):
        write_shard(directory / f"bench-{shard:04d}.tar", shard * per_shard, per_shard, image_size=(256, 256))
    return str(directory / f"bench-{{0000..{shards - 1:04d}}}.tar")
