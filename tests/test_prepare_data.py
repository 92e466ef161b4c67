"""Caption CSV -> img2dataset shards (images served by a local HTTP server on 127.0.0.1) -> 2 training steps."""

import contextlib
import csv
import functools
import http.server
import io
import json
import subprocess
import sys
import tarfile
import threading

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT

from flair_hf_training import prepare_data

CAPTIONS = {
    "raw_caption": "A red square on white.",
    "shortIB_captions": "A square. It is red",
    "longIB_captions": "A bright red square sits in the middle of a white canvas. Nothing else is there",
    "shortSV_captions": "Red square",
    "longSV_captions": "The picture shows one red square.\nThe background is plain white",
    "shortLLA_captions": "A red shape",
    "longLLA_captions": "A single red square is centred on a white background. The edges are sharp",
}


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def image_server(directory, seconds=120):
    """Serve `directory` on 127.0.0.1 (a free port) for at most `seconds`; stopped on exit either way."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    timer = threading.Timer(seconds, server.shutdown)
    timer.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        timer.cancel()
        server.shutdown()
        server.server_close()


def write_caption_csv(path, base_url, count, missing=()):
    """A DreamLIP-style CSV: `Image Path` URLs (some of them 404) and the seven caption columns."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["Image Path", *CAPTIONS])
        writer.writeheader()
        for i in range(count):
            name = f"missing_{i}.jpg" if i in missing else f"image_{i}.jpg"
            writer.writerow({"Image Path": f"{base_url}/{name}", **{k: f"{v} Sample {i}" for k, v in CAPTIONS.items()}})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare")
    (root / "www").mkdir()
    for i in range(10):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (40 + i, 60, 3), dtype=np.uint8)).save(root / "www" / f"image_{i}.jpg")
    with image_server(root / "www") as url:
        write_caption_csv(root / "captions.csv", url, 10, missing={3, 7})
        args = [str(root / "captions.csv"), "--output-dir", str(root / "shards"), "--processes", "1", "--threads", "4",
                "--samples-per-shard", "4", "--image-size", "64", "--timeout", "5"]  # fmt: skip
        summary = prepare_data.main(args)
    return root, summary


def test_csv_to_shards_with_captions_and_summary(prepared):
    root, summary = prepared
    assert summary["rows_read"] == 10 and summary["images_fetched"] == 8 and summary["failed"] == 2
    assert summary["failed_to_download"] == 2 and summary["shards"] == 3 and summary["shard_pattern"] == "{00000..00002}.tar"
    assert json.loads((root / "shards" / "prepare_summary.json").read_text()) == summary
    assert not (root / "shards.partial").exists() and not (root / "shards" / "_captions.parquet").exists()
    records = []
    for shard in sorted((root / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    records.append(json.loads(tar.extractfile(member).read()))
                elif member.name.endswith(".jpg"):
                    assert min(Image.open(io.BytesIO(tar.extractfile(member).read())).size) <= 64
    assert len(records) == 8
    indices = sorted(int(r["url"].rsplit("_", 1)[1].split(".")[0]) for r in records)
    assert indices == [0, 1, 2, 4, 5, 6, 8, 9]
    for record in records:
        i = int(record["url"].rsplit("_", 1)[1].split(".")[0])
        assert {k: record[k] for k in CAPTIONS} == {k: f"{v} Sample {i}" for k, v in CAPTIONS.items()}


def test_training_runs_on_the_prepared_shards(prepared, tmp_path):
    root, summary = prepared
    command = [sys.executable, str(ROOT / "training" / "train.py"), "--config", str(ROOT / "training" / "configs" / "tiny_cpu.yaml"),
               "--train-data", str(root / "shards" / summary["shard_pattern"]), "--train-num-samples", "8",
               "--max-steps", "2", "--output-dir", str(tmp_path / "run")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2


def test_existing_output_and_unknown_columns_are_clear_errors(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "file").write_text("x")
    (tmp_path / "plain.csv").write_text("link,text\nhttp://127.0.0.1:9/a.jpg,a cat\n")
    with pytest.raises(SystemExit, match="already exists and is not an empty directory"):
        prepare_data.main([str(tmp_path / "plain.csv"), "--output-dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="cannot tell the caption format from the columns"):
        prepare_data.main([str(tmp_path / "plain.csv"), "--output-dir", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()
    with pytest.raises(SystemExit, match="caption file not found"):
        prepare_data.main([str(tmp_path / "nope.csv"), "--output-dir", str(tmp_path / "new2")])
