"""FLAIR (Fine-grained Language-informed Image Representations) for Hugging Face transformers.

Importing `flair_hf` registers the FLAIR classes with the transformers Auto classes, and marks them so that
`save_pretrained` writes an `auto_map` and the source files for loading with `trust_remote_code=True`.
Without torch or transformers installed (an ONNX Runtime deployment), only the torch-free modules are there:
`flair_hf.onnx` and `flair_hf.preprocessing`.
"""

import importlib.util

__version__ = "0.1.0"
__all__ = []

if importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None:
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModel,
        AutoModelForZeroShotImageClassification,
        AutoProcessor,
        AutoTokenizer,
    )

    from .configuration_flair import FlairConfig, FlairTextConfig, FlairVisionConfig
    from .modeling_flair import FlairModel, FlairModelForGlobalScoring, FlairOutput, FlairPreTrainedModel
    from .processing_flair import FlairImageProcessor, FlairProcessor, FlairTokenizer, clean_caption
    from .scorer import FlairScorer

    AutoConfig.register(FlairConfig.model_type, FlairConfig, exist_ok=True)
    AutoModel.register(FlairConfig, FlairModel, exist_ok=True)
    AutoModelForZeroShotImageClassification.register(FlairConfig, FlairModel, exist_ok=True)  # pipelines
    AutoTokenizer.register(FlairConfig, FlairTokenizer, exist_ok=True)
    AutoImageProcessor.register(FlairConfig, FlairImageProcessor, exist_ok=True)
    AutoProcessor.register(FlairConfig, FlairProcessor, exist_ok=True)

    FlairConfig.register_for_auto_class()
    FlairModel.register_for_auto_class("AutoModel")
    FlairTokenizer.register_for_auto_class("AutoTokenizer")
    FlairImageProcessor.register_for_auto_class("AutoImageProcessor")
    FlairProcessor.register_for_auto_class("AutoProcessor")

    __all__ += [
        "FlairConfig",
        "FlairTextConfig",
        "FlairVisionConfig",
        "FlairModel",
        "FlairModelForGlobalScoring",
        "FlairOutput",
        "FlairScorer",
        "FlairPreTrainedModel",
        "FlairImageProcessor",
        "FlairProcessor",
        "FlairTokenizer",
        "clean_caption",
    ]
