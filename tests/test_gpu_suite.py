"""`benchmarks/gpu_suite.py` end to end as a CPU dry run at tiny sizes (the GPU figures need a lent device)."""

import json
import sys

from conftest import ROOT

from flair_hf_benchmarks import gpu_suite


def test_gpu_suite_dry_run_on_cpu(tmp_path, capsys):
    output = tmp_path / "gpu-cpu.json"
    returned = gpu_suite.main(["--device", "cpu", "--scale", "tiny", "--skip-pytest", "--output", str(output)])
    report = json.loads(output.read_text())
    assert report["scale"] == "tiny" and report["setup"]["measured_matmul_peak"]["tflops"] > 0
    assert all(status["ok"] for status in report["sections"].values()), report["sections"]
    assert list(report["sections"]) == ["setup", *gpu_suite.SECTIONS]
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
        assert training[name]["resume_relative_differences"] == [0.0] * 2  # deterministic on the CPU
    assert [(r["mode"], r["num_images"], r["num_texts"], r["cached_features"]) for r in report["evaluation"]] == [
        ("flair", 12, 60, False), ("topk", 12, 60, True), ("global", 12, 60, True)
    ]
    assert report["segmentation"]["images"] == 2 and report["segmentation"]["images_per_second"] > 0
    summary = capsys.readouterr().out
    assert "fp32 vs CPU reference" in summary and "| images x texts |" in summary and "retrieval CLI, topk" in summary
    assert json.loads(json.dumps(returned)) == report  # the file holds what the run returned


def test_a_failing_section_keeps_the_others_and_records_its_traceback(tmp_path, monkeypatch, capsys):
    def broken(*args):
        raise RuntimeError("scorer exploded")

    monkeypatch.setattr(gpu_suite, "scoring", broken)
    output = tmp_path / "suite.json"
    gpu_suite.main(["--device", "cpu", "--scale", "tiny", "--sections", "scoring,segmentation", "--output", str(output)])
    report = json.loads(output.read_text())
    assert report["sections"]["scoring"]["ok"] is False and "RuntimeError: scorer exploded" in report["sections"]["scoring"]["traceback"]
    assert report["sections"]["segmentation"]["ok"] is True and report["segmentation"]["images"] == 2
    assert "- scoring: FAILED after" in capsys.readouterr().out


def test_a_section_over_its_time_limit_is_recorded_and_the_suite_goes_on(tmp_path, monkeypatch):
    import time

    monkeypatch.setattr(gpu_suite, "scoring", lambda *args: time.sleep(30))
    output = tmp_path / "suite.json"
    gpu_suite.main(["--device", "cpu", "--scale", "tiny", "--sections", "scoring,segmentation", "--section-timeout", "2", "--output", str(output)])
    report = json.loads(output.read_text())
    assert "section exceeded its 2 s limit" in report["sections"]["scoring"]["traceback"] and report["sections"]["scoring"]["seconds"] < 10
    assert report["sections"]["segmentation"]["ok"] is True


def test_a_run_killed_midway_leaves_the_finished_sections(tmp_path):
    """SIGKILL while the second section runs: the JSON holds the first section, written when it finished; and
    `--output` defaults to $OUT/gpu-suite.json."""
    import os
    import signal
    import subprocess
    import time

    env = {**os.environ, "OUT": str(tmp_path), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-u", str(ROOT / "benchmarks" / "gpu_suite.py"), "--device", "cpu", "--scale", "tiny",
               "--sections", "segmentation,training"]  # fmt: skip
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    lines = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        lines.append(child.stdout.readline())
        if lines[-1].startswith("- segmentation CLI"):
            break
    time.sleep(1)  # inside the training section now
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    report = json.loads((tmp_path / "gpu-suite.json").read_text())
    assert report["sections"]["segmentation"]["ok"] is True and report["segmentation"]["images"] == 2
    assert "training" not in report["sections"]
