"""The evaluation CLIs' `--model`: a converted or trained FLAIR directory (checked for every file it needs, so a
missing one is one line naming it), an ONNX export (`conversion/export_onnx.py`, detected by its `flair_onnx.json`)
or a Hub id."""

from pathlib import Path
from types import SimpleNamespace

import torch

from flair_hf import FlairModel, FlairProcessor
from flair_hf.onnx import FlairOnnxModel, ids_up_to_end_of_text, is_onnx_export

# what conversion/convert_flair_to_hf.py and training/train.py write besides the weights
NEEDED_FILES = ("config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json")


def onnx_providers(device: str) -> list[str]:
    """ONNX Runtime's execution providers for a torch device name."""
    import onnxruntime

    if not device.startswith("cuda"):
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise SystemExit("error: --device cuda with an ONNX export needs onnxruntime-gpu (this ONNX Runtime has no CUDA provider); or pass --device cpu")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


class OnnxEvaluationModel:
    """An ONNX export behind the `FlairModel` methods that the evaluation functions call (tensors in and out, on the
    CPU); its `text_conditioned_pooling` is the export's pair scorer, which `flair_hf.retrieval.flair_scores` runs."""

    training = False
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, exported: FlairOnnxModel):
        self.exported = self.text_conditioned_pooling = exported
        manifest = exported.manifest
        vision = SimpleNamespace(image_size=manifest["image_size"], patch_size=manifest["patch_size"])
        self.config = SimpleNamespace(projection_dim=manifest["projection_dim"], vision_config=vision, _commit_hash=None)

    def eval(self) -> "OnnxEvaluationModel":
        return self

    def train(self, mode: bool = True) -> "OnnxEvaluationModel":
        if mode:
            raise ValueError("an ONNX export cannot be trained")
        return self

    def get_text_embeds(self, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        return torch.from_numpy(self.exported.embed_token_ids(ids_up_to_end_of_text(input_ids.cpu().numpy())))

    def get_image_token_features(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        if interpolate_pos_encoding:
            size = self.config.vision_config.image_size
            raise ValueError(f"an ONNX export takes {size}x{size} images only (segmentation: --crop {size}, the default)")
        return self.get_image_and_token_features(pixel_values)[1]

    def get_image_and_token_features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, tokens = self.exported.pixel_features(pixel_values.float().cpu().numpy())
        return torch.from_numpy(embeds), torch.from_numpy(tokens)


def load_model_and_processor(model: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """`(FlairModel in eval mode on device, FlairProcessor)`, or for an ONNX export an
    `OnnxEvaluationModel` (ONNX Runtime's CUDA provider for a CUDA `device`, else the CPU's); a one-line `SystemExit` for an incomplete directory or a Hub
    id that cannot be fetched."""
    path = Path(model)
    if is_onnx_export(path):
        if dtype != torch.float32:
            raise SystemExit(f"error: --model {model} is an ONNX export: it runs in the precision it was exported in; drop --dtype")
        return OnnxEvaluationModel(FlairOnnxModel.from_pretrained(path, onnx_providers(device))), FlairProcessor.from_pretrained(path)
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
