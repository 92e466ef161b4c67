"""A training run's files: finding the checkpoint to resume, saving one whole, the resumed state (LR schedule,
each rank's data position), the step logs kept up to it, and the exported `from_pretrained` model."""

import json
import shutil
from pathlib import Path

import torch

from flair_hf import FlairModel
from flair_hf_training.config import ConfigError, TrainConfig

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
