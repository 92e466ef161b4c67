"""Train or fine-tune FLAIR with Accelerate, from one CPU to multi-node GPU clusters (DDP or FSDP2).

    accelerate launch [--config_file training/accelerate/fsdp2.yaml] training/train.py --config training/configs/cc3m_recap.yaml \
        [--train-data "cc3m-train-{0000..0575}.tar"] [--output-dir runs/cc3m] [--resume latest] [--KEY VALUE ...]

Every field of `TrainConfig` can be set in the YAML file and overridden on the command line (`--batch-size 64`).
The model starts from scratch (`model_config`) or from any FLAIR or CLIP checkpoint in HF format (`--model DIR`).
Checkpoints (`accelerator.save_state`, sharded under FSDP) are written every `checkpoint_every` steps and resumed with
`--resume latest`; the final model is exported as a `from_pretrained` directory (safetensors, processor, remote code).
"""

import argparse
import dataclasses
import difflib
import gc
import inspect
import json
import math
import os
import shutil
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from flair_hf import FlairConfig, FlairImageProcessor, FlairModel, FlairProcessor, FlairTextConfig, FlairTokenizer, FlairVisionConfig
from flair_hf.captions import DREAMLIP_KEYS
from flair_hf.evaluation import MODES
from flair_hf_training.data import DataError, FlairTrainingStream, check_shards, make_collate, parse_sources

MAX_LOGIT_SCALE = math.log(100)


def option(default, help: str):
    """A `TrainConfig` field with its `--help` line (list and dict defaults are copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # data
    train_data: str | None = option(None, 'webdataset shards: paths or brace patterns, sources joined by "::"')
    train_data_weights: str | None = option(None, 'source weights "w1::w2" (shards resampled in proportion)')
    dataset_name: str | None = option(None, "a datasets dataset (Hub id or local directory) instead of shards")
    dataset_split: str = option("train", "split of --dataset-name")
    image_column: str = option("image", "image column of --dataset-name")
    caption_column: str = option("caption", "caption column of --dataset-name")
    caption_keys: list = option(list(DREAMLIP_KEYS), "caption fields read from each sample's .json")
    train_num_samples: int | None = option(None, "samples per epoch (needed for shards; default: the dataset's length)")
    captions_per_image: int = option(8, "K: sub-captions sampled per image")
    max_merged: int = option(3, "most sentences merged into one sub-caption")
    shuffle_buffer: int = option(1000, "samples in the shuffle buffer")
    workers: int = option(2, "DataLoader workers per process")
    image_size: int | None = option(None, "training crop size (default: the model's vision image_size)")
    # model
    model: str | None = option(None, "FLAIR or CLIP checkpoint (directory or Hub id, HF format); none: from scratch")
    model_config: dict = option({}, "FlairConfig fields for a model from scratch")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass (less memory)")
    add_mps_loss: bool = option(True, "add the multi-positive sigmoid loss")
    add_tcs_loss: bool = option(True, "the text-conditioned sigmoid loss (false: the global multi-positive loss alone, a SigLIP-style baseline)")
    # optimisation (the paper's CC3M-recap recipe)
    epochs: int = option(32, "epochs (ignored when --max-steps is set)")
    max_steps: int | None = option(None, "optimizer steps in total (default: epochs x steps per epoch)")
    batch_size: int = option(128, "images per device per step")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    lr: float = option(5e-4, "peak learning rate")
    warmup_steps: int = option(2000, "linear warmup steps before the cosine decay")
    reset_schedule: bool = option(False, "on resume, rebuild the LR schedule for a changed --max-steps / --epochs")
    weight_decay: float = option(0.5, "AdamW weight decay on every tensor with 2 or more dimensions (as the original)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.98, "AdamW beta2")
    eps: float = option(1e-8, "AdamW epsilon")
    fused_adamw: bool = option(True, "AdamW's fused kernel (one pass over all tensors, about 6x faster on CPU); false: torch's default, as the original; a resumed run keeps its checkpoint's")
    grad_clip_norm: float | None = option(None, "clip the gradients' global norm to this value (none: no clipping, as the paper runs)")
    mixed_precision: str = option("auto", "auto (bf16 on GPU, fp32 on CPU), no, bf16 or fp16 (with loss scaling, as the original's amp)")
    tf32: bool = option(True, "allow TF32 matmuls and convolutions on GPU (the original enables them)")
    seed: int = option(0, "seed for data order, sub-caption and negative sampling")
    # checkpoints, logging, export
    output_dir: str = option("runs/flair", "checkpoints, logs, losses.jsonl, eval.jsonl and the final model")
    checkpoint_every: int = option(1000, "save a resumable checkpoint every N steps (and at the end)")
    resume: str | None = option(None, '"latest" (the newest complete checkpoint, or a new run if none) or a checkpoint directory')
    overwrite: bool = option(False, "start a new run in an OUTPUT_DIR that holds one (deletes its checkpoints, logs and model)")
    log_every: int = option(10, "send metrics to the trackers every N steps")
    quiet: bool = option(False, "no progress bar (-q); evaluations, notices and the summary still print")
    report_to: str = option("tensorboard", "tensorboard, wandb, all or none")
    export_dir: str | None = option(None, "where the final model goes (default: OUTPUT_DIR/final)")
    eval_batch: str | None = option(None, "safetensors with pixel_values/input_ids: loss before and after training")
    # zero-shot retrieval during training (flair_hf.evaluation, as benchmarks/evaluate_retrieval.py)
    eval_benchmarks: list = option([], 'retrieval benchmarks, e.g. "coco,flickr30k" (see flair_hf.retrieval_data)')
    eval_data_root: str | None = option(None, "root of the benchmarks' original layouts")
    eval_every_steps: int | None = option(None, "evaluate every N steps (always at the end when benchmarks are given)")
    eval_mode: str = option("flair", "retrieval scoring: flair, topk or global")
    eval_batch_size: int = option(64, "images / texts per encoding batch")


class ConfigError(SystemExit):
    """A one-line configuration error, printed before anything starts (no traceback)."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")


