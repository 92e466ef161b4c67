"""Offline demo: FLAIR scoring images it never saw, with nothing from the Hub.

    python conversion/offline_demo.py
    python conversion/offline_demo.py --convert-tiny [--output-dir DIR]

By default it loads the bundled small FLAIR (`demo/flair-fashion-mosaics`, trained on Fashion-MNIST mosaics by
`training/train.py --config training/configs/mosaics_cpu.yaml`; for photos use a converted release) with
`AutoModel` / `AutoProcessor` and `trust_remote_code=True`, and scores the bundled held-out mosaics
(`demo/examples/`) against captions that each name one item of one of them: FLAIR and CLIP logits, and the image
each caption ranks first.

`--convert-tiny` walks the converter's path instead: the bundled tiny original checkpoint (random weights, so its
scores mean nothing) -> converter -> `AutoModel` / `AutoProcessor` -> FLAIR and CLIP logits on two photos.
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from flair_hf_conversion.convert_flair_to_hf import convert

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
BUNDLED_MODEL = ROOT / "demo" / "flair-fashion-mosaics"
EXAMPLES = ROOT / "demo" / "examples"

CAPTIONS = ["a photo of a dog", "a football player in a red shirt", "a red ladybug on green beads", "a white desk"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--convert-tiny", action="store_true", help="convert the bundled tiny random checkpoint instead")
    parser.add_argument("--output-dir", help="with --convert-tiny: keep the model in DIR/flair-tiny (default: a temporary directory, removed)")
    args = parser.parse_args(argv)
    if not args.convert_tiny:
        if args.output_dir:
            parser.error("--output-dir goes with --convert-tiny (the bundled model is not converted)")
        score_examples()
        return
    if args.output_dir is None:
        with tempfile.TemporaryDirectory(prefix="flair-demo-") as directory:
            run(Path(directory) / "flair-tiny")
        return
    output_dir = Path(args.output_dir) / "flair-tiny"
    if (output_dir / "config.json").is_file() and json.loads((output_dir / "config.json").read_text()).get("model_type") == "flair":
        print(f"replacing the tiny model converted earlier in {output_dir}")
        shutil.rmtree(output_dir)
    run(output_dir)


def print_logits(model_dir: Path, images: list[Path], captions: list[str]):
    """Load `model_dir` with remote code, score `images` x `captions`, print both kinds of logits; the output."""
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    with torch.no_grad():
        output = model(**processor(text=captions, images=[str(path) for path in images]))
    torch.set_printoptions(precision=3, sci_mode=False)
    print(f"images: {[path.name for path in images]}\ncaptions: {captions}")
    print(f"FLAIR logits (text-conditioned, with logit_bias), images x captions:\n{output.logits_per_image}")
    print(f"CLIP logits (global embeddings, no bias), images x captions:\n{output.logits_per_image_as_clip}")
    return output


def score_examples() -> None:
    """The bundled trained model on the bundled held-out mosaics: logits and each caption's first image."""
    print(f"{BUNDLED_MODEL.name}: a small FLAIR trained on Fashion-MNIST mosaics; for photos use a converted release")
    examples = json.loads((EXAMPLES / "captions.json").read_text())
    names, captions = list(examples), [items[0] for items in examples.values()]
    output = print_logits(BUNDLED_MODEL, [EXAMPLES / name for name in names], captions)
    for caption, best in zip(captions, output.logits_per_image.argmax(0).tolist()):
        print(f"{caption!r} -> {names[best]}")


def run(output_dir: Path) -> None:
    """Convert the bundled checkpoint to `output_dir`, load it with remote code and print both kinds of logits."""
    model_cfg = json.loads((FIXTURES / "tiny" / "open_clip_config.json").read_text())["model_cfg"]
    report = convert(str(FIXTURES / "tiny" / "flair-tiny-train-ckpt.pt"), output_dir, model_cfg, run_verify=True)
    print(f"converted the bundled tiny checkpoint to {output_dir} (verify: {report['max_abs_difference']})")

    print_logits(output_dir, sorted((FIXTURES / "images").glob("*.jpg")), CAPTIONS)


if __name__ == "__main__":
    main()
