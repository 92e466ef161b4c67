"""Export a converted FLAIR model to ONNX Runtime: both encoders, the pooling head's pair scorer and its maps.

    python conversion/export_onnx.py MODEL_DIR OUT_DIR [--quantize int8]

MODEL_DIR is a directory written by `convert_flair_to_hf.py` (or a Hub id in the local cache). OUT_DIR receives, in
`onnx/`, `text_model.onnx` (token ids `input_ids` `(T, L)`, any T and L <= 77 -> global `text_embeds`),
`vision_model.onnx` (`pixel_values` `(B, 3, H, W)` -> global `image_embeds` and projected patch tokens
`image_token_embeds`), `pair_scorer.onnx` (text embeddings `(T, D)` x patch tokens `(B, L, D)` -> FLAIR cosines
`(B, T)`) and `pair_attention.onnx` (the same inputs -> the head-averaged pooling attention over the patches
`(B, T, L)`, for dense maps and segmentation), each one file with its weights; beside them the processor files,
`config.json` and `preprocessor_config.json` (what transformers.js reads: its `CLIPTextModelWithProjection` and
`CLIPVisionModelWithProjection` load the two towers as they are) and `flair_onnx.json`; load it with
`flair_hf.onnx.FlairOnnxModel`. Every graph is checked against PyTorch at batch sizes and caption lengths other
than the export's before the directory is moved into place. `--quantize int8` also writes ONNX Runtime's dynamic int8
quantization of every graph beside it (`*_quantized.onnx`, transformers.js' `dtype: "q8"`; int8 weights of every
MatMul/Gemm, activations quantized at run time), runs those graphs and records their drift from PyTorch in
`flair_onnx.json`. No graph keeps the exporter's source locations (local paths).

The exporter is `torch.onnx.export(dynamo=True)`: it takes the model's own modules through `torch.export`, so each
graph is a small wrapper around `FlairModel` methods; optimum's exporter carries one model per ONNX config and has no
slot for graphs that take another graph's outputs.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from flair_hf import FlairModel, FlairProcessor
from flair_hf.scoring import PAIR_IMAGE_CHUNK_SIZE, PAIR_TEXT_CHUNK_SIZE, flair_cosine
from flair_hf.onnx import (
    FORMAT, FORMAT_VERSION, GRAPHS, MANIFEST, TEXT_LENGTH_GROUPS, FlairOnnxModel, ids_up_to_end_of_text, quantized_name,
)  # fmt: skip
from flair_hf_conversion.convert_flair_to_hf import check_output_dir, local_revision, staged_output_dir
from flair_hf_conversion.state_dict import ConversionError

OPSET = 18
QUANTIZATIONS = ("int8",)
CHECK_TOLERANCE = 1e-4  # fp32 graphs against PyTorch (embeddings and cosines)
# int8 graphs: guards against a broken quantization, not quality bounds (measured drift: docs/deployment.md)
INT8_MIN_EMBEDDING_COSINE, INT8_MAX_COSINE_DIFFERENCE = 0.99, 0.05


class TextEncoder(nn.Module):
    """Token ids `(T, L)` -> global text embeddings `(T, D)`, not normalised (the full pass over the given length)."""

    def __init__(self, model: FlairModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_text_features(input_ids).pooler_output


class ImageEncoder(nn.Module):
    """Pixels `(B, 3, H, W)` -> global image embeddings `(B, D)` and projected patch tokens `(B, L, D)`."""

    def __init__(self, model: FlairModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.get_image_and_token_features(pixel_values)


class PairScorer(nn.Module):
    """Text embeddings `(T, D)` x patch tokens `(B, L, D)` -> FLAIR cosines `(B, T)` (logits without scale and bias)."""

    def __init__(self, model: FlairModel):
        super().__init__()
        self.pooling = model.text_conditioned_pooling

    def forward(self, text_embeds: torch.Tensor, image_token_embeds: torch.Tensor) -> torch.Tensor:
        return flair_cosine(self.pooling(text_embeds, image_token_embeds)[0], text_embeds)


class PairAttention(nn.Module):
    """Text embeddings `(T, D)` x patch tokens `(B, L, D)` -> the pooling head's attention over the patches `(B, T, L)`,
    averaged over heads, the zero slot dropped (what `flair_hf.dense.caption_attention_maps` maps)."""

    def __init__(self, model: FlairModel):
        super().__init__()
        self.pooling = model.text_conditioned_pooling

    def forward(self, text_embeds: torch.Tensor, image_token_embeds: torch.Tensor) -> torch.Tensor:
        return self.pooling(text_embeds, image_token_embeds, output_attentions=True)[1].mean(dim=1)[..., :-1]


def example_inputs(model: FlairModel, texts: int, length: int, images: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ids ending in `<end_of_text>` at varied positions, random pixels, and the model's own embeddings of them."""
    generator = torch.Generator().manual_seed(seed)
    text, vision = model.config.text_config, model.config.vision_config
    ids = torch.randint(1, text.eos_token_id, (texts, length), generator=generator)
    ends = torch.randint(1, length, (texts,), generator=generator)
    ends[0] = length - 1
    ids[torch.arange(texts), ends] = text.eos_token_id
    ids[:, 0] = text.bos_token_id
    ids[torch.arange(length)[None] > ends[:, None]] = 0
    pixels = torch.randn(images, 3, vision.image_size, vision.image_size, generator=generator)
    with torch.no_grad():
        text_embeds = TextEncoder(model)(ids)
        image_embeds, tokens = ImageEncoder(model)(pixels)
    return {"input_ids": ids, "pixel_values": pixels, "text_embeds": text_embeds, "image_embeds": image_embeds,
            "image_token_embeds": tokens}  # fmt: skip