def _type_name(kind) -> str:
    return " or ".join(sorted({t.__name__ for t in typing.get_args(kind) if t is not type(None)})) or getattr(kind, "__name__", str(kind))


def coerce(name: str, kind, value):
    """`value` (from YAML or the command line) as the field's type: `1e-4` is a float, "true" a bool, "a,b" a list."""
    option = f"--{name.replace('_', '-')}"
    optional = type(None) in typing.get_args(kind)
    if isinstance(value, str) and value.strip().lower() in ("null", "none", "~") and optional:
        value = None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{option} needs a value ({_type_name(kind)})")
    base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
    if base in (int, list, dict) and isinstance(value, str):
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"{option} {value!r} is not valid YAML ({_type_name(kind)} expected)") from None
        value = parsed if base is not list or isinstance(parsed, list) else value
    if base is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif base is float:
        try:
            if not isinstance(value, bool):
                return float(value)
        except (TypeError, ValueError):
            pass
    elif base is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif base is list:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        if isinstance(value, (list, tuple)):
            return list(value)
    elif base is dict:
        if isinstance(value, dict):
            return value
    raise ConfigError(f"{option} {value!r} is not a {_type_name(kind)}")


def check_model_config(model_config: dict) -> None:
    """Every key of `model_config` (and of its `text_config` / `vision_config`) must be a field of the config class."""
    def check(values, config_class, where):
        if not isinstance(values, dict):
            raise ConfigError(f"{where} must be a mapping of {config_class.__name__} fields, got {values!r}")
        known = sorted(inspect.get_annotations(config_class))
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ConfigError(f"unknown key {key!r} in {where}{hint}; valid keys: {', '.join(known)}")

    check(model_config, FlairConfig, "model_config")
    for key, config_class in (("text_config", FlairTextConfig), ("vision_config", FlairVisionConfig)):
        if model_config.get(key) is not None:
            check(model_config[key], config_class, f"model_config.{key}")


