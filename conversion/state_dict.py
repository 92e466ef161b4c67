"""The original's open_clip state dict and FLAIR's: reading a `.pt` file safely, describing and checking its
tensors against an architecture, and mapping its names (fused q/k/v split) onto `FlairModel`'s."""

import os
import pickle
import zipfile
from pathlib import Path

import torch

from flair_hf import FlairConfig

# open_clip `model_cfg` of ViT-B-16-FLAIR, the architecture of every released checkpoint
VIT_B_16_FLAIR = {
    "embed_dim": 512,
    "init_logit_bias": -10,
    "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
}


class ConversionError(Exception):
    """A checkpoint that cannot be converted; the message names the file, key or shape."""


def flair_config_from_open_clip(model_cfg: dict) -> FlairConfig:
    """`FlairConfig` from an open_clip `model_cfg` (open_clip defaults: head width 64, MLP ratio 4, 8 text heads)."""
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    vision_width, text_width = vision["width"], text["width"]
    return FlairConfig(
        projection_dim=model_cfg["embed_dim"],
        logit_bias_init_value=float(model_cfg.get("init_logit_bias", -10)),
        text_config={
            "vocab_size": text.get("vocab_size", 49408),
            "hidden_size": text_width,
            "intermediate_size": int(text_width * text.get("mlp_ratio", 4.0)),
            "num_hidden_layers": text["layers"],
            "num_attention_heads": text.get("heads", 8),
            "max_position_embeddings": text.get("context_length", 77),
            "projection_dim": model_cfg["embed_dim"],
        },
        vision_config={
            "hidden_size": vision_width,
            "intermediate_size": int(vision_width * vision.get("mlp_ratio", 4.0)),
            "num_hidden_layers": vision["layers"],
            "num_attention_heads": vision_width // vision.get("head_width", 64),
            "image_size": vision["image_size"],
            "patch_size": vision["patch_size"],
            "projection_dim": model_cfg["embed_dim"],
        },
    )


def _block_shapes(prefix: str, width: int, intermediate: int) -> dict:
    return {
        f"{prefix}.ln_1.weight": (width,),
        f"{prefix}.ln_1.bias": (width,),
        f"{prefix}.attn.in_proj_weight": (3 * width, width),
        f"{prefix}.attn.in_proj_bias": (3 * width,),
        f"{prefix}.attn.out_proj.weight": (width, width),
        f"{prefix}.attn.out_proj.bias": (width,),
        f"{prefix}.ln_2.weight": (width,),
        f"{prefix}.ln_2.bias": (width,),
        f"{prefix}.mlp.c_fc.weight": (intermediate, width),
        f"{prefix}.mlp.c_fc.bias": (intermediate,),
        f"{prefix}.mlp.c_proj.weight": (width, intermediate),
        f"{prefix}.mlp.c_proj.bias": (width,),
    }


def original_shapes(config: FlairConfig) -> dict[str, tuple[int, ...]]:
    """Every key of the original FLAIR state dict with its shape, for `config`."""
    text, vision, dim = config.text_config, config.vision_config, config.projection_dim
    grid = vision.image_size // vision.patch_size
    shapes = {
        "positional_embedding": (text.max_position_embeddings, text.hidden_size),
        "logit_scale": (),
        "logit_bias": (),
        "visual.class_embedding": (vision.hidden_size,),
        "visual.positional_embedding": (grid * grid + 1, vision.hidden_size),
        "visual.conv1.weight": (vision.hidden_size, vision.num_channels, vision.patch_size, vision.patch_size),
        "visual.ln_pre.weight": (vision.hidden_size,),
        "visual.ln_pre.bias": (vision.hidden_size,),
    }
    for i in range(vision.num_hidden_layers):
        shapes.update(_block_shapes(f"visual.transformer.resblocks.{i}", vision.hidden_size, vision.intermediate_size))
    shapes.update({"visual.ln_post.weight": (vision.hidden_size,), "visual.ln_post.bias": (vision.hidden_size,)})
    shapes.update({"visual_proj.attn.in_proj_weight": (3 * dim, dim), "visual_proj.attn.in_proj_bias": (3 * dim,)})
    shapes.update({"visual_proj.attn.out_proj.weight": (dim, dim), "visual_proj.attn.out_proj.bias": (dim,)})
    for norm in ("ln_q", "ln_k", "ln_v"):
        shapes.update({f"visual_proj.{norm}.weight": (dim,), f"visual_proj.{norm}.bias": (dim,)})
    for i in range(text.num_hidden_layers):
        shapes.update(_block_shapes(f"transformer.resblocks.{i}", text.hidden_size, text.intermediate_size))
    shapes.update(
        {
            "token_embedding.weight": (text.vocab_size, text.hidden_size),
            "ln_final.weight": (text.hidden_size,),
            "ln_final.bias": (text.hidden_size,),
            "image_post.proj": (vision.hidden_size, dim),
            "text_post.proj": (text.hidden_size, dim),
        }
    )
    return shapes


