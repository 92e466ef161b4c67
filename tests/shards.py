"""Tiny webdataset shards for the training tests."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CAPTIONS = ["A red square. It is bright. On white", "A blue circle. Small</s>Centered", "Green stripes.\nThin lines. Many of them"]


def write_shard(
    path: Path, start: int, count: int, corrupt_index: int | None = None, extension: str = "jpg", captions: dict | str | None = None
) -> None:
    """`count` samples (image + DreamLIP/PixelProse-style json); `corrupt_index` gets undecodable image bytes;
    `captions`: the same json record (a dict) or `.txt` caption (a string) for every sample instead."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + count):
            rng = np.random.default_rng(i)
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buffer, format="PNG" if extension == "png" else "JPEG")
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


def write_corrupt_shard(path: Path) -> None:
    """A truncated tar: the first sample is readable, then the archive breaks."""
    good = path.with_suffix(".good.tar")
    write_shard(good, 900, 3)
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])
    good.unlink()
