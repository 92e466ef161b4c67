"""FLAIR model configuration. Field names follow `CLIPConfig`, so a FLAIR `config.json` also loads as a CLIP config."""

import math

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


def _check_multiple(name: str, value: int, divisor_name: str, divisor: int) -> None:
    if value % divisor != 0:
        raise ValueError(f"{name} ({value}) is not a multiple of {divisor_name} ({divisor})")


@strict
class FlairTextConfig(PreTrainedConfig):
    r"""
    Text tower of FLAIR: a causal CLIP text transformer (exact GELU, pre-LayerNorm), pooled at the end-of-text token.
    Defaults are those of the released ViT-B-16-FLAIR models.
    """

    model_type = "flair_text_model"
    base_config_key = "text_config"

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int | None = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "gelu"
    layer_norm_eps: float | None = 1e-5
    attention_dropout: int | float | None = 0.0
    initializer_range: float = 0.02
    initializer_factor: float | None = 1.0
    pad_token_id: int | None = 0
    bos_token_id: int | None = 49406
    eos_token_id: int | list[int] | None = 49407

    def validate_architecture(self):
        _check_multiple("text hidden_size", self.hidden_size, "num_attention_heads", self.num_attention_heads)


@strict
class FlairVisionConfig(PreTrainedConfig):
    r"""
    Vision tower of FLAIR: a CLIP ViT (exact GELU) whose post-LayerNorm is applied to every token, so that the patch
    tokens can be projected and pooled by the text-conditioned head. Defaults are those of ViT-B/16.
    """

    model_type = "flair_vision_model"
    base_config_key = "vision_config"

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: int | float | None = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0

    def validate_architecture(self):
        _check_multiple("vision hidden_size", self.hidden_size, "num_attention_heads", self.num_attention_heads)
        _check_multiple("image_size", self.image_size, "patch_size", self.patch_size)


@strict
class FlairConfig(PreTrainedConfig):
    r"""
    Configuration of [`FlairModel`]: a CLIP text and vision tower, their projections to `projection_dim`, and FLAIR's
    text-conditioned attention-pooling head.

    Args:
        text_config (`dict` or `FlairTextConfig`, *optional*): text tower configuration.
        vision_config (`dict` or `FlairVisionConfig`, *optional*): vision tower configuration.
        projection_dim (`int`, defaults to 512): dimension of the joint embedding space.
        pooling_num_attention_heads (`int`, defaults to 8): heads of the text-conditioned pooling head.
        logit_scale_init_value (`float`, defaults to ln(1/0.07)): initial value of `logit_scale` (log temperature).
        logit_bias_init_value (`float`, defaults to -10): initial value of the sigmoid loss bias `logit_bias`.
    """

    model_type = "flair"
    _auto_class = "AutoConfig"  # save_pretrained writes the source files and auto_map (remote code)
    sub_configs_defaults = {"text_config": FlairTextConfig, "vision_config": FlairVisionConfig}

    text_config: dict | FlairTextConfig | None = None
    vision_config: dict | FlairVisionConfig | None = None
    projection_dim: int = 512
    pooling_num_attention_heads: int = 8
    logit_scale_init_value: float = math.log(1 / 0.07)
    logit_bias_init_value: float = -10.0
    initializer_factor: float = 1.0

    def validate_architecture(self):
        _check_multiple("projection_dim", self.projection_dim, "pooling_num_attention_heads", self.pooling_num_attention_heads)


__all__ = ["FlairConfig", "FlairTextConfig", "FlairVisionConfig"]
