"""Training step of FlairModel side by side with the original's formulation, and the data pipeline's samples/s.

    python benchmarks/benchmark_training.py [--model-size vit-b-16|tiny] [--batch-size 8] [--captions-per-image 8]
        [--rounds 5] [--workers 2] [--data "shards-{0000..0003}.tar"] [--output benchmarks/results/training-cpu.json]

The step is forward (FLAIR loss) + backward + AdamW on one process. The baseline is `OriginalFlair` from
`conversion/original_forward.py` (open_clip towers with fused `in_proj` attention, `nn.MultiheadAttention` pooling,
the original loss) holding the same weights; both run in this process in interleaved rounds, after a check that
their losses agree. Captions are `flair` lengths (sub-captions of 1-3 sentences of 12-28 tokens, as FLAIR samples
them, capped at 77) and `full` (every caption 77 tokens, the worst case). A breakdown times each part (text tower,
vision tower, loss head) forward + backward; AdamW's share comes from the steps (the original's call, torch's
default per-tensor loop on CPU, against the trainer's `build_optimizer`, fused). The pipeline reads webdataset shards (synthetic 256x256 JPEGs with DreamLIP-style
captions unless --data is given), decodes, crops and tokenises with the given number of DataLoader workers.
Prints the numbers and writes JSON.
"""

import argparse
import contextlib
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from flair_hf import FlairConfig, FlairModel, FlairTokenizer
from flair_hf.loss import flair_loss, sample_text_indices
from flair_hf.retrieval import autocast_context
from flair_hf_benchmarks.measurement import peak_memory_mib, reset_peak, synchronize, timed
from flair_hf_benchmarks.reporting import write_json
from flair_hf_benchmarks.synthetic import caption_ids, synthetic_shards
from flair_hf_conversion.original_forward import OriginalFlair
from flair_hf_conversion.state_dict import convert_state_dict
from flair_hf_training.config import TrainConfig
from flair_hf_training.data import FlairTrainingStream, make_collate, parse_sources
from flair_hf_training.train import build_optimizer

ROOT = Path(__file__).resolve().parents[1]

SIZES = {
    "vit-b-16": {},
    "tiny": {
        "projection_dim": 32,
        "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
    },
}


def training_steps(
    device: str, model_size: str, batch_size: int, captions_per_image: int, steps: int,
    gradient_checkpointing: bool = False, autocast_dtype: torch.dtype | None = None,
) -> dict:  # fmt: skip
    """Median samples/s of forward (FLAIR loss) + backward + AdamW after one warm-up step, peak memory, FLOPs/step."""
    from torch.utils.flop_counter import FlopCounterMode

    model = FlairModel(FlairConfig(**SIZES[model_size])).to(device).train()
    if gradient_checkpointing:
        model.activation_checkpointing_enable()
    optimizer = build_optimizer(model, TrainConfig())
    size = model.config.vision_config.image_size
    batch, texts = batch_size, batch_size * captions_per_image
    pixels = torch.randn(batch, 3, size, size, device=device)
    ids = caption_ids(texts, "flair").to(device)
    autocast = autocast_context(device, autocast_dtype)
    reset_peak(device)
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
        synchronize(device)
        if step:  # the first step is a warm-up (and counts the FLOPs)
            times.append(time.perf_counter() - start)
        else:
            flops = counter.get_total_flops()
    median = statistics.median(times)
    return {"samples_per_second": batch / median, "median_step_seconds": median, "flops_per_step": flops,
            "tflops_per_second": flops / median / 1e12, "peak_memory_mib": peak_memory_mib(device)}  # fmt: skip


def original_and_ours(model_size: str) -> tuple[OriginalFlair, FlairModel]:
    """The original formulation with random weights, and FlairModel holding the same weights (via the converter)."""
    config = FlairConfig(**SIZES[model_size])
    torch.manual_seed(0)
    original = OriginalFlair(config).train()
    ours = FlairModel(config).train()
    ours.load_state_dict(convert_state_dict(original.state_dict(), config))
    return original, ours


