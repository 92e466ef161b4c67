"""FLAIR (Fine-grained Language-informed Image Representations) for Hugging Face transformers.

`import flair_hf` is light, like `import transformers`: it imports neither torch nor transformers, so the ONNX Runtime
side (`flair_hf.onnx`, `flair_hf.preprocessing`) runs without them even where they are installed. The first FLAIR class
taken from the package (`from flair_hf import FlairModel`), or `flair_hf.register_auto_classes()`, imports the PyTorch
side and registers the classes with the transformers Auto classes. The classes themselves are marked (`_auto_class`)
so that `save_pretrained` writes an `auto_map` and the source files for loading with `trust_remote_code=True`,
however they were imported.
"""

import importlib
import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the lazy names, for type checkers and IDEs
    from .configuration_flair import FlairConfig, FlairTextConfig, FlairVisionConfig  # noqa: F401
    from .modeling_flair import FlairModel, FlairModelForGlobalScoring, FlairOutput, FlairPreTrainedModel  # noqa: F401
    from .preprocessing import clean_caption  # noqa: F401
    from .processing_flair import FlairImageProcessor, FlairProcessor, FlairTokenizer  # noqa: F401
    from .scorer import FlairScorer  # noqa: F401

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
    `AutoTokenizer`, `AutoImageProcessor` and `AutoProcessor` (idempotent)."""
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
    """The PyTorch names are listed where torch and transformers are installed (where they can be taken)."""
    installed = all(importlib.util.find_spec(name) is not None for name in ("torch", "transformers"))
    return sorted({*globals(), *(_PYTORCH_NAMES if installed else ())})
