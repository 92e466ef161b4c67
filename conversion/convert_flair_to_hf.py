"""Convert an original FLAIR (open_clip) checkpoint into a transformers directory loadable with `from_pretrained`.

    python conversion/convert_flair_to_hf.py SOURCE OUTPUT_DIR [--verify] [--push-to-hub REPO]

SOURCE is a local `.pt` file (bare state dict, `{"state_dict": ...}` training checkpoint, `module.` prefixes, fp16
or fp32) or a released checkpoint name (`flair-cc3m-recap`, `flair-cc12m-recap`, `flair-yfcc15m-recap`,
`flair-merged30m`), downloaded from the `xiaorui638/flair` Hub repository. The output holds `model.safetensors`,
`config.json`, the processor and tokenizer files and the remote-code files. It is written to a temporary directory
and moved into place only when everything (including `--verify`) succeeded.
"""

import argparse
import contextlib
import hashlib
import json
import os
import pickle
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from flair_hf import FlairConfig, FlairImageProcessor, FlairModel, FlairProcessor, FlairTokenizer
from flair_hf_conversion.original_forward import original_forward


HUB_REPO = "xiaorui638/flair"
RELEASED_CHECKPOINTS = ("flair-cc3m-recap", "flair-cc12m-recap", "flair-yfcc15m-recap", "flair-merged30m")
# open_clip `model_cfg` of ViT-B-16-FLAIR, the architecture of every released checkpoint
VIT_B_16_FLAIR = {
    "embed_dim": 512,
    "init_logit_bias": -10,
    "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
}
VERIFY_TOLERANCE = 1e-4
VERIFY_CAPTIONS = (
    "a photo of a dog",
    "In the image, a small white puppy with black ears and eyes is the main subject",
    "A red ladybug is surrounded by green glass beads",
    "",
)


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


def build_processor() -> FlairProcessor:
    return FlairProcessor(image_processor=FlairImageProcessor(), tokenizer=FlairTokenizer.from_bpe_vocab())


def verify(model: FlairModel, tensors: dict, processor: FlairProcessor, tolerance: float = VERIFY_TOLERANCE) -> dict:
    """Compare the converted model with the independent original forward on built-in inputs; raise on a mismatch."""
    generator = torch.Generator().manual_seed(0)
    size = model.config.vision_config.image_size
    pixel_values = torch.randn(2, 3, size, size, generator=generator)
    input_ids = processor(text=list(VERIFY_CAPTIONS))["input_ids"]
    expected = original_forward(tensors, pixel_values, input_ids, model.config)
    with torch.no_grad():
        output = model(input_ids=input_ids, pixel_values=pixel_values)
    differences = {
        "logits_per_image": (output.logits_per_image - expected["logits_per_image"]).abs().max().item(),
        "logits_per_image_as_clip": (output.logits_per_image_as_clip - expected["logits_as_clip_per_image"]).abs().max().item(),
    }  # fmt: skip
    failed = {name: value for name, value in differences.items() if not value <= tolerance}
    if failed:
        raise ConversionError(f"--verify failed: converted model differs from the original forward by {failed} (> {tolerance})")
    return differences


def resolve_source(source: str, cache_dir: str | None = None) -> Path:
    """A local path as is; a released checkpoint name is downloaded from the Hub (clear error when offline)."""
    if source in RELEASED_CHECKPOINTS:
        from huggingface_hub import hf_hub_download

        print(f"downloading {source}.pt from the Hub repository {HUB_REPO} (offline? set HF_HUB_OFFLINE=1 to fail at once)",
              file=sys.stderr)  # fmt: skip
        try:
            return Path(hf_hub_download(HUB_REPO, f"{source}.pt", cache_dir=cache_dir))
        except Exception as error:  # noqa: BLE001 - any Hub failure gets the same actionable message
            raise ConversionError(
                f"could not download {source}.pt from the Hub repository {HUB_REPO} ({type(error).__name__}: {error}). "
                f"Offline? Download the file elsewhere and pass its local path instead of the name."
            ) from error
    path = Path(source)
    if not path.exists():
        raise ConversionError(f"{source}: no such file, and not a released checkpoint name ({', '.join(RELEASED_CHECKPOINTS)})")
    return path


