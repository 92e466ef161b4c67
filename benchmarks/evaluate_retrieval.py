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
import json
from pathlib import Path

import torch

from flair_hf_benchmarks.model_loading import OnnxEvaluationModel, load_model_and_processor
from flair_hf_benchmarks.reporting import write_results
from flair_hf_conversion.convert_flair_to_hf import file_digest, local_revision

from flair_hf.evaluation import MODES, PAPER_R1, PAPER_SET_SIZES, evaluate_retrieval
from flair_hf.retrieval_data import LAYOUTS, BenchmarkDataError, load_benchmark, load_hub_benchmark

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def model_revision(model, model_id: str) -> str:
    """Hub commit for Hub models; for local directories a hash of the contents of every weights file (sharded too;
    an ONNX export's graphs and their weights)."""
    commit = getattr(model.config, "_commit_hash", None)
    if commit:
        return commit
    revision = local_revision(model_id, ("*.safetensors", "onnx/*.onnx"))
    if revision is None:
        raise SystemExit(f"--model {model_id}: no .safetensors or .onnx weights to key the feature cache on")
    return revision


def cache_key(revision: str, benchmark: str, dataset, dtype: str) -> str:
    """Model revision, benchmark, dtype, every caption and every image's path and content hash: an image changed in
    place gets new features, never stale ones."""
    paths = list(dataset["image_path"])
    data = [paths, [file_digest(path) for path in paths], [list(c) for c in dataset["captions"]]]
    digest = hashlib.sha256(json.dumps([revision, benchmark, dtype, data]).encode())
    return f"{benchmark}-{digest.hexdigest()[:24]}"


def evaluate_benchmark(model, processor, dataset, benchmark, args, revision) -> dict:
    autocast_dtype = AUTOCAST.get(args.autocast) if torch.device(args.device).type == "cuda" else None
    cache_path = None
    if args.cache_dir:
        cache_path = Path(args.cache_dir) / f"{cache_key(revision, benchmark, dataset, args.autocast or 'fp32')}.safetensors"
    result = evaluate_retrieval(
        model, processor, dataset, args.mode, args.topk, args.batch_size, args.device, autocast_dtype, cache_path
    )
    if cache_path is not None:
        print(f"{benchmark}: feature cache {'hit' if result['timings']['cached_features'] else 'written'}: {cache_path}")
    return {"benchmark": benchmark, **result}


def markdown_table(results: list[dict], paper: dict | None) -> str:
    header = "| benchmark | mode | T2I R@1 | T2I R@5 | T2I R@10 | I2T R@1 | I2T R@5 | I2T R@10 |"
    lines = [header, "|" + "---|" * 8]
    for result in results:
        m = result["metrics"]
        row = [m[f"text_to_image_R@{k}"] for k in (1, 5, 10)] + [m[f"image_to_text_R@{k}"] for k in (1, 5, 10)]
        lines.append(f"| {result['benchmark']} | {result['mode']} | " + " | ".join(f"{v:.1f}" for v in row) + " |")
        if paper and result["benchmark"] in paper:
            t2i, i2t = paper[result["benchmark"]]
            images, texts = PAPER_SET_SIZES[result["benchmark"]]
            if (result["num_images"], result["num_texts"]) == (images, texts):
                lines.append(f"| {result['benchmark']} (paper) | flair | {t2i:.1f} | | | {i2t:.1f} | | |")
            else:
                lines.append(
                    f"| {result['benchmark']} (paper) | not comparable: the paper's set has {images} images / {texts} texts, "
                    f"this one {result['num_images']} / {result['num_texts']} | | | | | | |"
                )
    return "\n".join(lines)


def paper_numbers(model_id: str) -> dict | None:
    return next((numbers for name, numbers in PAPER_R1.items() if name in str(model_id)), None)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def parse_args(argv=None):
    layouts = "original layouts under --data-root:\n" + "\n".join(f"  {name}: {layout}" for name, layout in LAYOUTS.items())
    parser = argparse.ArgumentParser(description=__doc__, epilog=layouts, formatter_class=HelpFormatter)
    parser.add_argument("--model", required=True, help="converted FLAIR directory, ONNX export (conversion/export_onnx.py) or Hub id")
    parser.add_argument("--benchmark", action="append", choices=sorted(LAYOUTS), help="repeat for several")
    parser.add_argument("--data-root", help="root holding the benchmarks' original layouts")
    parser.add_argument("--hub-dataset", help="evaluate a Hub dataset copy instead of a local layout (online only)")
    parser.add_argument("--hub-split", default="test", help="split of --hub-dataset")
    parser.add_argument("--hub-image-column", default="image", help="image column of --hub-dataset")
    parser.add_argument("--hub-caption-column", default="caption", help="caption column of --hub-dataset")
    parser.add_argument("--mode", choices=MODES, default="flair", help="scoring: text-conditioned, top-k re-scored or global")
    parser.add_argument("--topk", type=int, default=128, help="captions per image re-scored in topk mode")
    parser.add_argument("--batch-size", type=int, default=64, help="images / texts per encoding batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--autocast", choices=sorted(AUTOCAST), help="CUDA autocast dtype for encoding and scoring")
    parser.add_argument("--cache-dir", help="cache features here (safetensors, keyed by model and data)")
    parser.add_argument("--output", default="retrieval_results.json", help="JSON file; the markdown table goes next to it (.md)")
    parser.add_argument("--compare-paper", action="store_true", help="print the paper's R@1 beside ours where known")
    args = parser.parse_args(argv)
    if bool(args.hub_dataset) == bool(args.benchmark):
        parser.error("give --benchmark (with --data-root) or --hub-dataset")
    if args.benchmark and not args.data_root:
        parser.error("--benchmark needs --data-root (the original layouts; see --help)")
    if args.benchmark:
        args.benchmark = list(dict.fromkeys(args.benchmark))  # the same benchmark twice runs once
    model = Path(args.model)
    if not model.is_dir() and (model.is_absolute() or args.model.startswith(".") or args.model.count("/") != 1):
        parser.error(f"--model {args.model}: no such directory, and not a Hub repo id (owner/name)")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    try:  # every image is checked before any model work
        datasets_to_run = (
            [(name, load_benchmark(name, args.data_root)) for name in args.benchmark]
            if args.benchmark
            else [(args.hub_dataset, load_hub_benchmark(args.hub_dataset, args.hub_split, args.hub_image_column, args.hub_caption_column))]
        )
    except BenchmarkDataError as error:
        raise SystemExit(f"error: {error}") from None
    model, processor = load_model_and_processor(args.model, device=args.device)
    if args.autocast and isinstance(model, OnnxEvaluationModel):
        raise SystemExit(f"error: --model {args.model} is an ONNX export: it runs in the precision it was exported in; drop --autocast")
    revision = model_revision(model, args.model)
    results = []
    for name, dataset in datasets_to_run:
        result = evaluate_benchmark(model, processor, dataset, name, args, revision)
        result.update({"mode": args.mode, "topk": args.topk if args.mode == "topk" else None, "model": str(args.model)})
        result.update({"model_revision": revision, "device": args.device, "autocast": args.autocast})
        results.append(result)
    paper = paper_numbers(args.model) if args.compare_paper else None
    if args.compare_paper and paper is None:
        print(f"--compare-paper: {args.model} is not named after a released checkpoint ({', '.join(PAPER_R1)}); nothing to compare")
    write_results(results, markdown_table(results, paper), args.output)
    return results


if __name__ == "__main__":
    main()