def export_graphs(model: FlairModel, directory: Path) -> None:
    """The four graphs, with dynamic numbers of texts and images and a dynamic caption length."""
    inputs = example_inputs(model, texts=3, length=9, images=2)
    texts, images = torch.export.Dim("texts"), torch.export.Dim("images")
    length = torch.export.Dim("length", min=2, max=model.config.text_config.max_position_embeddings)
    graphs = (
        ("text", TextEncoder(model), ("input_ids",), {"input_ids": {0: texts, 1: length}}, ["text_embeds"]),
        ("image", ImageEncoder(model), ("pixel_values",), {"pixel_values": {0: images}}, ["image_embeds", "image_token_embeds"]),
        ("pair", PairScorer(model), ("text_embeds", "image_token_embeds"),
         {"text_embeds": {0: texts}, "image_token_embeds": {0: images}}, ["cosines"]),
        ("attention", PairAttention(model), ("text_embeds", "image_token_embeds"),
         {"text_embeds": {0: texts}, "image_token_embeds": {0: images}}, ["attention"]),
    )  # fmt: skip
    for name, module, input_names, dynamic_shapes, output_names in graphs:
        program = torch.onnx.export(
            module.eval(), tuple(inputs[i] for i in input_names), dynamo=True, opset_version=OPSET, verbose=False,
            input_names=list(input_names), output_names=output_names, dynamic_shapes=dynamic_shapes,
        )  # fmt: skip
        (directory / GRAPHS[name]).parent.mkdir(exist_ok=True)
        program.save(str(directory / GRAPHS[name]), external_data=False)  # one file a graph, as transformers.js loads it
        strip_source_locations(directory / GRAPHS[name])


def strip_source_locations(path: Path) -> None:
    """Drop the exporter's per-node metadata (stack traces with this machine's file paths) from a saved graph."""
    model = onnx.load(str(path), load_external_data=False)
    for graph in [model.graph, *(f for f in model.functions)]:
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
    onnx.save(model, str(path))


