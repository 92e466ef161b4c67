"""Train or fine-tune FLAIR with Accelerate, from one CPU to multi-node GPU clusters (DDP or FSDP2).

    accelerate launch [--config_file training/accelerate/fsdp2.yaml] training/train.py --config training/configs/cc3m_recap.yaml \
        [--train-data "cc3m-train-{0000..0575}.tar"] [--output-dir runs/cc3m] [--resume latest] [--KEY VALUE ...]

Every field of `TrainConfig` can be set in the YAML file and overridden on the command line (`--batch-size 64`).
The model starts from scratch (`model_config`) or from any FLAIR or CLIP checkpoint in HF format (`--model DIR`).
Checkpoints (`accelerator.save_state`, sharded under FSDP) are written every `checkpoint_every` steps and resumed with
`--resume latest`; the final model is exported as a `from_pretrained` directory (safetensors, processor, remote code).
"""

import dataclasses
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from flair_hf import FlairConfig, FlairImageProcessor, FlairModel, FlairProcessor, FlairTokenizer
from flair_hf_training.checkpoints import (
    POSITION_FIELDS, export, find_checkpoint, gather_positions, resumed_position, save_checkpoint, schedule_length, start_logs,
)  # fmt: skip
from flair_hf_training.config import ConfigError, TrainConfig, check_trackers, load_config
from flair_hf_training.data import DataError, FlairTrainingStream, check_shards, make_collate, parse_sources

MAX_LOGIT_SCALE = math.log(100)


def enable_fsdp_on_cpu(accelerator) -> None:
    """Make `accelerate launch` with an FSDP config really use FSDP on a CPU-only machine.

    Stock Accelerate silently drops the FSDP plugin when the state is MULTI_CPU (plain DDP). When the launcher asked
    for FSDP (`ACCELERATE_USE_FSDP=true`), build the plugin from the FSDP_* environment and switch both the
    PartialState and the AcceleratorState to FSDP on CPU (each re-copies the other's shared state). No-op on GPU.
    """
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.MULTI_CPU or os.environ.get("ACCELERATE_USE_FSDP", "").lower() != "true":
        return
    plugin = FullyShardedDataParallelPlugin()
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    for state in (PartialState(), AcceleratorState()):
        state.distributed_type = DistributedType.FSDP
        state.device = torch.device("cpu")
    AcceleratorState().fsdp_plugin = plugin


def set_scalar_shapes(model: FlairModel, shape: tuple) -> None:
    """FSDP rejects 0-d parameters: train `logit_scale` / `logit_bias` as `[1]`, export them as `()` (CLIP's shape)."""
    for name in ("logit_scale", "logit_bias"):
        parameter = getattr(model, name)
        if tuple(parameter.shape) != shape:
            setattr(model, name, torch.nn.Parameter(parameter.detach().reshape(shape)))


def build_model(config: TrainConfig) -> FlairModel:
    if config.model is None:
        model = FlairModel(FlairConfig(**config.model_config))
    else:
        model = FlairModel.from_pretrained(config.model)  # a CLIP checkpoint loads too; the pooling head starts random
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable()
    set_scalar_shapes(model, (1,))
    return model


def build_processor(config: TrainConfig, model: FlairModel) -> FlairProcessor:
    """The checkpoint's processor, or FLAIR's own tokenizer and image processor at the model's image size."""
    if config.model is not None:
        try:
            return FlairProcessor.from_pretrained(config.model)
        except (OSError, ValueError, TypeError):
            pass  # a CLIP checkpoint: use FLAIR's own tokenizer and image processor
    size = model.config.vision_config.image_size
    image_processor = FlairImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return FlairProcessor(image_processor, FlairTokenizer.from_bpe_vocab())


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups as the original: no weight decay on tensors with fewer than two dimensions (gains, biases, the
    logit scalars); every matrix, embedding table and the patch convolution is decayed."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over `parameter_groups` with the configured betas and epsilon; `fused_adamw` selects torch's fused
    kernel, the same update as the original's per-tensor loop up to float rounding."""
    return torch.optim.AdamW(
        parameter_groups(model, config.weight_decay), lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
        fused=config.fused_adamw or None,
    )  # fmt: skip


