"""FLAIR (Fine-grained Language-informed Image Representations) for Hugging Face transformers.

`import flair_hf` is light, like `import transformers`: it imports neither torch nor transformers, so the ONNX Runtime
side (`flair_hf.onnx`, `flair_hf.preprocessing`) runs without them even where they are installed. The first FLAIR class
taken from the package (`from flair_hf import FlairModel`), or `flair_hf.register_auto_classes()`, imports the PyTorch
side and registers the classes with the transformers Auto classes, marked so that `save_pretrained` writes an
`auto_map` and the source files for loading with `trust_remote_code=True`.
"""

import importlib

__version__ = "0.1.0"

_PYTORCH_NAMES = {
    "FlairConfig": "configuration_flair",
    "FlairTextConfig": "configuration_flair",
    "FlairVisionConfig": "configuration_flair",
    "FlairModel": "modeling_flair",
    "FlairModelForGlobalScoring": "modeling_flair",
    "FlairOutput": "modeling_flair",
    "FlairPreTrainedModel": "modeling_flair",
    "FlairImageProcessor": "processing_flair",
    "FlairProcessor": "processing_flair",
    "FlairTokenizer": "processing_flair",
    "FlairScorer": "scorer",
    "clean_caption": "preprocessing",  # torch-free: taken without registering
}
__all__ = ["register_auto_classes", *_PYTORCH_NAMES]
_registered = False


def register_auto_classes() -> None:
    """Register FLAIR with `AutoConfig`, `AutoModel`, `AutoModelForZeroShotImageClassification` (pipelines),
    `AutoTokenizer`, `AutoImageProcessor` and `AutoProcessor`, and mark the classes for remote code (idempotent)."""
    global _registered
    if _registered:
        return
    try:
        from transformers import (
            AutoConfig,
            AutoImageProcessor,
            AutoModel,
            AutoModelForZeroShotImageClassification,
            AutoProcessor,
            AutoTokenizer,
        )

        from .configuration_flair import FlairConfig
        from .modeling_flair import FlairModel
        from .processing_flair import FlairImageProcessor, FlairProcessor, FlairTokenizer
    except ImportError as error:
        raise ImportError(
            f"flair_hf's PyTorch classes need torch and transformers ({error}); install them with "
            "`pip install flair-hf`, or use flair_hf.onnx for an ONNX Runtime deployment"
        ) from error
    AutoConfig.register(FlairConfig.model_type, FlairConfig, exist_ok=True)
    for auto_class, flair_class in (
        (AutoModel, FlairModel),
        (AutoModelForZeroShotImageClassification, FlairModel),
        (AutoTokenizer, FlairTokenizer),
        (AutoImageProcessor, FlairImageProcessor),
        (AutoProcessor, FlairProcessor),
    ):
        auto_class.register(FlairConfig, flair_class, exist_ok=True)
    FlairConfig.register_for_auto_class()
    FlairModel.register_for_auto_class("AutoModel")
    FlairTokenizer.register_for_auto_class("AutoTokenizer")
    FlairImageProcessor.register_for_auto_class("AutoImageProcessor")
    FlairProcessor.register_for_auto_class("AutoProcessor")
    _registered = True


def __getattr__(name: str):
    """The PyTorch side, imported (and registered) on first use (PEP 562)."""
    if name not in _PYTORCH_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _PYTORCH_NAMES[name] != "preprocessing":
        register_auto_classes()
    value = getattr(importlib.import_module(f".{_PYTORCH_NAMES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PYTORCH_NAMES})