def quantize_int8(directory: Path) -> None:
    """ONNX Runtime dynamic quantization of every graph, written beside it (`_quantized`): int8 weights of
    MatMul/Gemm, activations quantized at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for file in GRAPHS.values():
        quantize_dynamic(directory / file, directory / quantized_name(file), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm"], per_channel=True)  # fmt: skip


def write_transformers_js_files(model: FlairModel, processor: FlairProcessor, directory: Path) -> None:
    """What transformers.js reads beside the graphs: `config.json` and the image processor as CLIP's
    (`preprocessor_config.json`: the same resize, crop and normalisation); `tokenizer.json` is the processor's."""
    settings = {key: value for key, value in processor.image_processor.to_dict().items() if key != "auto_map"}
    settings["image_processor_type"] = "CLIPImageProcessor"
    (directory / "preprocessor_config.json").write_text(json.dumps(settings, indent=2))
    config = {"model_type": "flair", "architectures": ["FlairModel"], "projection_dim": model.config.projection_dim}
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def embedding_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two embedding arrays."""
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def pytorch_reference(model: FlairModel) -> dict[str, np.ndarray]:
    """Inputs of shapes the export did not see, and PyTorch's outputs for them (what every export is compared with)."""
    inputs = example_inputs(model, texts=5, length=14, images=3, seed=1)
    expected = {key: value.numpy() for key, value in inputs.items()}
    with torch.no_grad():
        expected["flair_cosines"] = PairScorer(model)(inputs["text_embeds"], inputs["image_token_embeds"]).numpy()
        expected["attention_maps"] = PairAttention(model)(inputs["text_embeds"], inputs["image_token_embeds"]).numpy()
    return expected


def compare_with_pytorch(expected: dict[str, np.ndarray], directory: Path, precision: str) -> dict[str, dict[str, float]]:
    """The export's `precision` graphs, run as `FlairOnnxModel` runs them, against `pytorch_reference`: each
    output's largest absolute difference and the embeddings' smallest cosines."""
    exported = FlairOnnxModel.from_pretrained(directory, precision=precision)
    got = {"text_embeds": exported.embed_token_ids(ids_up_to_end_of_text(expected["input_ids"]))}
    got["image_embeds"], got["image_token_embeds"] = exported.pixel_features(expected["pixel_values"])
    got["flair_cosines"] = exported.flair_cosines(expected["text_embeds"], expected["image_token_embeds"])
    got["attention_maps"] = exported.attention_maps(expected["text_embeds"], expected["image_token_embeds"])
    return {
        "max_abs_difference": {key: float(np.abs(value - expected[key]).max()) for key, value in got.items()},
        "embedding_cosine_min": {key: float(embedding_cosines(got[key], expected[key]).min()) for key in ("text_embeds", "image_embeds")},
    }


def check_fp32(comparison: dict, tolerance: float) -> None:
    differences = comparison["max_abs_difference"]
    worst = max(differences, key=differences.get)
    if differences[worst] > tolerance:
        raise ConversionError(f"the exported {worst} differ from PyTorch by {differences[worst]:.2e} (> {tolerance:.0e}); "
                              "nothing was written")  # fmt: skip


def check_int8(comparison: dict) -> None:
    worst = min(comparison["embedding_cosine_min"].values())
    if worst < INT8_MIN_EMBEDDING_COSINE:
        raise ConversionError(f"the int8 graphs' embeddings drift to cosine {worst:.4f} from PyTorch "
                              f"(< {INT8_MIN_EMBEDDING_COSINE}); nothing was written")  # fmt: skip
    pairs = comparison["max_abs_difference"]["flair_cosines"]
    if pairs > INT8_MAX_COSINE_DIFFERENCE:
        raise ConversionError(f"the int8 pair graph's FLAIR cosines differ from PyTorch by {pairs:.4f} "
                              f"(> {INT8_MAX_COSINE_DIFFERENCE}); nothing was written")  # fmt: skip