CHOICES = {
    "mixed_precision": ("auto", "no", "bf16", "fp16"),
    "report_to": ("tensorboard", "wandb", "all", "none"),
    "eval_mode": MODES,
}
AT_LEAST_ONE = ("epochs", "batch_size", "captions_per_image", "max_merged", "gradient_accumulation_steps", "shuffle_buffer",
                "checkpoint_every", "log_every", "eval_batch_size", "max_steps", "train_num_samples", "eval_every_steps")
NOT_NEGATIVE = ("lr", "warmup_steps", "weight_decay", "workers")


def validate(config: TrainConfig) -> TrainConfig:
    """Range and choice checks, each a one-line error naming the option."""
    for name in AT_LEAST_ONE:
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name in NOT_NEGATIVE:
        if getattr(config, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 0, got {getattr(config, name)}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(config, name) < 1:
            raise ConfigError(f"--{name} must be in [0, 1), got {getattr(config, name)}")
    for name in ("eps", "grad_clip_norm", "image_size"):
        value = getattr(config, name)
        if value is not None and not value > 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if not math.isfinite(config.lr):
        raise ConfigError(f"--lr must be a finite number, got {config.lr}")
    for name, choices in CHOICES.items():
        if getattr(config, name) not in choices:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(config, name)!r}: choose from {', '.join(choices)}")
    if not (config.add_tcs_loss or config.add_mps_loss):
        raise ConfigError("--add-tcs-loss false needs --add-mps-loss true: the loss needs at least one of its terms")
    if config.model is not None and config.model_config:
        raise ConfigError("give --model (a checkpoint to start from) or --model-config (a model from scratch), not both")
    check_model_config(config.model_config)
    try:
        FlairConfig(**config.model_config)
    except Exception as error:  # noqa: BLE001 - huggingface_hub wraps the config's own ValueError
        raise ConfigError(f"model_config: {str(error.__cause__ or error).splitlines()[0]}") from None
    return config


# names other trainers (transformers' Trainer, open_clip) use for an option of ours
OTHER_TRAINERS_NAMES = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
    "train_batch_size": "batch_size", "accum_freq": "gradient_accumulation_steps", "max_train_steps": "max_steps",
    "warmup": "warmup_steps", "wd": "weight_decay", "save_steps": "checkpoint_every", "logging_steps": "log_every",
    "resume_from_checkpoint": "resume", "precision": "mixed_precision", "grad_checkpointing": "gradient_checkpointing",
    "num_workers": "workers", "dataloader_num_workers": "workers", "max_grad_norm": "grad_clip_norm",
    "adam_beta1": "beta1", "adam_beta2": "beta2", "adam_epsilon": "eps", "output": "output_dir", "logs": "output_dir",
}  # fmt: skip


def unknown_option_error(option: str) -> ConfigError:
    """`--learning-rate` -> "did you mean --lr?": another trainer's name for an option, else the closest name."""
    name = option.lstrip("-").split("=")[0].replace("-", "_")
    fields = [item.name for item in dataclasses.fields(TrainConfig)]
    guess = OTHER_TRAINERS_NAMES.get(name) or next(iter(difflib.get_close_matches(name, fields, n=1, cutoff=0.6)), None)
    hint = f": did you mean --{guess.replace('_', '-')}?" if guess else " (see --help for the options)"
    return ConfigError(f"unknown option {option.split('=')[0]}{hint}")


