"""The evaluation CLIs' `--model`: a converted or trained FLAIR directory (checked for every file it needs, so a
missing one is one line naming it) or a Hub id."""

from pathlib import Path

import torch

from flair_hf import FlairModel, FlairProcessor

# what conversion/convert_flair_to_hf.py and training/train.py write besides the weights
NEEDED_FILES = ("config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json")


def load_model_and_processor(model: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """`(FlairModel in eval mode on device, FlairProcessor)`; a one-line `SystemExit` for an incomplete directory or a
    Hub id that cannot be fetched."""
    path = Path(model)
    if path.is_dir():
        missing = [name for name in NEEDED_FILES if not (path / name).is_file()]
        missing += [] if any(path.glob("*.safetensors")) else ["model.safetensors"]
        if missing:
            raise SystemExit(
                f"error: --model {model} lacks {', '.join(missing)}: give a directory written by "
                "conversion/convert_flair_to_hf.py or training/train.py (a model saved alone needs "
                "FlairProcessor.save_pretrained there too)"
            )
    try:
        loaded = FlairModel.from_pretrained(model, dtype=dtype).to(device).eval()
        processor = FlairProcessor.from_pretrained(model)
    except OSError as error:
        raise SystemExit(f"error: --model {model}: cannot load it ({str(error).strip().splitlines()[0]}); offline, give a local directory") from None
    return loaded, processor