TRAINING_DATA = {
    "flair-cc3m-recap": ["CC3M-recap (DreamLIP)"],
    "flair-cc12m-recap": ["CC12M-recap (DreamLIP)"],
    "flair-yfcc15m-recap": ["YFCC15M-recap (DreamLIP)"],
    "flair-merged30m": ["CC3M-recap (DreamLIP)", "CC12M-recap (DreamLIP)", "YFCC15M-recap (DreamLIP)"],
}
RETRIEVAL_SETS = {"coco": ("coco", "COCO val2017 (5k images)"), "flickr30k": ("flickr30k", "Flickr30k (1k images)")}


def _retrieval_results(repo_id: str, release: str | None, measured: list[dict]) -> list:
    """`EvalResult`s for the model-index: the published R@1 of a release, and R@1 measured by
    `benchmarks/evaluate_retrieval.py` (its JSON), each marked by its source."""
    from huggingface_hub import EvalResult

    from flair_hf.evaluation import PAPER_R1

    rows = []
    published = PAPER_R1.get(release, {}) if release else {}
    for benchmark, (t2i, i2t) in published.items():
        rows.append((benchmark, t2i, i2t, "FLAIR paper (published)", "https://arxiv.org/abs/2412.03561", "published"))
    for result in measured:
        if result["benchmark"] in RETRIEVAL_SETS:
            metrics = result["metrics"]
            name = f"measured with flair-hf ({result.get('mode', 'flair')} mode, {result['num_images']} images)"
            url = f"https://huggingface.co/{repo_id}"  # measured on this repository's weights
            rows.append((result["benchmark"], metrics["text_to_image_R@1"], metrics["image_to_text_R@1"], name, url, "measured"))
    results = []
    for benchmark, t2i, i2t, source_name, source_url, origin in rows:  # origin keeps them apart in the model-index
        dataset_type, dataset_name = RETRIEVAL_SETS[benchmark]
        for direction, value in (("text-to-image", t2i), ("image-to-text", i2t)):
            results.append(EvalResult(
                task_type="zero-shot-image-text-retrieval", task_name="Zero-shot image-text retrieval",
                dataset_type=dataset_type, dataset_name=dataset_name, dataset_config=origin, metric_type="recall@1",
                metric_name=f"{direction} R@1", metric_value=value, source_name=source_name, source_url=source_url,
            ))  # fmt: skip
    return results


def model_card(repo_id: str, source: str, differences: dict | None, measured: list[dict] | None = None) -> str:
    """The model card: YAML metadata the Hub reads (library, pipeline, license, tags, training data, base model,
    model-index with published and measured retrieval R@1), usage, parity figures, citation."""
    from huggingface_hub import ModelCardData

    release = source if source in RELEASED_CHECKPOINTS else None
    parity = (
        "\n".join(f"- `{name}`: max abs difference {value:.2e}" for name, value in differences.items())
        if differences
        else "- not verified at conversion time (run the converter with `--verify`)"
    )
    metadata = ModelCardData(
        library_name="transformers", pipeline_tag="zero-shot-image-classification", license="mit",
        tags=["flair", "clip", "vision-language", "image-text-retrieval", "zero-shot-image-classification"],
        datasets=TRAINING_DATA.get(release), base_model=HUB_REPO if release else None, model_name=repo_id,
        eval_results=_retrieval_results(repo_id, release, measured or []) or None,
    )  # fmt: skip
    return f"""---
{metadata.to_yaml()}
---

# {repo_id}

FLAIR (Fine-grained Language-informed Image Representations, CVPR 2025) converted from `{source}` with
[flair-hf](https://github.com/ExplainableML/flair). FLAIR is a CLIP ViT-B/16 with a text-conditioned attention-pooling
head that gives one image embedding per caption.

## Usage

```python
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)
inputs = processor(text=["a photo of a dog", "a photo of a cat"], images=Image.open("dog.jpg"))
with torch.no_grad():
    out = model(**inputs)
print(out.logits_per_image)          # FLAIR text-conditioned logits
print(out.logits_per_image_as_clip)  # global CLIP-style logits
```

## Parity with the original implementation

Logits of this model against an independent forward from the original tensors (float32, CPU):
{parity}

## Citation

```bibtex
@inproceedings{{xiao2025flair,
  title={{FLAIR: VLM with Fine-grained Language-informed Image Representations}},
  author={{Xiao, Rui and Kim, Sanghwan and Georgescu, Mariana-Iuliana and Akata, Zeynep and Alaniz, Stephan}},
  booktitle={{CVPR}},
  year={{2025}}
}}
```
"""