def load_config(argv=None) -> TrainConfig:
    """YAML `--config` first, then `--field value` overrides; every value parsed as its field's type and validated."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with TrainConfig fields (command-line options override it)")
    defaults = TrainConfig()
    for item in dataclasses.fields(TrainConfig):
        help_text = item.metadata["help"]
        if "default" not in help_text:
            help_text += f" (default: {getattr(defaults, item.name)!r})"
        parser.add_argument(f"--{item.name.replace('_', '-')}", dest=item.name, default=argparse.SUPPRESS, help=help_text.replace("%", "%%"))
    parser.add_argument("-q", dest="quiet", action="store_const", const=True, default=argparse.SUPPRESS, help="--quiet true")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise unknown_option_error(next((word for word in unknown if word.startswith("-")), unknown[0]))
    args = vars(args)
    config_file = args.pop("config", None)
    values = {}
    if config_file:
        if not Path(config_file).is_file():
            raise ConfigError(f"--config {config_file}: no such file")
        try:
            values = yaml.safe_load(Path(config_file).read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"--config {config_file} is not valid YAML: {str(error).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"--config {config_file} must hold a mapping of option: value")
    fields = {item.name: item for item in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown keys in {config_file}: {', '.join(unknown)} (see --help for the options)")
    merged = {**values, **args}
    hints = typing.get_type_hints(TrainConfig)
    return validate(TrainConfig(**{name: coerce(name, hints[name], value) for name, value in merged.items()}))


def check_trackers(report_to: str | None) -> None:
    """Accelerate only warns when a requested tracker is not installed; fail clearly instead."""
    import importlib.util

    wanted = {"tensorboard", "wandb"} if report_to == "all" else {report_to} - {None}
    missing = [name for name in sorted(wanted) if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"--report-to {report_to} needs {', '.join(missing)} (pip install -e '.[train]' for TensorBoard); "
            "or pass --report-to none"
        )


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


RUN_FILES = ("checkpoints", "losses.jsonl", "eval.jsonl", "summary.json", "logs", "final")
STEP_LOGS = ("losses.jsonl", "eval.jsonl")  # one JSON record per line, each with its "step"


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / "trainer_state.json").is_file()


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint (a save killed midway leaves only a `.partial` directory, never picked)."""
    found = [path for path in (output_dir / "checkpoints").glob("step_*") if path.name.split("_")[1].isdigit() and is_complete(path)]
    return max(found, key=lambda path: int(path.name.split("_")[1]), default=None)


def find_checkpoint(config: TrainConfig, output_dir: Path, print_fn) -> Path | None:
    """The checkpoint `--resume` names; a new run must not silently overwrite an old one."""
    checkpoint = latest_checkpoint(output_dir) if config.resume == "latest" else None
    if checkpoint is None and config.resume in (None, "latest"):
        # a run killed before its first checkpoint leaves only its step logs, which --resume latest may replace
        ignored = STEP_LOGS + ("logs",) if config.resume == "latest" else ()
        existing = [name for name in RUN_FILES if (output_dir / name).exists() and name not in ignored]
        if existing and not config.overwrite:
            raise ConfigError(
                f"{output_dir} already holds a run ({', '.join(existing)}): pass --resume latest to continue it, "
                "--overwrite true to start over, or another --output-dir"
            )
    if config.resume == "latest":
        print_fn(f"resuming from {checkpoint}, the newest complete checkpoint" if checkpoint else f"no checkpoint in {output_dir}: new run")
        return checkpoint
    if config.resume is None:
        return None
    checkpoint = Path(config.resume)
    if not checkpoint.is_dir():
        raise ConfigError(f"--resume {config.resume}: no such checkpoint directory (or pass --resume latest)")
    if not is_complete(checkpoint):
        raise ConfigError(f"--resume {config.resume} is not a complete checkpoint (no trainer_state.json): pick another")
    return checkpoint


def start_logs(output_dir: Path, checkpoint: Path | None, step: int) -> None:
    """A new run starts from an empty directory of its own; a resumed one keeps its logs up to the checkpoint's step,
    so every step appears once in losses.jsonl and eval.jsonl however often the run was resumed."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if checkpoint is None:
        for name in RUN_FILES:
            path = output_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        return
    for name in STEP_LOGS:
        path = output_dir / name
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if (logged := logged_step(line)) is not None and logged <= step]
            partial = path.with_name(path.name + ".partial")
            partial.write_text("".join(line + "\n" for line in kept))
            partial.replace(path)
    newer = [path for path in (output_dir / "checkpoints").glob("step_*") if path.name.removeprefix("step_").isdigit()
             and int(path.name.removeprefix("step_")) > step]  # fmt: skip
    for path in newer:  # an abandoned continuation: --resume latest must not pick it later
        print(f"removing {path}: newer than the resumed checkpoint (step {step})")
        shutil.rmtree(path)


def logged_step(line: str) -> int | None:
    """The step of a JSON-lines record; None for a line torn by a killed write."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