def learning_rate(step: int, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    """The rate optimizer step `step` (0-based) uses, as the original's cosine schedule: linear warmup
    `base_lr * (step + 1) / warmup_steps`, then `0.5 * (1 + cos(pi * (step - warmup) / (total - warmup))) * base_lr`."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / decay_steps)) * base_lr if decay_steps > 0 else base_lr


def build_stream(config: TrainConfig, rank: int, world_size: int, image_size: int) -> FlairTrainingStream:
    common = dict(
        captions_per_image=config.captions_per_image, max_merged=config.max_merged, caption_keys=tuple(config.caption_keys),
        shuffle_buffer=config.shuffle_buffer, seed=config.seed, rank=rank, world_size=world_size, image_size=image_size,
    )  # fmt: skip
    if config.train_data:
        sources = parse_sources(config.train_data, config.train_data_weights)
        check_shards(sources)
        return FlairTrainingStream(sources, **common)
    if config.dataset_name:
        import datasets

        path = Path(config.dataset_name)
        if path.is_dir() and any((path / name).exists() for name in ("state.json", "dataset_dict.json")):
            dataset = datasets.load_from_disk(str(path))  # a dataset saved with save_to_disk
        else:
            dataset = datasets.load_dataset(config.dataset_name, split=config.dataset_split)
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[config.dataset_split]
        return FlairTrainingStream(dataset=dataset, image_column=config.image_column, caption_column=config.caption_column, **common)
    raise ConfigError("give --train-data (webdataset shards) or --dataset-name (a datasets dataset)")


def steps_per_epoch(config: TrainConfig, stream: FlairTrainingStream, world_size: int) -> int:
    samples = config.train_num_samples or (len(stream.dataset) if stream.dataset is not None else None)
    if samples is None:
        raise ConfigError("--train-num-samples is needed with webdataset shards (samples per epoch)")
    return max(1, samples // (config.batch_size * world_size * config.gradient_accumulation_steps))


def evaluate_loss(model, config: TrainConfig, device) -> float:
    from safetensors.torch import load_file

    batch = load_file(config.eval_batch)
    model.eval()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(config.seed)
        output = model(
            input_ids=batch["input_ids"].to(device), pixel_values=batch["pixel_values"].to(device), return_loss=True,
            captions_per_image=config.captions_per_image, add_mps_loss=config.add_mps_loss, loss_across_ranks=False,
            add_tcs_loss=config.add_tcs_loss,
        )  # fmt: skip
    model.train()
    return output.loss.item()


def load_eval_benchmarks(config: TrainConfig) -> list:
    """`[(name, dataset)]` for `--eval-benchmarks` (a list or "a,b"), checked before training starts."""
    from flair_hf.retrieval_data import LAYOUTS, BenchmarkDataError, load_benchmark

    names = list(dict.fromkeys(config.eval_benchmarks))
    if not names:
        return []
    unknown = [name for name in names if name not in LAYOUTS]
    if unknown:
        raise ConfigError(f"unknown --eval-benchmarks {', '.join(unknown)}: choose from {', '.join(LAYOUTS)}")
    if not config.eval_data_root:
        raise ConfigError("--eval-benchmarks needs --eval-data-root (the benchmarks' original layouts)")
    try:
        return [(name, load_benchmark(name, config.eval_data_root)) for name in names]
    except BenchmarkDataError as error:
        raise ConfigError(f"--eval-data-root {config.eval_data_root}: {str(error).strip().splitlines()[0]}") from None


def evaluate_during_training(accelerator, model, processor, benchmarks, config: TrainConfig, step: int, output_dir: Path) -> dict:
    """Zero-shot retrieval of the current weights, split across ranks; R@1/5/10 to the trackers and eval.jsonl."""
    from flair_hf.evaluation import evaluate_retrieval

    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
    logged = {}
    for name, dataset in benchmarks:
        result = evaluate_retrieval(
            accelerator.unwrap_model(model), processor, dataset, config.eval_mode, batch_size=config.eval_batch_size,
            device=accelerator.device, autocast_dtype=autocast_dtype, progress=False,
        )  # fmt: skip
        metrics = result["metrics"]
        logged.update({f"eval/{name}/{key}": value for key, value in metrics.items() if "_R@" in key})
        if accelerator.is_main_process:
            record = {"step": step, "benchmark": name, "mode": config.eval_mode, **result}
            with (output_dir / "eval.jsonl").open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        accelerator.print(
            f"step {step} {name} ({config.eval_mode}): text->image R@1 {metrics['text_to_image_R@1']:.1f}, "
            f"image->text R@1 {metrics['image_to_text_R@1']:.1f}"
        )
    if config.report_to != "none":
        accelerator.log(logged, step=step)
    return logged


def train(config: TrainConfig) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    output_dir = Path(config.output_dir)
    mixed_precision = config.mixed_precision
    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() else "no"
    report_to = None if config.report_to == "none" else config.report_to
    check_trackers(report_to)
    eval_benchmarks = load_eval_benchmarks(config)
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # without TCS the pooling head gets no gradient, which DDP must be told of
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=not config.add_tcs_loss)],
    )
    enable_fsdp_on_cpu(accelerator)
    set_seed(config.seed, device_specific=True)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = config.tf32
    rank, world_size = accelerator.process_index, accelerator.num_processes
    checkpoint = find_checkpoint(config, output_dir, accelerator.print)
    state = json.loads((checkpoint / "trainer_state.json").read_text()) if checkpoint is not None else None

    model = build_model(config)
    processor = build_processor(config, model)
    stream = build_stream(config, rank, world_size, config.image_size or model.config.vision_config.image_size)
    # the loader gets its own generator so that creating it does not advance the global RNG (negative sampling),
    # which keeps a resumed run identical to an uninterrupted one
    loader = torch.utils.data.DataLoader(
        stream, batch_size=config.batch_size, num_workers=config.workers, collate_fn=make_collate(processor.tokenizer),
        drop_last=True, generator=torch.Generator().manual_seed(config.seed),
    )  # fmt: skip
    per_epoch = steps_per_epoch(config, stream, world_size)
    total_steps = config.max_steps or per_epoch * config.epochs
    optimizer = build_optimizer(model, config)
    schedule_steps = schedule_length(state, total_steps, config, accelerator.print)
    # the rate is set before each step from the step number (no scheduler object: Accelerate would step one
    # num_processes times per optimizer step)
    model, optimizer = accelerator.prepare(model, optimizer)  # together, as FSDP2 requires
    if accelerator.is_main_process:
        start_logs(output_dir, checkpoint, state["step"] if state else 0)
    accelerator.wait_for_everyone()
    if report_to:
        accelerator.init_trackers("flair", config={k: str(v) for k, v in dataclasses.asdict(config).items()})

    step, position = 0, dict.fromkeys(POSITION_FIELDS, 0)
    stats_base = dict.fromkeys(stream.stats.FIELDS, 0)  # this rank's counts before this process started
    if checkpoint is not None:
        position = resumed_position(state, checkpoint, rank, world_size)
        stats_base.update(position.pop("stats_at_epoch_start"))
        accelerator.load_state(str(checkpoint))
        step = state["step"]
        accelerator.print(f"resumed from {checkpoint} at step {step} (main process: epoch {position['epoch']}, micro-batch {position['batches_in_epoch']})")
        fused = bool(optimizer.param_groups[0].get("fused"))  # load_state restores the checkpoint's groups
        if fused != config.fused_adamw:
            accelerator.print(f"AdamW keeps the checkpoint's kernel (fused: {str(fused).lower()}), so the run continues as it began")
        if step >= total_steps:
            accelerator.print(f"this run is already finished ({step} of {total_steps} steps): nothing to train")

    initial_eval_loss = evaluate_loss(model, config, accelerator.device) if config.eval_batch else None
    losses_path = output_dir / "losses.jsonl"
    unwrapped = accelerator.unwrap_model(model)
    model.train()
    eval_metrics, last_eval_step = {}, (state or {}).get("last_eval_step")
    step_start, data_wait, micro_losses = None, 0.0, []  # of the step being accumulated (it may span epochs)

    def rank_stats() -> dict:  # this rank's skipped-data counts since the run began
        return {key: stats_base[key] + value for key, value in stream.stats.as_dict().items()}

    with tqdm(total=total_steps, initial=step, disable=config.quiet or not accelerator.is_main_process, desc="training") as progress:
        while step < total_steps:
            stats_at_epoch_start = rank_stats()
            stream.set_epoch(position["epoch"])
            batches = iter(loader)
            for _ in range(position["batches_in_epoch"]):
                next(batches)  # the micro-batches this rank took from this epoch before the checkpoint
            wait_start = time.perf_counter()
            batches_seen = 0
            for batch in batches:
                batches_seen += 1
                position["batches_in_epoch"] += 1
                data_wait += time.perf_counter() - wait_start
                step_start = step_start or wait_start  # the step's first micro-batch began waiting for its data
                lr = learning_rate(step, config.lr, config.warmup_steps, schedule_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with accelerator.accumulate(model):
                    output = model(
                        input_ids=batch["input_ids"].to(accelerator.device), pixel_values=batch["pixel_values"].to(accelerator.device),
                        return_loss=True, captions_per_image=config.captions_per_image, add_mps_loss=config.add_mps_loss,
                        add_tcs_loss=config.add_tcs_loss,
                    )  # fmt: skip
                    accelerator.backward(output.loss)
                    if config.grad_clip_norm is not None and accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                micro_losses.append(output.loss.detach())
                if not accelerator.sync_gradients:
                    wait_start = time.perf_counter()
                    continue
                with torch.no_grad():
                    unwrapped.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
                step, position["step_in_epoch"] = step + 1, position["step_in_epoch"] + 1
                counts = rank_stats()
                step_loss = torch.stack(micro_losses).mean().item()  # over the step's micro-batches
                summed = accelerator.reduce(torch.tensor([step_loss, *counts.values()], dtype=torch.float64, device=accelerator.device), "sum")
                loss = summed[0].item() / world_size
                data_stats = {key: round(value) for key, value in zip(counts, summed[1:].tolist())}
                samples_per_second = config.batch_size * len(micro_losses) / max(time.perf_counter() - step_start, 1e-9)
                metrics = {
                    "loss": loss, "lr": lr,
                    "logit_scale": unwrapped.logit_scale.detach().float().exp().mean().item(),
                    "logit_bias": unwrapped.logit_bias.detach().float().mean().item(),
                    "samples_per_second": samples_per_second * world_size, "samples_per_second_per_device": samples_per_second,
                    "data_wait_seconds": data_wait, **data_stats,
                }  # fmt: skip
                step_start, data_wait, micro_losses = None, 0.0, []
                if accelerator.is_main_process:
                    with losses_path.open("a") as handle:
                        handle.write(json.dumps({"step": step, **metrics}) + "\n")
                if report_to and step % config.log_every == 0:
                    accelerator.log(metrics, step=step)
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4f}")
                if eval_benchmarks and config.eval_every_steps and step % config.eval_every_steps == 0:
                    eval_metrics = evaluate_during_training(accelerator, model, processor, eval_benchmarks, config, step, output_dir)
                    last_eval_step = step
                if step % config.checkpoint_every == 0 or step == total_steps:
                    if position["step_in_epoch"] >= per_epoch:  # a resume then starts the next epoch, as this run does
                        saved, saved_stats = {"epoch": position["epoch"] + 1, "step_in_epoch": 0, "batches_in_epoch": 0}, counts
                    else:
                        saved, saved_stats = position, stats_at_epoch_start
                    trainer_state = {
                        "step": step, "schedule_steps": schedule_steps, "last_eval_step": last_eval_step,
                        "data_positions": gather_positions(accelerator, saved, saved_stats),
                    }  # fmt: skip
                    save_checkpoint(accelerator, output_dir / "checkpoints" / f"step_{step}", trainer_state)
                if step >= total_steps or position["step_in_epoch"] >= per_epoch:
                    break
                wait_start = time.perf_counter()
            if batches_seen == 0 and position["step_in_epoch"] == 0:
                raise ConfigError(
                    f"rank {rank} got no full batch of {config.batch_size} in epoch {position['epoch']}: its shards hold fewer samples; "
                    "use more, smaller shards (prepare_data.py --samples-per-shard), fewer processes or workers, or a smaller --batch-size"
                )
            position = {"epoch": position["epoch"] + 1, "step_in_epoch": 0, "batches_in_epoch": 0}
    if eval_benchmarks and last_eval_step != step:
        eval_metrics = evaluate_during_training(accelerator, model, processor, eval_benchmarks, config, step, output_dir)

    export_dir = Path(config.export_dir or output_dir / "final")
    export(accelerator, model, processor, export_dir)
    summary = {
        "steps": step, "world_size": world_size, "distributed_type": str(accelerator.distributed_type),
        "export_dir": str(export_dir), **eval_metrics,
    }  # fmt: skip
    if config.eval_batch:
        summary.update(initial_eval_loss=initial_eval_loss, eval_loss=evaluate_loss(model, config, accelerator.device))
    if accelerator.is_main_process:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    del model, optimizer, unwrapped
    gc.collect()
    accelerator.end_training()  # after freeing the model: avoids the exit hang seen with gloo
    logs = f", tracker logs in {output_dir / 'logs'}" if report_to else ""
    eval_log = f", retrieval results in {output_dir / 'eval.jsonl'}" if eval_benchmarks else ""
    accelerator.print(
        f"model: {export_dir}; checkpoints: {output_dir / 'checkpoints'}; losses: {losses_path}{eval_log}{logs}; "
        f"summary: {output_dir / 'summary.json'}"
    )
    return summary


def run(argv=None):
    """`train` on the parsed command line; a data error in a worker becomes the one-line `ConfigError` it names."""
    config = load_config(argv, __doc__)
    try:
        train(config)
        return
    except DataError as error:  # raised in a DataLoader worker, it arrives wrapped with the worker's traceback
        message = str(error).rstrip().splitlines()[-1].removeprefix(f"{DataError.__module__}.{DataError.__name__}: ")
    gc.collect()  # the DataLoader's workers end (and finish printing) before the error is printed, last
    raise ConfigError(message)


def main(argv=None):
    """The command line: a string exit message is printed in one write, so that the lines of ranks failing together
    never interleave."""
    try:
        run(argv)
    except SystemExit as error:
        if not isinstance(error.code, str):
            raise
        sys.stderr.flush()
        os.write(2, f"{error.code}\n".encode())
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
