"""Offline demo: convert the bundled tiny FLAIR checkpoint (random weights), load it with remote code, score images.

    python conversion/offline_demo.py [--output-dir DIR]

Needs nothing from the Hub. The weights are random, so the scores are meaningless; the point is the whole path:
original `.pt` -> converter -> `AutoModel` / `AutoProcessor` with `trust_remote_code=True` -> FLAIR and CLIP logits.
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

CAPTIONS = ["a photo of a dog", "a football player in a red shirt", "a red ladybug on green beads", "a white desk"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", help="keep the converted model in DIR/flair-tiny (default: a temporary directory, removed)")
    args = parser.parse_args(argv)
    if args.output_dir is None:
        with tempfile.TemporaryDirectory(prefix="flair-demo-") as directory:
            run(Path(directory) / "flair-tiny")
        return
    output_dir = Path(args.output_dir) / "flair-tiny"
    if (output_dir / "config.json").is_file() and json.loads((output_dir / "config.json").read_text()).get("model_type") == "flair":
        print(f"replacing the tiny model converted earlier in {output_dir}")
        shutil.rmtree(output_dir)
    run(output_dir)


def run(output_dir: Path) -> None:
    """Convert the bundled checkpoint to `output_dir`, load it with remote code and print both kinds of logits."""
    from transformers import AutoModel, AutoProcessor

    model_cfg = json.loads((FIXTURES / "tiny" / "open_clip_config.json").read_text())["model_cfg"]
    report = convert(str(FIXTURES / "tiny" / "flair-tiny-train-ckpt.pt"), output_dir, model_cfg, run_verify=True)
    print(f"converted the bundled tiny checkpoint to {output_dir} (verify: {report['max_abs_difference']})")

    model = AutoModel.from_pretrained(output_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(output_dir, trust_remote_code=True)
    images = sorted((FIXTURES / "images").glob("*.jpg"))
    inputs = processor(text=CAPTIONS, images=[str(p) for p in images])
    with torch.no_grad():
        output = model(**inputs)
    torch.set_printoptions(precision=3, sci_mode=False)
    print(f"images: {[p.name for p in images]}\ncaptions: {CAPTIONS}")
    print(f"FLAIR logits (text-conditioned, with logit_bias), images x captions:\n{output.logits_per_image}")
    print(f"CLIP logits (global embeddings, no bias), images x captions:\n{output.logits_per_image_as_clip}")


if __name__ == "__main__":
    main()