def save_checkpoint(accelerator, directory: Path, trainer_state: dict) -> None:
    """`accelerator.save_state` into `step_N.partial`, then the trainer state, then a rename: a checkpoint is visible
    under its name only when complete."""
    partial = directory.with_name(directory.name + ".partial")
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)  # left by a run killed while saving
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / "trainer_state.json").write_text(json.dumps(trainer_state))
        if directory.exists():
            shutil.rmtree(directory)
        partial.rename(directory)
    accelerator.wait_for_everyone()


def export(accelerator, model, processor, directory: Path) -> None:
    """Gather a full state dict on the main process and write a `from_pretrained` directory (with remote code).

    The weights go into a fresh, unwrapped `FlairModel` (FSDP2 swaps the model's class), with the logit scalars back
    in CLIP's `()` shape, so the export is an ordinary FLAIR checkpoint.
    """
    state_dict = accelerator.get_state_dict(model)  # collective: every rank takes part
    if accelerator.is_main_process:
        for name in ("logit_scale", "logit_bias"):
            state_dict[name] = state_dict[name].reshape(())
        clean = FlairModel(accelerator.unwrap_model(model).config)
        clean.load_state_dict(state_dict)
        clean.save_pretrained(directory)
        processor.save_pretrained(directory)
    accelerator.wait_for_everyone()


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


def schedule_length(checkpoint_state: dict | None, total_steps: int, config: TrainConfig, print_fn) -> int:
    """Steps of the LR schedule: a resumed run keeps its checkpoint's schedule unless `--reset-schedule true`."""
    if checkpoint_state is None or "schedule_steps" not in checkpoint_state:
        return total_steps
    saved, step = checkpoint_state["schedule_steps"], checkpoint_state["step"]
    if saved == total_steps:
        return total_steps
    if config.reset_schedule:
        print_fn(f"warning: LR schedule rebuilt for {total_steps} steps (was {saved}); the LR changes abruptly at step {step}")
        return total_steps
    if total_steps > saved:
        raise ConfigError(
            f"the checkpoint's LR schedule ends at step {saved} but --max-steps / --epochs now give {total_steps} steps: "
            "pass --reset-schedule true to rebuild the schedule (the LR jumps at the resumed step), or keep the old length"
        )
    print_fn(f"warning: stopping at step {total_steps}, before the checkpoint's LR schedule ends ({saved}); it is kept")
    return saved


POSITION_FIELDS = ("epoch", "step_in_epoch", "batches_in_epoch")


def gather_positions(accelerator, position: dict, stats_at_epoch_start: dict) -> list[dict]:
    """Every rank's data position (epoch, steps and micro-batches taken from that epoch's loader, the rank's skipped
    data counts when the epoch began), gathered on every rank: ranks whose shards hold different numbers of samples
    are at different places, and a rank's loader (its workers in their fixed order) replays exactly its own."""
    values = [position[key] for key in POSITION_FIELDS] + list(stats_at_epoch_start.values())
    gathered = accelerator.gather(torch.tensor([values], dtype=torch.int64, device=accelerator.device)).tolist()
    return [
        {**dict(zip(POSITION_FIELDS, row)), "stats_at_epoch_start": dict(zip(stats_at_epoch_start, row[len(POSITION_FIELDS):]))}
        for row in gathered
    ]  # fmt: skip


def resumed_position(state: dict, checkpoint: Path, rank: int, world_size: int) -> dict:
    """This rank's data position in a checkpoint written by as many processes."""
    positions = state.get("data_positions")
    if positions is None:
        raise ConfigError(f"{checkpoint} has no per-rank data positions (written by an older flair-hf): start a new run")
    if len(positions) != world_size:
        raise ConfigError(f"{checkpoint} was written by {len(positions)} processes: resume it with {len(positions)}, not {world_size}")
    return positions[rank]


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
    config = load_config(argv)
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
