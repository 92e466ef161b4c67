"""A broken webdataset shard for the training-data tests (whole shards: `flair_hf_benchmarks.synthetic.write_shard`)."""

from pathlib import Path

from flair_hf_benchmarks.synthetic import write_shard


def write_corrupt_shard(path: Path) -> None:
    """A truncated tar: the first sample is readable, then the archive breaks."""
    good = path.with_suffix(".good.tar")
    write_shard(good, 900, 3)
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])
    good.unlink()
