"""FLAIR on a GPU in one command: correctness, towers, all-pairs scoring, training step, end-to-end evaluation.

    python -u benchmarks/gpu_suite.py --sections correctness,towers,scoring,training --output gpu-suite-1.json
    python -u benchmarks/gpu_suite.py --sections evaluation,segmentation --output gpu-suite-2.json
    python benchmarks/gpu_suite.py --device cpu --scale tiny --output /tmp/gpu-suite-dry-run.json   # dry run

On a GPU machine without network access, `benchmarks/device_run.sh 1` and `2` run the two halves (docs/benchmarks.md, "GPU suite").
Each section runs on its own (an exception or its time limit is recorded with its traceback and the next section
runs); the JSON is rewritten and the section's markdown printed after every section, so a run killed midway keeps
what finished. `--output` defaults to `$OUT/gpu-suite.json` when `OUT` is set.

1. Correctness: the full-size ViT-B/16 FLAIR (weights by the manifest recipe, written as an original `.pt` and
   converted) in fp32 on the device against the CPU reference of the original code (1e-4, TF32 off); bf16 and fp16,
   by autocast and by `dtype=` loading, against fp32 on the device (relative error of embeddings, FLAIR logits, CLIP
   logits, within stated tolerances); eager, sdpa and flash_attention_2 (when installed) agreeing; `pytest
   tests/test_gpu.py`.
2. Towers: FlairModel vs transformers' CLIPModel of the same size, bf16, image / text items/s, peak memory, ratio, and
   achieved TFLOP/s against the measured bf16 matmul peak (and the datasheet dense peak where known).
3. All-pairs FLAIR scoring (synthetic features, bf16 autocast): the fast scorer vs the original-style loop (run on a
   subset of images and scaled), seconds, peak memory, score difference; two sizes (COCO, ShareGPT4V-10k).
4. Training step (batch x K captions, bf16 autocast) with and without gradient checkpointing; then `train.py` under the
   `ddp.yaml` and `fsdp2.yaml` launch configs with one process, and a checkpoint save -> resume giving equal losses.
5. End-to-end: the retrieval CLI on a synthetic COCO-sized layout in the flair, topk and global modes.
6. Segmentation: `evaluate_segmentation.py` on a synthetic VOC-sized layout (500 images of 500x375).

`--scale tiny` runs every section at toy sizes (tiny model) so the whole suite can be checked on a CPU.
Prints a markdown summary and writes JSON.
"""

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flair_hf import FlairConfig, FlairModel
from flair_hf.scoring import PAIR_IMAGE_CHUNK_SIZE
from flair_hf.retrieval import autocast_context, flair_scores
from flair_hf_benchmarks import benchmark_scoring, benchmark_towers, benchmark_training, evaluate_retrieval, evaluate_segmentation
from flair_hf_benchmarks.measurement import matmul_peak_flops, peak_memory_mib, reset_peak, timed
from flair_hf_benchmarks.reporting import write_json
from flair_hf_benchmarks.synthetic import ids_ending_at, synthetic_shards
from flair_hf_conversion import convert_flair_to_hf
from flair_hf_conversion.manifest_weights import manifest_state_dict
from flair_hf_conversion.original_forward import attention_pooling_of, original_pair_scores

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"

SCALES = {
    "full": {
        "model": "vit-b-16", "image_batch": 256, "text_batch": 1024, "iterations": 10, "matmul": 8192,
        "score_sizes": [(5000, 25000), (10000, 10000)], "loop_images": 50,
        "train_batch": 128, "captions_per_image": 8, "train_steps": 5, "launch_steps": 6,
        "eval_images": 5000, "eval_image_size": 256, "segmentation_images": 500, "segmentation_size": (500, 375),
    },
    "tiny": {
        "model": "tiny", "image_batch": 4, "text_batch": 8, "iterations": 2, "matmul": 256,
        "score_sizes": [(12, 60), (10, 10)], "loop_images": 4,
        "train_batch": 4, "captions_per_image": 3, "train_steps": 2, "launch_steps": 4,
        "eval_images": 12, "eval_image_size": 40, "segmentation_images": 2, "segmentation_size": (64, 48),
    },
}  # fmt: skip
SECTIONS = ("correctness", "towers", "scoring", "training", "evaluation", "segmentation")
# bf16 / fp16 vs fp32: relative error ||x - ref|| / ||ref|| allowed for embeddings and logits
HALF_TOLERANCE = {"bfloat16": 3e-2, "float16": 5e-3}
FP32_TOLERANCE = 1e-4
# dense bf16 datasheet peaks (TFLOP/s, SXM parts), for the fraction beside the measured matmul peak
DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
CHILD_TIMEOUT = 240  # seconds for each child process (pytest, accelerate launch)
# resumed vs uninterrupted losses: the first resumed step recomputes a saved state (forward only); later steps may
# differ by non-deterministic GPU backward kernels (atomics), hence a looser bound for them
RESUME_FIRST_STEP_RTOL, RESUME_RTOL = 1e-5, 2e-2