def load_original_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an open_clip checkpoint safely (`weights_only=True`) and return its bare, prefix-free state dict."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such checkpoint file")
    with open(path, "rb") as handle:
        is_pickle = handle.read(1) == b"\x80"  # the legacy (non-zip) format starts with a pickle protocol byte
    if not (zipfile.is_zipfile(path) or is_pickle):
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint (neither torch.save's zip nor legacy format)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ConversionError(
            f"{path}: refused by torch.load(weights_only=True); the file holds objects other than tensors and plain "
            f"containers and is not loaded for safety ({str(error).splitlines()[0]})"
        ) from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as error:
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {error}") from error
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict) or not state_dict:
        raise ConversionError(f"{path}: expected a state dict or a {{'state_dict': ...}} checkpoint, got {type(checkpoint).__name__}")
    tensors = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        tensors[key.removeprefix("module.")] = value
    return tensors


def _count_blocks(tensors: dict, prefix: str) -> int:
    return len({key.split(".")[len(prefix.split("."))] for key in tensors if key.startswith(prefix + ".")})


def describe_state_dict(tensors: dict) -> dict | None:
    """The open_clip `model_cfg` dimensions that the shapes determine (widths, layers, patch and image size, context
    length, vocabulary, embedding size, MLP ratios), or None when the file does not look like a FLAIR checkpoint."""
    needed = ("visual.conv1.weight", "visual.positional_embedding", "token_embedding.weight", "positional_embedding",
              "text_post.proj", "visual.transformer.resblocks.0.mlp.c_fc.weight", "transformer.resblocks.0.mlp.c_fc.weight")  # fmt: skip
    if not all(key in tensors for key in needed):
        return None
    vision_width, _, patch, _ = tensors["visual.conv1.weight"].shape
    grid = round((tensors["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    vocab, text_width = tensors["token_embedding.weight"].shape
    return {
        "embed_dim": int(tensors["text_post.proj"].shape[1]),
        "vision_cfg": {
            "image_size": int(grid * patch), "layers": _count_blocks(tensors, "visual.transformer.resblocks"),
            "width": int(vision_width), "patch_size": int(patch),
            "mlp_ratio": tensors["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / vision_width,
        },
        "text_cfg": {
            "context_length": int(tensors["positional_embedding"].shape[0]), "vocab_size": int(vocab),
            "width": int(text_width), "layers": _count_blocks(tensors, "transformer.resblocks"),
            "mlp_ratio": tensors["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width,
        },
    }  # fmt: skip


def _dimensions(model_cfg: dict) -> dict:
    """`model_cfg` without the head counts and defaults, for comparing with `describe_state_dict`."""
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    return {
        "embed_dim": model_cfg["embed_dim"],
        "vision_cfg": {"image_size": vision["image_size"], "layers": vision["layers"], "width": vision["width"],
                       "patch_size": vision["patch_size"], "mlp_ratio": vision.get("mlp_ratio", 4.0)},
        "text_cfg": {"context_length": text.get("context_length", 77), "vocab_size": text.get("vocab_size", 49408),
                     "width": text["width"], "layers": text["layers"], "mlp_ratio": text.get("mlp_ratio", 4.0)},
    }  # fmt: skip


def _config_dimensions(config: FlairConfig) -> dict:
    """A `FlairConfig`'s dimensions in `describe_state_dict`'s form."""
    vision, text = config.vision_config, config.text_config
    return {
        "embed_dim": config.projection_dim,
        "vision_cfg": {"image_size": vision.image_size, "layers": vision.num_hidden_layers, "width": vision.hidden_size,
                       "patch_size": vision.patch_size, "mlp_ratio": vision.intermediate_size / vision.hidden_size},
        "text_cfg": {"context_length": text.max_position_embeddings, "vocab_size": text.vocab_size, "width": text.hidden_size,
                     "layers": text.num_hidden_layers, "mlp_ratio": text.intermediate_size / text.hidden_size},
    }  # fmt: skip


def summarize_dimensions(described: dict) -> str:
    vision, text = described["vision_cfg"], described["text_cfg"]
    return (
        f"vision width {vision['width']}, {vision['layers']} layers, patch {vision['patch_size']}, image {vision['image_size']}; "
        f"text width {text['width']}, {text['layers']} layers, context {text['context_length']}, vocab {text['vocab_size']}; "
        f"embed dim {described['embed_dim']}"
    )


HEADS_CANNOT_BE_READ = (
    "head counts cannot be read from the weights, and --verify cannot catch a wrong one (it recomputes the logits with "
    "the same counts)"
)


def infer_open_clip_config(tensors: dict, text_heads: int | None = None, vision_heads: int | None = None) -> dict:
    """The open_clip `model_cfg` of a checkpoint: ViT-B-16-FLAIR when the shapes are its, else the dimensions read
    from the shapes plus the head counts: given, or open_clip's rule (width / 64) when that is a whole number."""
    described = describe_state_dict(tensors)
    if described is None:
        return VIT_B_16_FLAIR  # not a FLAIR layout: check_state_dict names what is wrong
    if described == _dimensions(VIT_B_16_FLAIR) and text_heads is None and vision_heads is None:
        return VIT_B_16_FLAIR
    vision, text = dict(described["vision_cfg"]), dict(described["text_cfg"])
    assumed = []
    for tower, cfg, given in (("text", text, text_heads), ("vision", vision, vision_heads)):
        if given is None and cfg["width"] % 64:
            raise ConversionError(
                f"this checkpoint is not ViT-B-16-FLAIR ({summarize_dimensions(described)}); {HEADS_CANNOT_BE_READ}, and "
                f"the {tower} width {cfg['width']} is not a multiple of open_clip's head width 64: pass --text-heads and "
                "--vision-heads, or --open-clip-config with the model's open_clip config"
            )
        if given is None:
            assumed.append(f"{cfg['width'] // 64} {tower} heads")
    text_heads = text_heads or text["width"] // 64
    vision_heads = vision_heads or vision["width"] // 64
    if assumed:
        print(f"assumed {' and '.join(assumed)} (open_clip's width / 64): {HEADS_CANNOT_BE_READ}; pass --text-heads / "
              "--vision-heads if the model was trained with others")  # fmt: skip
    vision["head_width"], text["heads"] = vision["width"] // vision_heads, text_heads
    return {"embed_dim": described["embed_dim"], "vision_cfg": vision, "text_cfg": text}


def check_state_dict(tensors: dict, config: FlairConfig, source: str, verbose: bool = False) -> None:
    """Raise `ConversionError` naming every missing, unexpected or mis-shaped key."""
    expected = original_shapes(config)
    missing = [key for key in expected if key not in tensors]
    unexpected = [key for key in tensors if key not in expected]
    misshaped = [
        f"{key}: {tuple(tensors[key].shape)}, expected {expected[key]}"
        for key in expected
        if key in tensors and tuple(tensors[key].shape) != expected[key]
    ]
    def listed(items: list[str], separator: str) -> str:
        shown = items if verbose else items[:3]
        more = "" if len(shown) == len(items) else f"{separator}... ({len(items) - len(shown)} more; --verbose lists all)"
        return separator.join(shown) + more

    problems = []
    if missing:
        hint = " (a plain CLIP checkpoint has no FLAIR pooling head)" if "visual_proj.attn.in_proj_weight" in missing else ""
        problems.append(f"{len(missing)} missing keys{hint}: {listed(missing, ', ')}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {listed(unexpected, ', ')}")
    if misshaped:
        problems.append(f"{len(misshaped)} wrong shapes: {listed(misshaped, '; ')}")
    if problems:
        described = describe_state_dict(tensors)
        looks = f" The file looks like: {summarize_dimensions(described)}." if described else ""
        expected_dims = summarize_dimensions(_config_dimensions(config))
        raise ConversionError(
            f"{source}: not a FLAIR checkpoint of the expected architecture ({expected_dims}).{looks} "
            + " | ".join(problems)
            + ". For another size, pass --open-clip-config (or let the converter read the sizes: omit it)."
        )
    non_float = [key for key, value in tensors.items() if not value.is_floating_point()]
    if non_float:
        raise ConversionError(f"{source}: non-floating-point tensors: {', '.join(non_float)}")


def _split_in_proj(tensors: dict, source: str, target: str) -> dict:
    q, k, v = tensors[f"{source}.in_proj_weight"].chunk(3)
    qb, kb, vb = tensors[f"{source}.in_proj_bias"].chunk(3)
    return {
        f"{target}.q_proj.weight": q, f"{target}.k_proj.weight": k, f"{target}.v_proj.weight": v,
        f"{target}.q_proj.bias": qb, f"{target}.k_proj.bias": kb, f"{target}.v_proj.bias": vb,
        f"{target}.out_proj.weight": tensors[f"{source}.out_proj.weight"],
        f"{target}.out_proj.bias": tensors[f"{source}.out_proj.bias"],
    }  # fmt: skip


def _convert_blocks(tensors: dict, source: str, target: str, num_layers: int) -> dict:
    converted = {}
    for i in range(num_layers):
        src, dst = f"{source}.resblocks.{i}", f"{target}.layers.{i}"
        converted.update(_split_in_proj(tensors, f"{src}.attn", f"{dst}.self_attn"))
        for original, name in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            converted[f"{dst}.{name}.weight"] = tensors[f"{src}.{original}.weight"]
            converted[f"{dst}.{name}.bias"] = tensors[f"{src}.{original}.bias"]
    return converted


def _copy_pairs(tensors: dict, pairs: dict) -> dict:
    return {target: tensors[source] for source, target in pairs.items()}


def convert_state_dict(tensors: dict, config: FlairConfig) -> dict[str, torch.Tensor]:
    """Map a checked original state dict onto `FlairModel` parameter names (float32, contiguous)."""
    converted = _copy_pairs(
        tensors,
        {
            "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
            "positional_embedding": "text_model.embeddings.position_embedding.weight",
            "ln_final.weight": "text_model.final_layer_norm.weight",
            "ln_final.bias": "text_model.final_layer_norm.bias",
            "visual.class_embedding": "vision_model.embeddings.class_embedding",
            "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
            "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
            "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
            "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
            "visual.ln_post.weight": "vision_model.post_layernorm.weight",
            "visual.ln_post.bias": "vision_model.post_layernorm.bias",
            "visual_proj.ln_q.weight": "text_conditioned_pooling.query_layer_norm.weight",
            "visual_proj.ln_q.bias": "text_conditioned_pooling.query_layer_norm.bias",
            "visual_proj.ln_k.weight": "text_conditioned_pooling.key_layer_norm.weight",
            "visual_proj.ln_k.bias": "text_conditioned_pooling.key_layer_norm.bias",
            "visual_proj.ln_v.weight": "text_conditioned_pooling.value_layer_norm.weight",
            "visual_proj.ln_v.bias": "text_conditioned_pooling.value_layer_norm.bias",
            "logit_scale": "logit_scale",
            "logit_bias": "logit_bias",
        },
    )
    converted["text_projection.weight"] = tensors["text_post.proj"].t()
    converted["visual_projection.weight"] = tensors["image_post.proj"].t()
    converted.update(_split_in_proj(tensors, "visual_proj.attn", "text_conditioned_pooling"))
    converted.update(_convert_blocks(tensors, "transformer", "text_model.encoder", config.text_config.num_hidden_layers))
    converted.update(
        _convert_blocks(tensors, "visual.transformer", "vision_model.encoder", config.vision_config.num_hidden_layers)
    )
    return {key: value.float().contiguous() for key, value in converted.items()}
