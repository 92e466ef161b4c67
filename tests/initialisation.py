"""The original FLAIR's initial distribution of every parameter family (open_clip's init and torch's defaults),
written out from the original code, for the tests of `FlairModel`'s initialisation."""

import math
import re

import torch


def family_spec(config):
    """Every parameter family of FlairModel with the original's initial distribution (open_clip + torch defaults):
    (name pattern, kind, scale): normal std, uniform bound, or a constant."""
    text, vision, dim = config.text_config.hidden_size, config.vision_config.hidden_size, config.projection_dim
    text_out = text**-0.5 * (2 * config.text_config.num_hidden_layers) ** -0.5
    return [
        (r"logit_scale", "constant", math.log(1 / 0.07)),
        (r"logit_bias", "constant", -10.0),
        (r".*layer_?norm.*\.weight|.*layrnorm\.weight", "constant", 1.0),
        (r".*layer_?norm.*\.bias|.*layrnorm\.bias|.*self_attn\.\w+_proj\.bias|.*pooling\.\w+_proj\.bias", "constant", 0.0),
        (r"text_model\.embeddings\.token_embedding\.weight", "normal", 0.02),
        (r"text_model\.embeddings\.position_embedding\.weight", "normal", 0.01),
        (r"text_model\..*self_attn\.[qkv]_proj\.weight", "normal", text**-0.5),
        (r"text_model\..*self_attn\.out_proj\.weight", "normal", text_out),
        (r"text_model\..*mlp\.fc1\.weight", "normal", (2 * text) ** -0.5),
        (r"text_model\..*mlp\.fc2\.weight", "normal", text_out),
        (r"text_model\..*mlp\.fc1\.bias", "uniform", text**-0.5),
        (r"text_model\..*mlp\.fc2\.bias", "uniform", config.text_config.intermediate_size**-0.5),
        (r"text_projection\.weight", "normal", text**-0.5),
        (r"vision_model\.embeddings\.(class_embedding|position_embedding\.weight)", "normal", vision**-0.5),
        (r"vision_model\.embeddings\.patch_embedding\.weight", "uniform", (3 * config.vision_config.patch_size**2) ** -0.5),
        (r"vision_model\..*self_attn\.[qkv]_proj\.weight", "uniform", math.sqrt(6 / (4 * vision))),
        (r"vision_model\..*(self_attn\.out_proj\.weight|mlp\.fc1\.(weight|bias))", "uniform", vision**-0.5),
        (r"vision_model\..*mlp\.fc2\.(weight|bias)", "uniform", config.vision_config.intermediate_size**-0.5),
        (r"visual_projection\.weight", "normal", vision**-0.5),
        (r"text_conditioned_pooling\.[qkv]_proj\.weight", "uniform", math.sqrt(6 / (4 * dim))),
        (r"text_conditioned_pooling\.out_proj\.weight", "uniform", dim**-0.5),
    ]



def assert_original_initialisation(model) -> None:
    """Each parameter's distribution (kind, scale) equals open_clip's as the original builds the model (the vision
    tower keeps torch's defaults, as open_clip's vision init_parameters is a no-op), within 5 standard errors."""
    spec = family_spec(model.config)
    for name, parameter in model.named_parameters():
        matches = [(kind, scale) for pattern, kind, scale in spec if re.fullmatch(pattern, name)]
        assert len(matches) == 1, (name, matches)
        (kind, scale), values = matches[0], parameter.detach().double().flatten()
        if kind == "constant":
            assert torch.all((values - scale).abs() <= 1e-6 * abs(scale)), name  # float32 of the constant
            continue
        tolerance = 5 / math.sqrt(2 * values.numel())  # 5 standard errors of a sample standard deviation
        std, peak = values.std().item(), values.abs().max().item()
        # the peaks tell normal from uniform where a tensor is large enough (a miss has odds under 1e-4)
        if kind == "normal":
            assert abs(std / scale - 1) < tolerance and (peak > 2.5 * scale or values.numel() < 1000), (name, std, peak, scale)
        else:  # uniform on [-scale, scale]: std scale / sqrt(3), bounded
            assert abs(std / (scale / math.sqrt(3)) - 1) < tolerance and peak <= scale, (name, std, peak, scale)
            assert peak > 0.95 * scale or values.numel() < 200, (name, peak, scale)
