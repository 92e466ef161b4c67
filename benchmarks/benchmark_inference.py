"""Inference, `model(**inputs)` of FlairModel side by side with the original's `get_logits`, same weights, one process.

    python benchmarks/benchmark_inference.py [--model-size vit-b-16|tiny] [--images 8] [--texts 32] [--rounds 5]
        [--output benchmarks/results/inference-cpu.json]

The baseline is the original's `get_logits` as its code computes it, on `OriginalFlair` from
`conversion/original_forward.py` (open_clip towers with fused `in_proj` attention over all 77 text positions, every
text broadcast to every image and pooled by `nn.MultiheadAttention(add_zero_attn=True)`). Ours is
`model(input_ids=..., pixel_values=..., attention_mask=...)` as a processor's output feeds it. Both run under
`torch.no_grad()` in interleaved rounds after a warm-up whose logits must agree within `--tolerance`. Captions are
`flair` lengths (1-3 sentences of 12-28 tokens) and `full` (77 tokens). Beside each speed-up, the most that the
end-of-text cut (every caption over its own length, the last layer at that token only) can give at equal kernel speed
(`flop_bound`, from the towers' FLOPs). Prints the numbers and writes JSON.
"""

import argparse
import platform
import statistics

import torch
import torch.nn.functional as F

from flair_hf_benchmarks.benchmark_training import SIZES, original_and_ours
from flair_hf_benchmarks.measurement import interleaved_times
from flair_hf_benchmarks.synthetic import caption_ids
from flair_hf_benchmarks.reporting import write_json


def original_get_logits(original, ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """The original's `get_logits`: `(B, T)` FLAIR logits with every text pooled against every image."""
    image_features, image_tokens = original.encode_image(pixels)
    text = original.encode_text(ids).unsqueeze(0).expand(pixels.shape[0], -1, -1)  # (B, T, D)
    pooled = original.visual_proj(text, image_tokens)
    cosines = torch.einsum("bij,bij->bi", F.normalize(pooled, dim=-1), F.normalize(text, dim=-1))
    return original.logit_scale.exp() * cosines + original.logit_bias


def transformer_flops(config, tokens: int, pooled: bool = False) -> int:
    """Multiply-adds x 2 of one tower's layers over one sequence of `tokens`: q/k/v/out projections, the MLP, the
    attention scores and the weighted sum (full attention, as the kernels compute it). `pooled`: the last layer
    queries from the final position only (keys and values still over every position), as the text tower runs for
    its pooled output."""
    width, mlp = config.hidden_size, config.intermediate_size

    def layer(queries: int) -> int:
        return 4 * tokens * width * width + 2 * queries * (2 * width * width + 2 * width * mlp) + 4 * queries * tokens * width

    return (config.num_hidden_layers - 1) * layer(tokens) + layer(1 if pooled else tokens)


def flop_bound(model, images: int, ids: torch.Tensor) -> float:
    """The most that computing each caption only as far as its pooled output needs can gain at equal kernel speed:
    the towers' FLOPs with every caption over all positions (the original) over the same with every caption over its
    own length, the last layer at its end-of-text token only. The model's packed text tower runs the projections and
    MLPs exactly so; its attention spans the longest caption. An upper bound: the parts both compute alike (patch
    embedding, projections, pooling head) are left out."""
    config = model.config
    vision = images * transformer_flops(config.vision_config, (config.vision_config.image_size // config.vision_config.patch_size) ** 2 + 1)
    original = vision + len(ids) * transformer_flops(config.text_config, ids.shape[1])
    return original / (vision + sum(transformer_flops(config.text_config, int(end) + 1, pooled=True) for end in ids.argmax(-1)))


def attention_mask_of(ids: torch.Tensor) -> torch.Tensor:
    """The processor's mask: ones up to and including each end-of-text token."""
    return (torch.arange(ids.shape[1]) <= ids.argmax(-1, keepdim=True)).long()


@torch.no_grad()
def compare(original, ours, pixels: torch.Tensor, ids: torch.Tensor, rounds: int, tolerance: float) -> dict:
    """Median seconds per call of both over interleaved rounds; the warm-up logits must agree within `tolerance`."""
    mask = attention_mask_of(ids)
    calls = {
        "original": lambda: original_get_logits(original, ids, pixels),
        "ours": lambda: ours(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits_per_image,
    }
    times, first = interleaved_times(calls, rounds)
    difference = (first["original"] - first["ours"]).abs().max().item()
    if difference > tolerance:
        raise RuntimeError(f"the two formulations disagree: max logit difference {difference:.2e} > {tolerance:.0e}")
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "seconds": medians,
        "speed_ours_over_original": medians["original"] / medians["ours"],
        "max_logit_difference": difference,
        "mean_caption_tokens": float((ids.argmax(-1) + 1).float().mean()),
        "flop_bound": flop_bound(ours, pixels.shape[0], ids),
        "rounds": rounds,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-size", choices=sorted(SIZES), default="vit-b-16", help="default: %(default)s")
    parser.add_argument("--images", type=int, default=8, help="default: %(default)s")
    parser.add_argument("--texts", type=int, default=32, help="default: %(default)s")
    parser.add_argument("--rounds", type=int, default=5, help="timed calls of each (default: %(default)s)")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="max logit difference (default: %(default)s)")
    parser.add_argument("--output", default="benchmarks/results/inference-cpu.json", help="default: %(default)s")
    args = parser.parse_args(argv)
    original, ours = original_and_ours(args.model_size)
    original.eval(), ours.eval()
    size = ours.config.vision_config.image_size
    pixels = torch.randn(args.images, 3, size, size, generator=torch.Generator().manual_seed(0))
    results = {}
    for lengths in ("flair", "full"):
        row = results[lengths] = compare(original, ours, pixels, caption_ids(args.texts, lengths), args.rounds, args.tolerance)
        print(f"{lengths} captions ({row['mean_caption_tokens']:.0f} tokens on average), {args.images} images x "
              f"{args.texts} texts: original {row['seconds']['original']:.3f} s, ours {row['seconds']['ours']:.3f} s "
              f"-> {row['speed_ours_over_original']:.2f}x (FLOP bound of the end-of-text cut {row['flop_bound']:.2f}x); "
              f"max logit difference {row['max_logit_difference']:.1e}")  # fmt: skip
    report = {
        "device": "cpu", "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "model_size": args.model_size, "images": args.images, "texts": args.texts,
        "attn_implementation": ours.config._attn_implementation, "inference": results,
    }  # fmt: skip
    write_json(report, args.output)
    print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
