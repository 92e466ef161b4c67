"""The trainer's configuration: every option of `TrainConfig` with its type and help, read from a YAML file and
the command line, coerced to its type and validated; a mistake is one line (`ConfigError`) before anything starts."""

import argparse
import dataclasses
import difflib
import inspect
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from flair_hf import FlairConfig, FlairTextConfig, FlairVisionConfig
from flair_hf.captions import DREAMLIP_KEYS
from flair_hf.evaluation import MODES


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


def load_config(argv=None, description: str | None = None) -> TrainConfig:
    """YAML `--config` first, then `--field value` overrides; every value parsed as its field's type and validated.
    `description` heads `--help`."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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