def run_child(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    """A child process with a time limit; a timeout comes back as return code 124 with what it printed."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT, **kwargs)
    except subprocess.TimeoutExpired as error:
        output = [text.decode(errors="replace") if isinstance(text, bytes) else text or "" for text in (error.stdout, error.stderr)]
        return subprocess.CompletedProcess(command, 124, output[0], output[1] + f"\ntimed out after {CHILD_TIMEOUT} s")


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.double().cpu(), reference.double().cpu()
    return float(torch.linalg.vector_norm(value - reference) / torch.linalg.vector_norm(reference).clamp_min(1e-30))


# 1. correctness ---------------------------------------------------------------------------------------------------


def converted_model(scale: str, directory: Path) -> tuple[Path, dict]:
    """The model converted from an original `.pt` (as the tests do) and the original code's CPU reference outputs."""
    from safetensors.torch import load_file

    output = directory / "model"
    if scale == "full":
        checkpoint = directory / "vit-b-16-flair-seed1000.pt"
        torch.save(manifest_state_dict(FIXTURES / "vit-b-16-flair-state-dict-manifest.json", seed=1000), checkpoint)
        convert_flair_to_hf.convert(str(checkpoint), output)
        return output, load_file(FIXTURES / "vit-b-16-flair-seed1000-reference.safetensors")
    config = json.loads((FIXTURES / "tiny" / "open_clip_config.json").read_text())["model_cfg"]
    convert_flair_to_hf.convert(str(FIXTURES / "tiny" / "flair-tiny-state-dict.pt"), output, config)
    return output, load_file(FIXTURES / "tiny" / "reference_outputs.safetensors")


@torch.no_grad()
def model_outputs(model, ids, pixels, autocast_dtype=None) -> dict:
    """The tensors the reference holds: global embeddings, pooled embeddings, FLAIR and CLIP logits (float32)."""
    device_type = pixels.device.type
    with autocast_context(device_type, autocast_dtype):
        text = model.get_text_embeds(ids)
        image, tokens = model.get_image_and_token_features(pixels)
        output = model(input_ids=ids, pixel_values=pixels)
        pooled = model.get_text_conditioned_image_features(text, tokens)
    return {
        "text_embeds": text.float(), "image_embeds": image.float(), "text_conditioned_image_embeds": pooled.float(),
        "logits_per_image": output.logits_per_image.float(), "logits_as_clip_per_image": output.logits_per_image_as_clip.float(),
    }  # fmt: skip


@contextlib.contextmanager
def tf32_disabled():
    """fp32 parity: no TF32 in matmuls or convolutions (cuDNN allows it for convolutions by default)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def flash_attention_status(device: str) -> str | None:
    """None when flash_attention_2 can run here, else why not."""
    from transformers.utils import is_flash_attn_2_available

    if not device.startswith("cuda"):
        return "flash_attention_2 needs CUDA"
    if not is_flash_attn_2_available():
        return "the flash-attn package is not installed (no wheel for this torch/CUDA in the image; pip cannot reach it)"
    return None


def correctness(args, scale: dict, model_dir: Path, reference: dict) -> dict:
    device = args.device
    ids, pixels = reference["input_ids"].long().to(device), reference["pixel_values"].to(device)
    result = {"fp32_vs_cpu_reference": {}, "half_precision": {}, "attention_implementations": {}}
    with tf32_disabled():
        fp32_model = FlairModel.from_pretrained(model_dir).to(device).eval()
        fp32 = model_outputs(fp32_model, ids, pixels)
    for name, value in fp32.items():
        if name in reference:
            difference = (value.cpu() - reference[name]).abs().max().item()
            result["fp32_vs_cpu_reference"][name] = {"max_abs": difference, "pass": difference <= FP32_TOLERANCE}
    for dtype_name, tolerance in HALF_TOLERANCE.items():
        dtype = getattr(torch, dtype_name)
        loaded = FlairModel.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        variants = {
            "autocast": model_outputs(fp32_model, ids, pixels, autocast_dtype=dtype),
            "dtype_loading": model_outputs(loaded, ids, pixels.to(dtype)),
        }
        for variant, outputs in variants.items():
            errors = {name: relative_error(value, fp32[name]) for name, value in outputs.items()}
            result["half_precision"][f"{dtype_name}/{variant}"] = {
                "relative_error": errors, "tolerance": tolerance, "pass": all(e <= tolerance for e in errors.values())
            }
        implementations = ["eager", "sdpa"]
        flash_reason = flash_attention_status(device)
        implementations += [] if flash_reason else ["flash_attention_2"]
        logits = {}
        for implementation in implementations:
            model = FlairModel.from_pretrained(model_dir, dtype=dtype, attn_implementation=implementation).to(device).eval()
            logits[implementation] = model_outputs(model, ids, pixels.to(dtype))["logits_per_image"]
        errors = {impl: relative_error(logits[impl], logits["eager"]) for impl in implementations[1:]}
        result["attention_implementations"][dtype_name] = {
            "relative_error_vs_eager": errors, "tolerance": tolerance, "pass": all(e <= tolerance for e in errors.values()),
            "flash_attention_2": "ran" if not flash_reason else f"not run: {flash_reason}",
        }  # fmt: skip
    if not args.skip_pytest:
        run = run_child([sys.executable, "-m", "pytest", "-q", str(ROOT / "tests" / "test_gpu.py")], cwd=ROOT)
        result["pytest_test_gpu"] = {"returncode": run.returncode, "summary": run.stdout.strip().splitlines()[-1:]}
    return result


# 2. towers --------------------------------------------------------------------------------------------------------


def count_flops(call) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


def towers(args, scale: dict, dtype: torch.dtype, peak: float) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    size = FlairConfig(**benchmark_training.SIZES[scale["model"]]).vision_config.image_size
    pixels = torch.randn(scale["image_batch"], 3, size, size, generator=generator).to(args.device, dtype)
    ids = ids_ending_at([40] * scale["text_batch"], generator).to(args.device)
    rows = []
    for implementation in ("eager", "sdpa"):
        models = benchmark_towers.build_models(implementation, args.device, dtype, benchmark_training.SIZES[scale["model"]])
        for tower, batch in (("image", scale["image_batch"]), ("text", scale["text_batch"])):
            calls = benchmark_towers.tower_calls(models, tower, pixels, ids)
            measured = benchmark_towers.measure_pair(calls, batch, scale["iterations"], args.device)
            flops = count_flops(calls["flair"])
            tflops = flops * measured["flair"]["items_per_s"] / batch / 1e12
            rows.append({
                "attn_implementation": implementation, "tower": tower, "batch": batch, **measured,
                "flair_over_clip": measured["flair"]["items_per_s"] / measured["clip"]["items_per_s"],
                "flair_tflops_per_second": tflops, "fraction_of_measured_peak": tflops / peak,
            })  # fmt: skip
        del models
    return rows


# 3. all-pairs scoring ---------------------------------------------------------------------------------------------


def timed_with_memory(device: str, call):
    """`call()`'s value, seconds and peak CUDA memory above what was resident before it (inputs, weights), MiB."""
    baseline = reset_peak(device)
    value, seconds = timed(call, device)
    memory = peak_memory_mib(device, baseline) if device.startswith("cuda") else None
    return value, seconds, memory


def scoring(args, scale: dict, dtype: torch.dtype) -> list[dict]:
    rows = []
    for images, texts in scale["score_sizes"]:
        pooling, text, tokens = benchmark_scoring.make_inputs(images, texts)
        pooling, text, tokens = pooling.to(args.device), text.to(args.device), tokens.to(args.device)
        row = {"images": images, "texts": texts, "autocast": str(dtype).removeprefix("torch.")}
        for name, chunk in (("fast", PAIR_IMAGE_CHUNK_SIZE), ("fast_chunk64", 64)):
            scores, seconds, memory = timed_with_memory(args.device, lambda c=chunk: flair_scores(pooling, text, tokens, image_chunk_size=c, autocast_dtype=dtype))
            row[name] = {"seconds": seconds, "peak_memory_mib": memory, "image_chunk_size": chunk}
        subset = min(scale["loop_images"], images)
        with autocast_context(args.device, dtype):
            block = attention_pooling_of(pooling)
            loop, seconds, memory = timed_with_memory(args.device, lambda: original_pair_scores(block, text, tokens[:subset]))
        row["original_loop"] = {
            "subset_images": subset, "subset_seconds": seconds, "seconds_scaled": seconds * images / subset,
            "peak_memory_mib": memory,
        }  # fmt: skip
        row["max_abs_score_difference_on_subset"] = (scores[:subset] - loop.float().cpu()).abs().max().item()
        row["speedup_vs_loop"] = row["original_loop"]["seconds_scaled"] / min(row["fast"]["seconds"], row["fast_chunk64"]["seconds"])
        rows.append(row)
    return rows


# 4. training ------------------------------------------------------------------------------------------------------


def training(args, scale: dict, peak: float, directory: Path) -> dict:
    autocast_dtype = torch.bfloat16 if args.device.startswith("cuda") else None
    result = {"single_process": []}
    for checkpointing in (False, True):
        step = benchmark_training.training_steps(
            args.device, scale["model"], scale["train_batch"], scale["captions_per_image"], scale["train_steps"],
            gradient_checkpointing=checkpointing, autocast_dtype=autocast_dtype,
        )  # fmt: skip
        step.update(gradient_checkpointing=checkpointing, fraction_of_measured_peak=step["tflops_per_second"] / peak)
        result["single_process"].append(step)
    shards = synthetic_shards(directory, shards=4, per_shard=scale["train_batch"] * scale["launch_steps"] // 4 + 1)
    config = directory / "suite_train.yaml"
    config.write_text(json.dumps({
        "model_config": benchmark_training.SIZES[scale["model"]], "captions_per_image": scale["captions_per_image"],
        "batch_size": scale["train_batch"], "workers": 4 if scale["model"] == "vit-b-16" else 0, "shuffle_buffer": 16,
        "train_data": shards, "train_num_samples": scale["train_batch"] * scale["launch_steps"], "report_to": "none",
        "warmup_steps": 1, "log_every": 1, "checkpoint_every": scale["launch_steps"] // 2,
        "max_steps": scale["launch_steps"],
    }))  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if not args.device.startswith("cuda"):
        env["ACCELERATE_USE_CPU"] = "true"
    for launch_config in ("ddp.yaml", "fsdp2.yaml"):
        output = directory / launch_config.removesuffix(".yaml")
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "training" / "accelerate" / launch_config),
                   "--num_processes", "1", "--main_process_port", str(29700 + len(result)), str(ROOT / "training" / "train.py"),
                   "--config", str(config), "--output-dir", str(output)]  # fmt: skip
        started = time.perf_counter()
        first = run_child(command, env=env)
        entry = {"returncode": first.returncode, "wall_seconds": time.perf_counter() - started}
        if first.returncode != 0:
            entry["stderr_tail"] = first.stderr[-3000:]
            result[launch_config] = entry
            continue
        losses = [json.loads(line) for line in (output / "losses.jsonl").read_text().splitlines()]
        entry["samples_per_second_per_device"] = statistics.median(r["samples_per_second_per_device"] for r in losses[1:])
        entry["distributed_type"] = json.loads((output / "summary.json").read_text())["distributed_type"]
        resumed = directory / (output.name + "-resumed")
        (resumed / "checkpoints").mkdir(parents=True)
        middle = f"step_{scale['launch_steps'] // 2}"
        os.symlink(output / "checkpoints" / middle, resumed / "checkpoints" / middle)
        command[command.index(str(output))] = str(resumed)
        second = run_child(command + ["--resume", "latest"], env=env)
        entry["resume_returncode"] = second.returncode
        if second.returncode == 0:
            again = [json.loads(line)["loss"] for line in (resumed / "losses.jsonl").read_text().splitlines()]
            entry.update(resume_comparison(again, [r["loss"] for r in losses][scale["launch_steps"] // 2 :]))
        else:
            entry["stderr_tail"] = second.stderr[-3000:]
        result[launch_config] = entry
    return result


def resume_comparison(resumed: list[float], uninterrupted: list[float]) -> dict:
    """Resumed vs uninterrupted losses of the same steps: relative differences and the stated tolerances."""
    differences = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(resumed, uninterrupted)]
    ok = len(resumed) == len(uninterrupted) > 0 and differences[0] <= RESUME_FIRST_STEP_RTOL and max(differences) <= RESUME_RTOL
    return {"resume_relative_differences": differences, "resume_tolerances": [RESUME_FIRST_STEP_RTOL, RESUME_RTOL], "resume_equal_losses": ok}


# 5. end-to-end evaluation -----------------------------------------------------------------------------------------


def synthetic_coco(root: Path, images: int, size: int) -> Path:
    """A COCO val2017 layout with `images` random JPEGs and 5 captions each."""
    folder = root / "coco" / "images" / "val2017"
    folder.mkdir(parents=True)
    words = ["a", "red", "dog", "on", "grass", "small", "blue", "car", "street", "two", "people", "near", "water"]
    rng = np.random.default_rng(0)
    annotations, entries = [], []
    for index in range(images):
        name = f"{index:012d}.jpg"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / name, quality=85)
        entries.append({"id": index, "file_name": name})
        for k in range(5):
            caption = " ".join(rng.choice(words, size=int(rng.integers(6, 14))))
            annotations.append({"id": index * 5 + k, "image_id": index, "caption": caption})
    (root / "coco" / "annotations").mkdir(parents=True)
    (root / "coco" / "annotations" / "captions_val2017.json").write_text(json.dumps({"images": entries, "annotations": annotations}))
    return root


def evaluation(args, scale: dict, model_dir: Path, directory: Path) -> list[dict]:
    started = time.perf_counter()
    root = synthetic_coco(directory / "eval-data", scale["eval_images"], scale["eval_image_size"])
    generated = time.perf_counter() - started
    rows = []
    for mode in ("flair", "topk", "global"):
        cli = ["--model", str(model_dir), "--benchmark", "coco", "--data-root", str(root), "--mode", mode,
               "--device", args.device, "--output", str(directory / f"eval-{mode}.json"), "--batch-size", "256",
               "--cache-dir", str(directory / "eval-cache")]  # fmt: skip  (modes after the first reuse the features)
        cli += ["--autocast", "bf16"] if args.device.startswith("cuda") else []
        started = time.perf_counter()
        result = evaluate_retrieval.main(cli)[0]
        rows.append({
            "mode": mode, "wall_seconds": time.perf_counter() - started, **result["timings"],
            "num_images": result["num_images"], "num_texts": result["num_texts"], "cached_features": result["timings"]["cached_features"],
            "text_to_image_R@1": result["metrics"]["text_to_image_R@1"],
        })  # fmt: skip
    rows[0]["layout_generation_seconds"] = generated
    return rows


# 6. segmentation ---------------------------------------------------------------------------------------------------


def synthetic_voc(root: Path, images: int, size: tuple[int, int]) -> Path:
    """A VOC2012 layout with `images` random JPEGs and random 21-class label maps."""
    base = root / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"synthetic_{i:06d}" for i in range(images)]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(base / "JPEGImages" / f"{name}.jpg")
        blocks = rng.integers(0, 21, (size[1] // 25 + 1, size[0] // 25 + 1), dtype=np.uint8)
        Image.fromarray(blocks.repeat(25, 0).repeat(25, 1)[: size[1], : size[0]]).save(base / "SegmentationClass" / f"{name}.png")
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(names) + "\n")
    return root


def segmentation(args, scale: dict, model_dir: Path, directory: Path) -> dict:
    root = synthetic_voc(directory / "segmentation-data", scale["segmentation_images"], scale["segmentation_size"])
    started = time.perf_counter()
    cli = ["--model", str(model_dir), "--benchmark", "voc20", "--data-root", str(root), "--device", args.device,
           "--output", str(directory / "segmentation.json")]  # fmt: skip
    cli += ["--dtype", "bfloat16"] if args.device.startswith("cuda") else []
    result = evaluate_segmentation.main(cli)[0]
    seconds = time.perf_counter() - started
    return {"images": result["num_images"], "image_size": list(scale["segmentation_size"]), "wall_seconds": seconds,
            "evaluate_seconds": result["seconds"], "images_per_second": result["num_images"] / result["seconds"]}  # fmt: skip


# report -----------------------------------------------------------------------------------------------------------


def markdown(name: str, report: dict) -> list[str]:
    """The markdown lines of one section of `report`."""
    lines = []
    if name == "setup":
        peak = report["setup"]["measured_matmul_peak"]
        lines.append(f"- measured {peak['dtype']} matmul peak: {peak['tflops']:.1f} TFLOP/s")
    elif name == "correctness":
        c = report["correctness"]
        worst = max(v["max_abs"] for v in c["fp32_vs_cpu_reference"].values())
        lines.append(f"- fp32 vs CPU reference: max abs {worst:.2e} (tolerance {FP32_TOLERANCE:g})")
        for key, v in c["half_precision"].items():
            lines.append(f"- {key}: max relative error {max(v['relative_error'].values()):.2e} (tolerance {v['tolerance']:g}) "
                         f"{'pass' if v['pass'] else 'FAIL'}")  # fmt: skip
        for key, v in c["attention_implementations"].items():
            errors = ", ".join(f"{k} {e:.1e}" for k, e in v["relative_error_vs_eager"].items())
            lines.append(f"- {key} attention vs eager: {errors}; flash_attention_2 {v['flash_attention_2']}")
        if "pytest_test_gpu" in c:
            lines.append(f"- pytest tests/test_gpu.py: rc {c['pytest_test_gpu']['returncode']} {' '.join(c['pytest_test_gpu']['summary'])}")
    elif name == "towers":
        lines += ["| attention | tower | batch | FLAIR items/s | CLIP items/s | FLAIR/CLIP | FLAIR TFLOP/s | of peak | FLAIR MiB | CLIP MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in report["towers"]:
            lines.append(
                f"| {r['attn_implementation']} | {r['tower']} | {r['batch']} | {r['flair']['items_per_s']:.1f} | {r['clip']['items_per_s']:.1f} "
                f"| {r['flair_over_clip']:.2f} | {r['flair_tflops_per_second']:.1f} | {r['fraction_of_measured_peak']:.2f} "
                f"| {r['flair']['peak_memory_mib']:.0f} | {r['clip']['peak_memory_mib']:.0f} |"
            )
    elif name == "scoring":
        lines += ["| images x texts | fast s | fast (chunk 64) s | loop s (scaled) | speed-up | max abs diff |", "|---|---|---|---|---|---|"]
        for r in report["scoring"]:
            lines.append(f"| {r['images']} x {r['texts']} | {r['fast']['seconds']:.2f} | {r['fast_chunk64']['seconds']:.2f} "
                         f"| {r['original_loop']['seconds_scaled']:.1f} | {r['speedup_vs_loop']:.1f} | {r['max_abs_score_difference_on_subset']:.1e} |")  # fmt: skip
    elif name == "training":
        for r in report["training"]["single_process"]:
            lines.append(f"- training step, checkpointing {r['gradient_checkpointing']}: {r['samples_per_second']:.1f} samples/s, "
                         f"{r['tflops_per_second']:.1f} TFLOP/s ({r['fraction_of_measured_peak']:.2f} of peak), {r['peak_memory_mib']:.0f} MiB")  # fmt: skip
        for launch in ("ddp.yaml", "fsdp2.yaml"):
            r = report["training"][launch]
            worst = max(r.get("resume_relative_differences") or [float("nan")])
            lines.append(f"- {launch}, 1 process: rc {r['returncode']}, {r.get('samples_per_second_per_device', float('nan')):.1f} samples/s, "
                         f"resume within tolerance: {r.get('resume_equal_losses')} (largest relative difference {worst:.1e})")  # fmt: skip
    elif name == "evaluation":
        for r in report["evaluation"]:
            lines.append(f"- retrieval CLI, {r['mode']}: {r['wall_seconds']:.1f} s (encode {r['encode_seconds']:.1f} s, "
                         f"score {r['score_seconds']:.1f} s) on {r['num_images']} images / {r['num_texts']} texts")  # fmt: skip
    elif name == "segmentation":
        r = report["segmentation"]
        lines.append(f"- segmentation CLI (voc20 settings): {r['images']} images of {r['image_size'][0]}x{r['image_size'][1]} in "
                     f"{r['evaluate_seconds']:.1f} s ({r['images_per_second']:.1f} images/s)")  # fmt: skip
    return lines


class SectionTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int | None):
    """Raise `SectionTimeout` in this (main) thread after `seconds` (SIGALRM; no limit when None or 0)."""
    if not seconds:
        yield
        return

    def expire(signum, frame):
        raise SectionTimeout(f"section exceeded its {seconds} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_section(name: str, call, report: dict, output: Path, limit: int | None, suite_started: float) -> None:
    """Run one section; record its result or its traceback, rewrite the JSON, print its markdown at once."""
    started = time.perf_counter()
    try:
        with time_limit(limit):
            report[name] = call()
        status = {"ok": True}
    except Exception:  # noqa: BLE001 - one section's failure must not lose the others'
        status = {"ok": False, "traceback": traceback.format_exc()[-6000:]}
    report["sections"][name] = {**status, "seconds": round(time.perf_counter() - started, 2)}
    report["suite_seconds"] = round(time.perf_counter() - suite_started, 2)
    write_json(report, output)
    lines = markdown(name, report) if status["ok"] else [f"- {name}: FAILED after {report['sections'][name]['seconds']} s: "
                                                         f"{status['traceback'].strip().splitlines()[-1]}"]  # fmt: skip
    print(f"\n### {name} ({report['sections'][name]['seconds']:.1f} s)\n" + "\n".join(lines), flush=True)


def default_output() -> str | None:
    return str(Path(os.environ["OUT"]) / "gpu-suite.json") if os.environ.get("OUT") else None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=default_output(), help="JSON file (default: $OUT/gpu-suite.json when OUT is set)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", choices=sorted(SCALES), default="full", help="full (ViT-B/16, paper sizes) or tiny (dry run)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {', '.join(SECTIONS)}")
    parser.add_argument("--section-timeout", type=int, default=0, help="seconds per section (0: none); a late section is recorded as failed")
    parser.add_argument("--skip-pytest", action="store_true", help="do not run pytest tests/test_gpu.py")
    args = parser.parse_args(argv)
    if args.output is None:
        parser.error("--output is required when OUT is not set")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device; use --device cpu --scale tiny for a dry run")
    scale = SCALES[args.scale]
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    device_name = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    import transformers

    report = {"device_name": device_name, "device": args.device, "scale": args.scale, "torch": torch.__version__,
              "transformers": transformers.__version__, "sections": {}}  # fmt: skip
    suite_started = time.perf_counter()
    output = Path(args.output)
    print(f"## FLAIR GPU suite: {device_name} ({args.scale} scale; torch {torch.__version__}, transformers {transformers.__version__})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        setup = {}

        def prepare():
            setup["model_dir"], setup["reference"] = converted_model("full" if scale["model"] == "vit-b-16" else "tiny", directory)
            setup["peak"] = matmul_peak_flops(args.device, scale["matmul"], dtype, rounds=10) / 1e12
            datasheet = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in device_name), None)
            return {"measured_matmul_peak": {"dtype": str(dtype).removeprefix("torch."), "tflops": setup["peak"]},
                    "datasheet_bf16_dense_tflops": datasheet}  # fmt: skip

        calls = {
            "correctness": lambda: correctness(args, scale, setup["model_dir"], setup["reference"]),
            "towers": lambda: towers(args, scale, dtype, setup["peak"]),
            "scoring": lambda: scoring(args, scale, dtype if cuda else None),
            "training": lambda: training(args, scale, setup["peak"], directory),
            "evaluation": lambda: evaluation(args, scale, setup["model_dir"], directory),
            "segmentation": lambda: segmentation(args, scale, setup["model_dir"], directory),
        }
        run_section("setup", prepare, report, output, args.section_timeout, suite_started)
        for name in sections:
            if report["sections"]["setup"]["ok"]:
                run_section(name, calls[name], report, output, args.section_timeout, suite_started)
    print(f"wrote {output}", flush=True)
    return report


if __name__ == "__main__":
    main()
