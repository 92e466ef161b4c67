"""Retrieval evaluation of a FLAIR checkpoint (HF format) on the FLAIR benchmarks, as in the paper's tables.

    python benchmarks/evaluate_retrieval.py --model DIR_OR_HUB_ID --benchmark coco [--benchmark flickr30k ...]
        --data-root PATH --mode flair|topk|global [--topk 128] [--batch-size 64] [--device cpu|cuda]
        [--autocast bf16|fp16] [--cache-dir DIR] [--output results.json] [--compare-paper]

Benchmarks (original layouts under --data-root; `flair_hf.retrieval_data.LAYOUTS`): coco, flickr30k (val file),
flickr30k-test, docci, iiw, iiw-long, dci-long, urban1k, sharegpt4v-1k, sharegpt4v-10k. `--hub-dataset ID`
evaluates a Hub copy instead (online only; `--hub-split`, `--hub-image-column`, `--hub-caption-column`).

Features (global text and image embeddings, projected patch tokens) are computed once per model and benchmark and,
with --cache-dir, cached as safetensors keyed by model and data, so changing --mode or --topk does not re-encode.
Writes one JSON file per run (metrics, mode, counts, model revision, timings) and prints a markdown table.
"""

import argparse
import hashlib
import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from flair_hf import FlairModel, FlairProcessor
from flair_hf.retrieval import flair_scores, global_scores, topk_scores
from flair_hf.retrieval_data import LAYOUTS, load_benchmark, load_hub_benchmark

METRIC_PATH = Path(__file__).resolve().parent / "metrics" / "flair_retrieval"
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Published R@1 (FLAIR README; flair mode, amp): checkpoint -> benchmark -> (text->image, image->text)
PAPER_R1 = {
    "flair-cc3m-recap": {"coco": (37.7, 51.6), "flickr30k": (65.7, 78.7)},
    "flair-cc12m-recap": {"coco": (47.8, 64.1), "flickr30k": (75.4, 90.8)},
    "flair-yfcc15m-recap": {"coco": (51.2, 67.3), "flickr30k": (79.2, 93.3)},
    "flair-merged30m": {"coco": (53.3, 68.0), "flickr30k": (81.1, 94.7)},
}