def manifest(model: FlairModel, model_dir: Path, quantize: str | None, fp32: dict, int8: dict | None = None) -> dict:
    config = model.config
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "graphs": GRAPHS,
        "quantized_graphs": {name: quantized_name(file) for name, file in GRAPHS.items()} if quantize else None,
        "opset": OPSET,
        "quantization": f"{quantize}-dynamic" if quantize else None,
        "logit_scale": float(model.logit_scale.detach().exp()),
        "logit_bias": float(model.logit_bias.detach()),
        "projection_dim": config.projection_dim,
        "num_patches": (config.vision_config.image_size // config.vision_config.patch_size) ** 2,
        "image_size": config.vision_config.image_size,
        "patch_size": config.vision_config.patch_size,
        "max_text_length": config.text_config.max_position_embeddings,
        "length_groups": TEXT_LENGTH_GROUPS,
        "pair_chunk_sizes": [PAIR_IMAGE_CHUNK_SIZE, PAIR_TEXT_CHUNK_SIZE],
        "source": {"model": model_dir.resolve().name if model_dir.is_dir() else str(model_dir), "revision": getattr(config, "_commit_hash", None) or local_revision(model_dir)},
        "fp32_vs_pytorch": fp32,
        "int8_vs_pytorch": int8,
        "torch_version": torch.__version__,
    }


def export(model_dir, output_dir, quantize: str | None = None) -> dict:
    """Export `model_dir` into `output_dir` atomically (checked against PyTorch first); return a report."""
    if quantize not in (None, *QUANTIZATIONS):
        raise ConversionError(f"--quantize {quantize}: not supported; choose one of {', '.join(QUANTIZATIONS)}")
    output_dir = check_output_dir(output_dir)
    start = time.perf_counter()
    try:
        model = FlairModel.from_pretrained(model_dir).eval().float()
        processor = FlairProcessor.from_pretrained(model_dir)
    except (OSError, ValueError) as error:
        raise ConversionError(f"{model_dir}: cannot load a FLAIR model and processor ({error})") from None
    source = Path(model_dir)
    with staged_output_dir(output_dir) as staging:
        export_graphs(model, staging)
        processor.save_pretrained(staging)
        write_transformers_js_files(model, processor, staging)
        (staging / MANIFEST).write_text(json.dumps(manifest(model, source, quantize, {}), indent=2))  # what the runtime reads
        expected = pytorch_reference(model)
        fp32 = compare_with_pytorch(expected, staging, "fp32")
        check_fp32(fp32, CHECK_TOLERANCE)
        int8 = None
        if quantize:
            quantize_int8(staging)
            int8 = compare_with_pytorch(expected, staging, "int8")
            check_int8(int8)
        (staging / MANIFEST).write_text(json.dumps(manifest(model, source, quantize, fp32, int8), indent=2))
    return {"output_dir": str(output_dir), "seconds": time.perf_counter() - start, "fp32": fp32, "int8": int8}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="a converted FLAIR model directory (convert_flair_to_hf.py's output)")
    parser.add_argument("output_dir", help="directory to create (must not exist or be empty)")
    parser.add_argument("--quantize", choices=QUANTIZATIONS, help="int8: ONNX Runtime dynamic quantization of the weights")
    args = parser.parse_args(argv)
    try:
        report = export(args.model_dir, args.output_dir, args.quantize)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"exported {args.model_dir} -> {report['output_dir']} in {report['seconds']:.1f} s")
    for precision in ("fp32", "int8"):
        if report[precision]:
            differences = ", ".join(f"{k} {v:.1e}" for k, v in report[precision]["max_abs_difference"].items())
            cosines = ", ".join(f"{k} {v:.4f}" for k, v in report[precision]["embedding_cosine_min"].items())
            print(f"{precision} vs PyTorch: max abs difference {differences}; smallest cosine {cosines}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
