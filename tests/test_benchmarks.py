"""The speed benchmarks of the manual run as written, at small scale, and write what the manual quotes."""

import json
import os
import subprocess
import sys

from conftest import ROOT


def run_benchmark(script: str, *args: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_training_benchmark_compares_with_the_original_formulation(tmp_path):
    output = tmp_path / "training.json"
    run_benchmark("benchmark_training.py", "--model-size", "tiny", "--rounds", "1", "--output", str(output))
    report = json.loads(output.read_text())
    for lengths, mean_tokens in (("flair", (15, 77)), ("full", (77, 77))):
        row = report["training_step"][lengths]
        assert mean_tokens[0] <= row["mean_caption_tokens"] <= mean_tokens[1]
        assert row["loss_abs_difference"] <= 1e-4 * max(1.0, abs(row["loss"]))
        assert row["speed_ours_over_original"] == row["original"]["step"] / row["ours"]["step"]
        assert len(row["speed_per_round"]) == 1 == row["rounds"]  # one timed round: its ratio is the medians'
        assert abs(row["speed_per_round"][0] - row["speed_ours_over_original"]) < 1e-12
        parts = report["breakdown_forward_backward_seconds"][lengths]
        assert set(parts["original"]) == set(parts["ours"]) == {"text_tower", "vision_tower", "loss_head"}
    assert report["data_pipeline"]["samples"] > 0


def test_scoring_benchmark_reports_both_rates_and_equal_scores(tmp_path):
    output = tmp_path / "scoring.json"
    run_benchmark("benchmark_scoring.py", "--images", "3", "--texts", "40", "--output", str(output))
    report = json.loads(output.read_text())
    assert report["max_abs_difference"] < 1e-5
    assert report["flops_per_pair_executed"] < report["flops_per_pair_original"] == 2 * 197 * 512 * 2 + 2 * 512 * 512
    assert report["matmul_peak_gflops"] == max(report["matmul_peak_gflops_measured"])
    assert abs(report["fraction_of_matmul_peak"] - report["fast_gflops"] / report["matmul_peak_gflops"]) < 1e-12


def test_inference_benchmark_compares_model_call_with_the_original_get_logits(tmp_path):
    output = tmp_path / "inference.json"
    run_benchmark("benchmark_inference.py", "--model-size", "tiny", "--rounds", "1", "--images", "2", "--texts", "6", "--output", str(output))
    report = json.loads(output.read_text())
    for lengths, (low, high) in (("flair", (15, 77)), ("full", (77, 77))):
        row = report["inference"][lengths]
        assert low <= row["mean_caption_tokens"] <= high
        assert row["max_logit_difference"] <= 1e-5
        assert row["speed_ours_over_original"] == row["seconds"]["original"] / row["seconds"]["ours"]
    # the last text layer at the end-of-text token only; FLAIR's shorter captions also drop the positions after it
    assert 1.0 < report["inference"]["full"]["flop_bound"] < report["inference"]["flair"]["flop_bound"]


def test_the_flop_model_of_the_inference_bound_counts_what_the_towers_compute():
    """`transformer_flops` against torch's FlopCounterMode on eager towers, the text tower in full and as it runs for
    its pooled output (matmuls only: the eager path runs the attention as two matmuls, which the counter sees; the
    patch embedding is counted apart)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from flair_hf import FlairConfig, FlairModel
    from flair_hf_benchmarks.benchmark_inference import transformer_flops

    small = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = FlairConfig(projection_dim=16, text_config=small, vision_config={**small, "image_size": 32, "patch_size": 8})
    config._attn_implementation = "eager"
    model = FlairModel(config).eval()
    ids = torch.randint(1, 49406, (3, 77))
    with torch.no_grad(), FlopCounterMode(display=False) as text:
        model.text_model(input_ids=ids, output_hidden_states=True)
    with torch.no_grad(), FlopCounterMode(display=False) as vision:
        model.vision_model(pixel_values=torch.randn(2, 3, 32, 32))
    patch_embedding = 2 * 2 * 16 * 32 * 3 * 8 * 8  # images x patches x width x (channels x patch area), x 2
    assert text.get_total_flops() == 3 * transformer_flops(config.text_config, 77)
    ids[:, -1] = 49407  # end-of-text (the largest id) last: every caption 77 tokens, nothing to pack
    with torch.no_grad(), FlopCounterMode(display=False) as pooled:
        model.text_model.pooled_output(ids)
    assert pooled.get_total_flops() == 3 * transformer_flops(config.text_config, 77, pooled=True)
    assert vision.get_total_flops() - patch_embedding == 2 * transformer_flops(config.vision_config, 17)