def shareable_source(source: str) -> str:
    """What generated files say the model was converted from: a released name as is, a local file by name only."""
    return source if source in RELEASED_CHECKPOINTS else Path(source).name


def push_to_hub(directory: Path, repo_id: str, source: str, differences: dict | None, measured: list[dict] | None = None) -> None:
    """Upload `directory` (with a generated model card) to `repo_id`; a clear error when the Hub is unreachable."""
    from huggingface_hub import HfApi

    source = shareable_source(source)
    (directory / "README.md").write_text(model_card(repo_id, source, differences, measured))
    try:
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(directory), commit_message=f"Convert {source} with flair-hf")
    except Exception as error:  # noqa: BLE001
        raise ConversionError(
            f"push to the Hub repository {repo_id} failed ({type(error).__name__}: {error}); the converted model is "
            f"kept in {directory}. Check your network and `hf auth login`, then upload that folder."
        ) from error


def file_digest(path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def local_revision(directory, patterns=("*.safetensors",)) -> str | None:
    """`local-` and a hash of the names and contents of a local model's weights files (`patterns`); None without any."""
    files = sorted(p for pattern in patterns for p in Path(directory).glob(pattern)) if Path(directory).is_dir() else []
    if not files:
        return None
    return "local-" + hashlib.sha256("".join(f"{path.name}:{file_digest(path)};" for path in files).encode()).hexdigest()[:16]


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """`output_dir` as a Path, if it is new or an empty directory."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConversionError(f"{output_dir}: exists and is a file; the output must be a new or empty directory")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        raise ConversionError(f"{output_dir}: output directory exists and is not empty")
    return output_dir


@contextlib.contextmanager
def staged_output_dir(output_dir: Path):
    """A temporary directory beside `output_dir` (permissions as a new directory's) that becomes `output_dir` when the
    block succeeds and is removed when it fails: never a half-written output."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)
        yield staging
        if output_dir.exists():
            output_dir.rmdir()
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def convert(
    source: str, output_dir: str | os.PathLike, model_cfg: dict | None = None, run_verify: bool = False,
    text_heads: int | None = None, vision_heads: int | None = None, verbose: bool = False,
) -> dict:  # fmt: skip
    """Convert `source` into `output_dir` atomically; return a report (timings, parity differences).

    Without `model_cfg` the architecture is read from the checkpoint's shapes (ViT-B-16-FLAIR, or another size given
    the head counts, which shapes cannot tell)."""
    output_dir = check_output_dir(output_dir)
    start = time.perf_counter()
    checkpoint = resolve_source(source)
    tensors = load_original_state_dict(checkpoint)
    config = flair_config_from_open_clip(model_cfg or infer_open_clip_config(tensors, text_heads, vision_heads))
    check_state_dict(tensors, config, str(checkpoint), verbose)
    tensors["logit_scale"], tensors["logit_bias"] = tensors["logit_scale"].float(), tensors["logit_bias"].float()
    model = FlairModel(config)
    model.load_state_dict(convert_state_dict(tensors, config), strict=True)
    model.eval()
    processor = build_processor()
    differences = verify(model, tensors, processor) if run_verify else None
    del tensors

    with staged_output_dir(output_dir) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        if differences is not None:
            (staging / "conversion_parity.json").write_text(json.dumps({"source": shareable_source(source), "max_abs_difference": differences}, indent=2))
    return {"source": str(checkpoint), "output_dir": str(output_dir), "seconds": time.perf_counter() - start, "max_abs_difference": differences}


def read_results(path: str) -> list[dict]:
    """The JSON list written by `benchmarks/evaluate_retrieval.py`."""
    try:
        results = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConversionError(f"--results {path}: cannot read it ({error})") from None
    if not isinstance(results, list) or not all(isinstance(r, dict) and "metrics" in r and "benchmark" in r for r in results):
        raise ConversionError(f"--results {path}: expected the JSON list that benchmarks/evaluate_retrieval.py writes")
    return results


def read_open_clip_config(path: str) -> dict:
    """open_clip's `model_cfg` from a JSON file (the file itself, or its `model_cfg` entry); clear errors otherwise."""
    config_path = Path(path)
    if not config_path.is_file():
        raise ConversionError(f"--open-clip-config {path}: no such file")
    try:
        loaded = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ConversionError(f"--open-clip-config {path}: not valid JSON ({error})") from None
    model_cfg = loaded.get("model_cfg", loaded) if isinstance(loaded, dict) else None
    if not isinstance(model_cfg, dict) or not {"vision_cfg", "text_cfg", "embed_dim"} <= set(model_cfg):
        raise ConversionError(
            f"--open-clip-config {path}: needs open_clip's model config (embed_dim, vision_cfg, text_cfg), at the top "
            "level or under model_cfg, as open_clip's model_configs/*.json"
        )
    return model_cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a local .pt file or a released checkpoint name: " + ", ".join(RELEASED_CHECKPOINTS))
    parser.add_argument("output_dir", help="directory to create (must not exist or be empty)")
    parser.add_argument("--verify", action="store_true", help="compare logits with an independent original forward")
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the result with a generated model card")
    parser.add_argument("--text-heads", type=int, help="text attention heads, for a checkpoint that is not ViT-B-16-FLAIR "
                        "(default: width / 64, open_clip's rule; weights cannot tell, and --verify cannot catch a wrong count)")
    parser.add_argument("--vision-heads", type=int, help="vision attention heads, for a checkpoint that is not ViT-B-16-FLAIR "
                        "(default: width / 64)")
    parser.add_argument("--verbose", action="store_true", help="list every missing, unexpected or mis-shaped key")
    parser.add_argument(
        "--results", metavar="JSON", help="with --push-to-hub: evaluate_retrieval.py output whose R@1 goes into the card's model-index"
    )
    parser.add_argument(
        "--open-clip-config", metavar="JSON",
        help="open_clip model config (a file with `model_cfg`); default: read the sizes from the checkpoint",
    )
    args = parser.parse_args(argv)
    try:
        model_cfg = read_open_clip_config(args.open_clip_config) if args.open_clip_config else None
        report = convert(args.source, args.output_dir, model_cfg, args.verify, args.text_heads, args.vision_heads, args.verbose)
        if args.push_to_hub:
            measured = read_results(args.results) if args.results else None
            push_to_hub(Path(args.output_dir), args.push_to_hub, args.source, report["max_abs_difference"], measured)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"converted {report['source']} -> {report['output_dir']} in {report['seconds']:.1f} s")
    if report["max_abs_difference"] is not None:
        print("verified against the original forward: " + ", ".join(f"{k} {v:.2e}" for k, v in report["max_abs_difference"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
