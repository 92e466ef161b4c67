"""Difference between FLAIR's exact PIL preprocessing and transformers' torchvision CLIP image processor.

    python benchmarks/preprocess_backends.py [--images DIR] [--output benchmarks/results/preprocess_backends.json]

Needs torchvision. Both are configured as the original eval transform (shortest side 224 bicubic, center crop 224,
OpenAI mean/std); the torchvision backend resizes tensors (antialiased bicubic), not PIL images, so values differ.
"""

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import CLIPImageProcessor

from flair_hf import FlairImageProcessor

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=str(FIXTURES / "preprocess_images"))
    parser.add_argument("--output", default="benchmarks/results/preprocess_backends.json")
    args = parser.parse_args(argv)
    pil, torchvision_backend = FlairImageProcessor(), CLIPImageProcessor()
    assert torchvision_backend.backend == "torchvision", "torchvision is not installed"
    rows = {}
    for path in sorted(Path(args.images).iterdir()):
        image = Image.open(path)
        a = pil(image, return_tensors="np")["pixel_values"][0]
        b = torchvision_backend(image, return_tensors="np")["pixel_values"][0]
        rows[path.name] = {"max_abs": float(np.abs(a - b).max()), "mean_abs": float(np.abs(a - b).mean())}
        print(f"{path.name:28s} max abs {rows[path.name]['max_abs']:.4f} mean abs {rows[path.name]['mean_abs']:.5f}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"images": rows, "max_abs": max(r["max_abs"] for r in rows.values())}, indent=2))


if __name__ == "__main__":
    main()