def _load_metric_module():
    """The `evaluate` metric module's own code (its `retrieval_metrics`), without Arrow-converting huge score matrices."""
    spec = importlib.util.spec_from_file_location("flair_retrieval_metric", METRIC_PATH / "flair_retrieval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flatten_captions(dataset) -> tuple[list[str], np.ndarray]:
    """All captions in original caption order and, for each, the row of its image."""
    pairs = sorted(
        (caption_id, caption, image)
        for image, (captions, ids) in enumerate(zip(dataset["captions"], dataset["caption_ids"]))
        for caption, caption_id in zip(captions, ids)
    )
    return [caption for _, caption, _ in pairs], np.array([image for _, _, image in pairs], dtype=np.int64)


def model_revision(model: FlairModel, model_id: str) -> str:
    """Hub commit for Hub models; for local directories a hash of the weights file's size and modification time."""
    commit = getattr(model.config, "_commit_hash", None)
    if commit:
        return commit
    weights = Path(model_id) / "model.safetensors"
    if weights.is_file():
        stat = weights.stat()
        return "local-" + hashlib.sha256(f"{weights.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return "unknown"


def cache_key(revision: str, benchmark: str, dataset, dtype: str) -> str:
    data = [list(dataset["image_path"]), [list(c) for c in dataset["captions"]]]
    digest = hashlib.sha256(json.dumps([revision, benchmark, dtype, data]).encode())
    return f"{benchmark}-{digest.hexdigest()[:24]}"


@torch.no_grad()
def encode(model, processor, dataset, captions, batch_size, device, autocast_dtype) -> dict:
    """Global text/image embeddings and projected patch tokens (float32, CPU), with progress bars."""
    context = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else torch.autocast(device.type, enabled=False)
    text_embeds, image_embeds, image_tokens = [], [], []
    with context:
        for start in tqdm(range(0, len(captions), batch_size), desc="encoding texts", unit="batch"):
            ids = processor(text=captions[start : start + batch_size])["input_ids"].to(device)
            text_embeds.append(model.get_text_features(ids).float().cpu())
        for start in tqdm(range(0, len(dataset), batch_size), desc="encoding images", unit="batch"):
            images = dataset[start : start + batch_size]["image"]
            pixels = processor(images=images)["pixel_values"].to(device)
            embeds, tokens = model.get_image_and_token_features(pixels)
            image_embeds.append(embeds.float().cpu())
            image_tokens.append(tokens.float().cpu())
    return {
        "text_embeds": torch.cat(text_embeds),
        "image_embeds": torch.cat(image_embeds),
        "image_token_embeds": torch.cat(image_tokens),
    }


def score(model, features, mode, topk, device, autocast_dtype, image_block=64) -> torch.Tensor:
    """`(images, texts)` scores for `mode`; FLAIR modes run in image blocks with a progress bar."""
    if mode == "global":
        return global_scores(features["image_embeds"], features["text_embeds"])
    pooling, text = model.text_conditioned_pooling, features["text_embeds"]
    blocks = []
    for start in tqdm(range(0, len(features["image_embeds"]), image_block), desc=f"scoring ({mode})", unit="block"):
        tokens = features["image_token_embeds"][start : start + image_block]
        kwargs = {"device": device, "autocast_dtype": autocast_dtype}
        if mode == "flair":
            blocks.append(flair_scores(pooling, text, tokens, **kwargs))
        else:
            blocks.append(topk_scores(pooling, text, features["image_embeds"][start : start + image_block], tokens, topk, **kwargs))
    return torch.cat(blocks)


def evaluate_benchmark(model, processor, dataset, benchmark, args, revision, metric_module) -> dict:
    device = torch.device(args.device)
    autocast_dtype = AUTOCAST.get(args.autocast) if device.type == "cuda" else None
    captions, text_to_image = flatten_captions(dataset)
    timings = {}
    start = time.perf_counter()
    cache_path = None
    if args.cache_dir:
        cache_path = Path(args.cache_dir) / f"{cache_key(revision, benchmark, dataset, args.autocast or 'fp32')}.safetensors"
    if cache_path is not None and cache_path.is_file():
        features, timings["cached_features"] = load_file(cache_path), True
    else:
        features = encode(model, processor, dataset, captions, args.batch_size, device, autocast_dtype)
        if cache_path is not None:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            partial = cache_path.with_suffix(".tmp")
            save_file(features, partial)
            os.replace(partial, cache_path)
        timings["cached_features"] = False
    timings["encode_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    scores = score(model, features, args.mode, args.topk, device, autocast_dtype)
    timings["score_seconds"] = time.perf_counter() - start
    metrics = metric_module.retrieval_metrics(scores.t().numpy(), text_to_image)
    return {"benchmark": benchmark, "metrics": metrics, "num_images": len(dataset), "num_texts": len(captions), "timings": timings}


def markdown_table(results: list[dict], paper: dict | None) -> str:
    header = "| benchmark | mode | T2I R@1 | T2I R@5 | T2I R@10 | I2T R@1 | I2T R@5 | I2T R@10 |"
    lines = [header, "|" + "---|" * 8]
    for result in results:
        m = result["metrics"]
        row = [m[f"text_to_image_R@{k}"] for k in (1, 5, 10)] + [m[f"image_to_text_R@{k}"] for k in (1, 5, 10)]
        lines.append(f"| {result['benchmark']} | {result['mode']} | " + " | ".join(f"{v:.1f}" for v in row) + " |")
        if paper and result["benchmark"] in paper:
            t2i, i2t = paper[result["benchmark"]]
            lines.append(f"| {result['benchmark']} (paper) | flair | {t2i:.1f} | | | {i2t:.1f} | | |")
    return "\n".join(lines)


def paper_numbers(model_id: str) -> dict | None:
    return next((numbers for name, numbers in PAPER_R1.items() if name in str(model_id)), None)


def parse_args(argv=None):
    layouts = "original layouts under --data-root:\n" + "\n".join(f"  {name}: {layout}" for name, layout in LAYOUTS.items())
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=layouts, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="converted FLAIR directory or Hub id")
    parser.add_argument("--benchmark", action="append", choices=sorted(LAYOUTS), help="repeat for several")
    parser.add_argument("--data-root", help="root holding the benchmarks' original layouts")
    parser.add_argument("--hub-dataset", help="evaluate a Hub dataset copy instead of a local layout (online only)")
    parser.add_argument("--hub-split", default="test")
    parser.add_argument("--hub-image-column", default="image")
    parser.add_argument("--hub-caption-column", default="caption")
    parser.add_argument("--mode", choices=["flair", "topk", "global"], default="flair")
    parser.add_argument("--topk", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--autocast", choices=sorted(AUTOCAST), help="CUDA autocast dtype for encoding and scoring")
    parser.add_argument("--cache-dir", help="cache features here (safetensors, keyed by model and data)")
    parser.add_argument("--output", default="retrieval_results.json")
    parser.add_argument("--compare-paper", action="store_true", help="print the paper's R@1 beside ours where known")
    args = parser.parse_args(argv)
    if bool(args.hub_dataset) == bool(args.benchmark):
        parser.error("give --benchmark (with --data-root) or --hub-dataset")
    if args.benchmark and not args.data_root:
        parser.error("--benchmark needs --data-root (the original layouts; see --help)")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    datasets_to_run = (
        [(name, load_benchmark(name, args.data_root)) for name in args.benchmark]
        if args.benchmark
        else [(args.hub_dataset, load_hub_benchmark(args.hub_dataset, args.hub_split, args.hub_image_column, args.hub_caption_column))]
    )  # every image is checked before any model work
    model = FlairModel.from_pretrained(args.model).to(args.device).eval()
    processor = FlairProcessor.from_pretrained(args.model)
    revision, metric_module = model_revision(model, args.model), _load_metric_module()
    results = []
    for name, dataset in datasets_to_run:
        result = evaluate_benchmark(model, processor, dataset, name, args, revision, metric_module)
        result.update({"mode": args.mode, "topk": args.topk if args.mode == "topk" else None, "model": str(args.model)})
        result.update({"model_revision": revision, "device": args.device, "autocast": args.autocast})
        results.append(result)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2))
    print(markdown_table(results, paper_numbers(args.model) if args.compare_paper else None))
    print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
