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
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from flair_hf import FlairImageProcessor, FlairModel, FlairProcessor, FlairTokenizer
from flair_hf_conversion.hub import RELEASED_CHECKPOINTS, push_to_hub, resolve_source, shareable_source
from flair_hf_conversion.original_forward import original_forward
from flair_hf_conversion.state_dict import (
    ConversionError, check_state_dict, convert_state_dict, flair_config_from_open_clip, infer_open_clip_config,
    load_original_state_dict,
)  # fmt: skip

VERIFY_TOLERANCE = 1e-4
VERIFY_CAPTIONS = (
    "a photo of a dog",
    "In the image, a small white puppy with black ears and eyes is the main subject",
    "A red ladybug is surrounded by green glass beads",
    "",
)


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
