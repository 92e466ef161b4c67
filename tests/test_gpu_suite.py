"""`benchmarks/gpu_suite.py` end to end as a CPU dry run at tiny sizes (the GPU figures need a lent device)."""

import json
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_suite  # noqa: E402


def test_gpu_suite_dry_run_on_cpu(tmp_path, capsys):
    output = tmp_path / "gpu-cpu.json"
    gpu_suite.main(["--device", "cpu", "--scale", "tiny", "--skip-pytest", "--output", str(output)])
    report = json.loads(output.read_text())
    assert report["scale"] == "tiny" and report["measured_matmul_peak_tflops"]["tflops"] > 0
    correctness = report["correctness"]
    assert set(correctness["fp32_vs_cpu_reference"]) == {
        "text_embeds", "image_embeds", "text_conditioned_image_embeds", "logits_per_image", "logits_as_clip_per_image"
    }
    assert all(v["max_abs"] <= 1e-4 and v["pass"] for v in correctness["fp32_vs_cpu_reference"].values())
    assert set(correctness["half_precision"]) == {f"{d}/{v}" for d in ("bfloat16", "float16") for v in ("autocast", "dtype_loading")}
    assert all(v["pass"] for v in correctness["half_precision"].values())
    assert all(v["pass"] and "needs CUDA" in v["flash_attention_2"] for v in correctness["attention_implementations"].values())
    assert {(r["attn_implementation"], r["tower"]) for r in report["towers"]} == {
        (a, t) for a in ("eager", "sdpa") for t in ("image", "text")
    }
    assert all(r["flair"]["items_per_s"] > 0 and r["flair_tflops_per_second"] > 0 for r in report["towers"])
    assert [(r["images"], r["texts"]) for r in report["scoring"]] == [(12, 60), (10, 10)]
    assert all(r["max_abs_score_difference_on_subset"] < 1e-5 for r in report["scoring"])  # fp32 on CPU
    training = report["training"]
    assert [r["gradient_checkpointing"] for r in training["single_process"]] == [False, True]
    assert all(r["flops_per_step"] > 0 for r in training["single_process"])
    for name in ("ddp.yaml", "fsdp2.yaml"):
        assert training[name]["returncode"] == 0 and training[name]["resume_equal_losses"] is True, training[name]
    assert [(r["mode"], r["num_images"], r["num_texts"]) for r in report["evaluation"]] == [
        ("flair", 12, 60), ("topk", 12, 60), ("global", 12, 60)
    ]
    assert report["segmentation"]["images"] == 2 and report["segmentation"]["images_per_second"] > 0
    summary = capsys.readouterr().out
    assert "fp32 vs CPU reference" in summary and "| images x texts |" in summary and "retrieval CLI, topk" in summary
