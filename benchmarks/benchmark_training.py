"""Training-step throughput and peak memory of FlairModel, and the data pipeline's samples/s.

    python benchmarks/benchmark_training.py [--model-size vit-b-16|tiny] [--batch-size 8] [--captions-per-image 8]
        [--steps 5] [--workers 2] [--data "shards-{0000..0003}.tar"] [--output benchmarks/results/training-cpu.json]

The step is forward (FLAIR loss) + backward + AdamW on one process; the pipeline reads webdataset shards (synthetic
256x256 JPEGs with DreamLIP-style captions unless --data is given), decodes, crops and tokenises with the given
number of DataLoader workers. Prints the numbers and writes JSON.
"""

import argparse
import contextlib
import io
import json
import platform
import resource
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from data import FlairTrainingStream, make_collate, parse_sources  # noqa: E402

from flair_hf import FlairConfig, FlairModel, FlairTokenizer  # noqa: E402

SIZES = {
    "vit-b-16": {},
    "tiny": {
        "projection_dim": 32,
        "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
    },
}


def synthetic_shards(directory: Path, shards: int = 4, per_shard: int = 64) -> str:
    for shard in range(shards):
        with tarfile.open(directory / f"bench-{shard:04d}.tar", "w") as tar:
            for i in range(per_shard):
                rng = np.random.default_rng(shard * per_shard + i)
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buffer, format="JPEG")
                record = {"raw_caption": ["A photo."], "longSV_captions": ["First sentence. Second one. Third\nFourth"]}
                for name, payload in ((f"{i:06d}.jpg", buffer.getvalue()), (f"{i:06d}.json", json.dumps(record).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(directory / f"bench-{{0000..{shards - 1:04d}}}.tar")


def peak_memory_mib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def training_steps(
    device: str, model_size: str, batch_size: int, captions_per_image: int, steps: int,
    gradient_checkpointing: bool = False, autocast_dtype: torch.dtype | None = None,
) -> dict:  # fmt: skip
    """Median samples/s of forward (FLAIR loss) + backward + AdamW after one warm-up step, peak memory, FLOPs/step."""
    from torch.utils.flop_counter import FlopCounterMode

    model = FlairModel(FlairConfig(**SIZES[model_size])).to(device).train()
    if gradient_checkpointing:
        model.activation_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    size = model.config.vision_config.image_size
    batch, texts = batch_size, batch_size * captions_per_image
    pixels = torch.randn(batch, 3, size, size, device=device)
    ids = torch.randint(1, 49406, (texts, 77), device=device)
    ids[:, 0], ids[:, 30], ids[:, 31:] = 49406, 49407, 0
    autocast = torch.autocast(torch.device(device).type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times, flops = [], None
    for step in range(steps + 1):
        counter = FlopCounterMode(display=False) if step == 0 else contextlib.nullcontext()
        start = time.perf_counter()
        with counter:
            with autocast:
                loss = model(input_ids=ids, pixel_values=pixels, return_loss=True, captions_per_image=captions_per_image).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        synchronize()
        if step:  # the first step is a warm-up (and counts the FLOPs)
            times.append(time.perf_counter() - start)
        else:
            flops = counter.get_total_flops()
    median = statistics.median(times)
    return {"samples_per_second": batch / median, "median_step_seconds": median, "flops_per_step": flops,
            "tflops_per_second": flops / median / 1e12, "peak_memory_mib": peak_memory_mib(device)}  # fmt: skip


def data_pipeline(args, pattern: str) -> dict:
    stream = FlairTrainingStream(parse_sources(pattern), captions_per_image=args.captions_per_image, shuffle_buffer=64)
    loader = torch.utils.data.DataLoader(
        stream, batch_size=args.batch_size, num_workers=args.workers, collate_fn=make_collate(FlairTokenizer.from_bpe_vocab())
    )
    start, samples = time.perf_counter(), 0
    for batch in loader:
        samples += batch["pixel_values"].shape[0]
    return {"samples_per_second": samples / (time.perf_counter() - start), "samples": samples, "workers": args.workers}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-size", choices=sorted(SIZES), default="vit-b-16")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--captions-per-image", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data", help="webdataset shard pattern (default: synthetic shards)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default="benchmarks/results/training-cpu.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        pattern = args.data or synthetic_shards(Path(tmp))
        pipeline = data_pipeline(args, pattern)
    print(f"data pipeline: {pipeline['samples_per_second']:.1f} samples/s with {args.workers} workers")
    autocast_dtype = torch.bfloat16 if args.device.startswith("cuda") else None
    step = training_steps(args.device, args.model_size, args.batch_size, args.captions_per_image, args.steps, autocast_dtype=autocast_dtype)
    print(f"training step ({args.model_size}, batch {args.batch_size} x {args.captions_per_image} captions, {args.device}): "
          f"{step['samples_per_second']:.2f} samples/s, peak {step['peak_memory_mib']:.0f} MiB")  # fmt: skip
    report = {
        "device": args.device, "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "model_size": args.model_size, "batch_size": args.batch_size,
        "captions_per_image": args.captions_per_image, "training_step": step, "data_pipeline": pipeline,
        "peak_memory_note": "CUDA: max allocated; CPU: process RSS high-water mark",
    }  # fmt: skip
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