def compare_steps(original, ours, pixels, ids, captions_per_image: int, rounds: int) -> dict:
    """Median forward / backward / AdamW seconds of both formulations over interleaved rounds (after a warm-up), and
    each round's step-time ratio (original / ours: the two steps of a round run back to back, so a drift of the
    machine's speed between rounds cancels)."""
    K, batch = captions_per_image, pixels.shape[0]
    losses = {
        "original": lambda: original.loss(ids, pixels, K, sample_text_indices(batch, K)[1]),
        "ours": lambda: ours(input_ids=ids, pixel_values=pixels, return_loss=True, captions_per_image=K).loss,
    }
    models = {"original": original, "ours": ours}
    # the original's AdamW call (torch's default kernel choice), ours as the trainer builds it (fused)
    optimizers = {name: build_optimizer(model, TrainConfig(fused_adamw=name == "ours")) for name, model in models.items()}
    times = {name: {"forward": [], "backward": [], "optimizer": [], "step": []} for name in models}
    first_losses = {}
    for round_ in range(rounds + 1):
        for name in list(models)[:: 1 if round_ % 2 else -1]:  # alternate who goes first
            torch.manual_seed(round_)  # the same sampled negatives for both
            loss, forward = timed(losses[name])
            _, backward = timed(loss.backward)
            _, optimizer = timed(lambda o=optimizers[name]: (o.step(), o.zero_grad()))
            if round_ == 0:  # warm-up; its losses (same weights, same negatives) must agree
                first_losses[name] = loss.item()
                continue
            for key, value in (("forward", forward), ("backward", backward), ("optimizer", optimizer)):
                times[name][key].append(value)
            times[name]["step"].append(forward + backward + optimizer)
    medians = {name: {key: statistics.median(values) for key, values in parts.items()} for name, parts in times.items()}
    difference = abs(first_losses["original"] - first_losses["ours"])
    if difference > 1e-4 * max(1.0, abs(first_losses["original"])):
        raise RuntimeError(f"the two formulations disagree: losses {first_losses}")
    return {
        **medians,
        "speed_ours_over_original": medians["original"]["step"] / medians["ours"]["step"],
        "speed_per_round": [a / b for a, b in zip(times["original"]["step"], times["ours"]["step"], strict=True)],
        "loss": first_losses["ours"],
        "loss_abs_difference": difference,
        "rounds": rounds,
    }


def forward_backward_seconds(function, repeats: int = 3) -> float:
    """Median seconds of `function()` plus the backward of a weighted sum of its output."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        output = function()
        (output * torch.linspace(-1, 1, output.shape[-1])).sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def breakdown(original, ours, pixels, ids, captions_per_image: int) -> dict:
    """Forward + backward seconds of each part of the step: text tower, vision tower, loss head (on fixed features)."""
    K, batch = captions_per_image, pixels.shape[0]
    indices = sample_text_indices(batch, K, torch.Generator().manual_seed(0))[1]
    with torch.no_grad():
        text, (image, tokens) = ours.get_text_embeds(ids), ours.get_image_and_token_features(pixels)
    text, image, tokens = (t.clone().requires_grad_() for t in (text, image, tokens))
    scale, bias = ours.logit_scale.exp().detach(), ours.logit_bias
    parts = {
        "original": {
            "text_tower": lambda: original.encode_text(ids),
            "vision_tower": lambda: original.encode_image(pixels)[1],
            "loss_head": lambda: original.loss_from_features(text, image, tokens, K, indices)[None],
        },
        "ours": {
            "text_tower": lambda: ours.get_text_embeds(ids),
            "vision_tower": lambda: ours.get_image_and_token_features(pixels)[1],
            "loss_head": lambda: flair_loss(ours.text_conditioned_pooling, image, tokens, text, scale, bias, K, indices)[None],
        },
    }
    result = {name: {part: forward_backward_seconds(f) for part, f in functions.items()} for name, functions in parts.items()}
    for model in (original, ours):
        model.zero_grad(set_to_none=True)
    return result


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
    parser.add_argument("--model-size", choices=sorted(SIZES), default="vit-b-16", help="default: %(default)s")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step (default: %(default)s)")
    parser.add_argument("--captions-per-image", type=int, default=8, help="default: %(default)s")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps of each formulation (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="data pipeline workers (default: %(default)s)")
    parser.add_argument("--data", help="webdataset shard pattern (default: synthetic shards)")
    parser.add_argument("--output", default="benchmarks/results/training-cpu.json", help="default: %(default)s")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        pattern = args.data or synthetic_shards(Path(tmp))
        pipeline = data_pipeline(args, pattern)
    print(f"data pipeline: {pipeline['samples_per_second']:.1f} samples/s with {args.workers} workers")
    original, ours = original_and_ours(args.model_size)
    size = ours.config.vision_config.image_size
    pixels = torch.randn(args.batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    steps, parts = {}, {}
    for lengths in ("flair", "full"):
        ids = caption_ids(args.batch_size * args.captions_per_image, lengths)
        steps[lengths] = compare_steps(original, ours, pixels, ids, args.captions_per_image, args.rounds)
        steps[lengths]["mean_caption_tokens"] = float((ids.argmax(-1) + 1).float().mean())
        parts[lengths] = breakdown(original, ours, pixels, ids, args.captions_per_image)
        row = steps[lengths]
        print(f"{lengths} captions ({row['mean_caption_tokens']:.0f} tokens on average): original "
              f"{row['original']['step']:.2f} s, ours {row['ours']['step']:.2f} s per step -> "
              f"{row['speed_ours_over_original']:.2f}x (rounds: {', '.join(f'{r:.2f}' for r in row['speed_per_round'])}); "
              f"loss difference {row['loss_abs_difference']:.1e}")  # fmt: skip
        for name in ("original", "ours"):
            print(f"  {name:8s} " + ", ".join(f"{part} {seconds:.2f} s" for part, seconds in parts[lengths][name].items())
                  + f", AdamW {row[name]['optimizer']:.2f} s")  # fmt: skip
    write_json({
        "device": "cpu", "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "model_size": args.model_size, "batch_size": args.batch_size,
        "captions_per_image": args.captions_per_image, "training_step": steps,
        "breakdown_forward_backward_seconds": parts, "data_pipeline": pipeline,
    }, args.output)  # fmt: skip
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
