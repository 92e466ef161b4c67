"""FLAIR all-pairs scoring speed and peak memory: the fast scorer vs the original evaluation's per-image loop.

    python benchmarks/benchmark_scoring.py [--images 1000] [--texts 5000] [--threads N]
        [--output benchmarks/results/scoring-cpu.json]

Uses the full-size head dimensions (D=512, 8 heads, 196 patch tokens) with random weights and features. Each method
runs in its own child process so its peak RSS is its own. The baseline is the original's own call: per image, its
pooling block (`nn.MultiheadAttention(add_zero_attn=True)`, `need_weights=False`, layer norms applied per call) with
all texts as queries (`conversion/original_forward.py`); the fast scores are checked against it (max abs difference,
fp32). The fast scorer's rate is given on the original's work per pair (0.93 MFLOP at
full size) and on what it executes (it replaces the output projection by a cheaper norm factor), each as a fraction
of this machine's fp32 matmul peak (the best 2048x2048 rate, measured before and after). Prints the numbers and
writes JSON.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from flair_hf_benchmarks.measurement import matmul_peak_flops, peak_rss_mib
from flair_hf_benchmarks.reporting import write_json

from flair_hf import FlairConfig
from flair_hf.modeling_flair import FlairTextConditionedPooling
from flair_hf.retrieval import flair_scores
from flair_hf_conversion.original_forward import attention_pooling_of, original_pair_scores


def make_inputs(images: int, texts: int):
    torch.manual_seed(0)
    config = FlairConfig()
    config._attn_implementation = "sdpa"
    pooling = FlairTextConditionedPooling(config).eval()
    for parameter in pooling.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    text = torch.randn(texts, config.projection_dim)
    tokens = torch.randn(images, 196, config.projection_dim)
    return pooling, text, tokens


def run_method(method: str, images: int, texts: int, scores_path: str) -> dict:
    pooling, text, tokens = make_inputs(images, texts)
    baseline_rss = peak_rss_mib()
    start = time.perf_counter()
    if method == "fast":
        scores = flair_scores(pooling, text, tokens)
    else:
        scores = original_pair_scores(attention_pooling_of(pooling), text, tokens)
    seconds = time.perf_counter() - start
    torch.save(scores, scores_path)
    peak = peak_rss_mib()
    return {"seconds": seconds, "peak_rss_mib": peak, "rss_before_scoring_mib": baseline_rss}


def flops_per_pair(dim: int = 512, tokens: int = 196) -> int:
    """The work of one pair as the original does it: scores against the L + 1 key slots, the weighted sum of values,
    the D x D output projection (multiply-adds x 2). The rate on this count is the work-equivalent rate."""
    return 2 * (tokens + 1) * dim * 2 + 2 * dim * dim


def executed_flops_per_pair(dim: int = 512, tokens: int = 196, blocks: int = 8) -> int:
    """What `flair_scores` executes per pair: the same attention, the block-triangular norm factor (with its extra
    column) instead of the output projection, and the numerator's dot product."""
    return 2 * (tokens + 1) * dim * 2 + 2 * dim * dim * (blocks + 1) // (2 * blocks) + 2 * dim + 2 * dim


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--texts", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", default="benchmarks/results/scoring-cpu.json")
    parser.add_argument("--child", choices=["fast", "original"], help=argparse.SUPPRESS)
    parser.add_argument("--scores", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(run_method(args.child, args.images, args.texts, args.scores)))
        return
    peaks = [matmul_peak_flops() / 1e9]  # measured before and after the scorers; the best counts
    results, scores = {}, {}
    for method in ("original", "fast"):
        scores_path = Path(args.output).with_suffix(f".{method}.pt.tmp")
        command = [sys.executable, __file__, "--child", method, "--scores", str(scores_path)]
        command += ["--images", str(args.images), "--texts", str(args.texts), "--threads", str(args.threads)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[method] = json.loads(out.strip().splitlines()[-1])
        scores[method] = torch.load(scores_path, weights_only=True)
        scores_path.unlink()
        print(f"{method:16s} {results[method]['seconds']:8.1f} s  peak RSS {results[method]['peak_rss_mib']:.0f} MiB")
    peaks.append(matmul_peak_flops() / 1e9)
    peak, pairs_per_second = max(peaks), args.images * args.texts / results["fast"]["seconds"]
    achieved, executed = pairs_per_second * flops_per_pair() / 1e9, pairs_per_second * executed_flops_per_pair() / 1e9
    report = {
        "matmul_peak_gflops": peak,
        "matmul_peak_gflops_measured": peaks,
        "flops_per_pair_original": flops_per_pair(),
        "flops_per_pair_executed": executed_flops_per_pair(),
        "fast_gflops": achieved,
        "fraction_of_matmul_peak": achieved / peak,
        "fast_executed_gflops": executed,
        "executed_fraction_of_matmul_peak": executed / peak,
        "images": args.images,
        "texts": args.texts,
        "threads": args.threads,
        "torch": torch.__version__,
        "head": {"dim": 512, "heads": 8, "tokens": 196},
        "results": results,
        "speedup": results["original"]["seconds"] / results["fast"]["seconds"],
        "max_abs_difference": (scores["fast"] - scores["original"]).abs().max().item(),
    }
    print(f"speed-up {report['speedup']:.2f}x, max abs difference {report['max_abs_difference']:.2e}; fast scorer "
          f"{achieved:.0f} GFLOP/s of the original's work = {achieved / peak:.0%} of the {peak:.0f} GFLOP/s matmul "
          f"peak ({executed:.0f} GFLOP/s = {executed / peak:.0%} executed)")  # fmt: skip
    write_json(report, args.output)


if __name__ == "__main__":
    main()
