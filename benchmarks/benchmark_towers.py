"""Image and text encoding throughput and peak memory: FlairModel vs transformers' CLIPModel of the same dimensions.

    python benchmarks/benchmark_towers.py [--device cpu|cuda] [--dtype float32|bfloat16|float16]
        [--image-batch 16] [--text-batch 64] [--iterations 5] [--output benchmarks/results/towers.json]

Both models get the ViT-B-16-FLAIR dimensions (exact GELU) and random weights; each is measured with the eager and
the sdpa attention implementation. Prints a table and writes JSON with items/s, peak memory and the FLAIR/CLIP ratio.
"""

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel

from flair_hf import FlairConfig, FlairModel
from flair_hf_benchmarks.measurement import interleaved_times, peak_memory_mib, reset_peak, timed
from flair_hf_benchmarks.synthetic import ids_ending_at


def build_models(implementation: str, device: str, dtype: torch.dtype, model_config: dict | None = None) -> dict:
    """FlairModel and CLIPModel with the same dimensions (ViT-B-16-FLAIR unless `model_config` says otherwise)."""
    flair_config = FlairConfig(**(model_config or {}))
    clip_config = CLIPConfig(
        text_config=flair_config.text_config.to_dict(),
        vision_config=flair_config.vision_config.to_dict(),
        projection_dim=flair_config.projection_dim,
    )
    models = {}
    for name, cls, config in (("flair", FlairModel, flair_config), ("clip", CLIPModel, clip_config)):
        config._attn_implementation = implementation
        models[name] = cls(config).to(device=device, dtype=dtype).eval()
    return models


def tower_calls(models: dict, tower: str, pixels: torch.Tensor, ids: torch.Tensor) -> dict:
    """One tower's global embedding per model, as each is used: FLAIR's tensor methods (the text cut at each
    end-of-text), CLIPModel's `get_*_features` (over all positions)."""
    if tower == "image":
        return {"flair": lambda: models["flair"].get_image_embeds(pixels), "clip": lambda: models["clip"].get_image_features(pixel_values=pixels)}
    return {"flair": lambda: models["flair"].get_text_embeds(ids), "clip": lambda: models["clip"].get_text_features(input_ids=ids)}


def measure_pair(calls: dict, batch: int, iterations: int, device: str) -> dict:
    """Median items/s of each call over `iterations` interleaved rounds (after a warm-up), and its peak memory (on
    CUDA net of the weights and inputs already resident, so each model's figure is its own working memory)."""
    peaks = {}
    with torch.inference_mode():
        for name, call in calls.items():
            baseline = reset_peak(device)
            timed(call, device)
            peaks[name] = peak_memory_mib(device, baseline)
        times, _ = interleaved_times(calls, iterations, device)
    return {name: {"items_per_s": batch / statistics.median(times[name]), "peak_memory_mib": peaks[name]} for name in calls}


def run(args) -> dict:
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.image_batch, 3, 224, 224, generator=generator).to(args.device, dtype)
    ids = ids_ending_at([40] * args.text_batch, generator).to(args.device)
    results = []
    for implementation in ("eager", "sdpa"):
        models = build_models(implementation, args.device, dtype)
        for tower, batch in (("image", args.image_batch), ("text", args.text_batch)):
            calls = tower_calls(models, tower, pixels, ids)
            row = {"attn_implementation": implementation, "tower": tower, "batch": batch}
            row.update(measure_pair(calls, batch, args.iterations, args.device))
            row["flair_over_clip"] = row["flair"]["items_per_s"] / row["clip"]["items_per_s"]
            results.append(row)
            print(
                f"{implementation:6s} {tower:5s} batch {batch:4d}: FLAIR {row['flair']['items_per_s']:9.1f}/s "
                f"CLIP {row['clip']['items_per_s']:9.1f}/s ratio {row['flair_over_clip']:.3f} "
                f"peak MiB FLAIR {row['flair']['peak_memory_mib']:.0f} CLIP {row['clip']['peak_memory_mib']:.0f}"
            )
        del models
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    return {
        "device": args.device,
        "device_name": device_name,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "iterations": args.iterations,
        "timing": "median of interleaved FLAIR/CLIP rounds after one warm-up call each",
        "torch": torch.__version__,
        "peak_memory_note": "CUDA: max allocated per measurement; CPU: process RSS high-water mark",
        "results": results,
        "min_ratio": min(r["flair_over_clip"] for r in results),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--image-batch", type=int, default=16)
    parser.add_argument("--text-batch", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--output", default="benchmarks/results/towers.json")
    args = parser.parse_args(argv)
    report = run(args)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(f"min FLAIR/CLIP throughput ratio {report['min_ratio']:.3f}; wrote {args.output}")


if __name__ == "__main__":
    main()
