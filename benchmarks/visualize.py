"""Where does each caption look? FLAIR's dense maps drawn over the image, one panel per caption, in one PNG.

    python benchmarks/visualize.py IMAGE --model DIR --caption "..." [--caption ...] [--kind attention|similarity]
        [--image-size 224] --output out.png
    python benchmarks/visualize.py IMAGE [IMAGE ...] --grid --model DIR --caption ... --output grid.png

`attention`: the pooling head's attention over the patches for the caption (`flair_hf.dense.caption_attention_maps`);
`similarity`: the cosine of each patch token with the caption (`patch_similarity_maps`). Each map is upsampled
bilinearly to the image, which is shown center-cropped exactly as the model saw it (the preprocessed pixels,
un-normalised); the panel title is the caption and its FLAIR logit. `--image-size` above the model's size uses
interpolated position embeddings (finer maps). `--grid` draws several images, one row each. Needs matplotlib
(`pip install -e ".[viz]"`).
"""

import argparse
import os
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flair_hf import FlairScorer
from flair_hf.dense import MAP_KINDS, dense_maps
from flair_hf.scorer import load_failure


def preprocessed_images(pixel_values: torch.Tensor, processor) -> np.ndarray:
    """`(B, H, W, 3)` images in [0, 1]: the model's input pixels with the normalisation undone."""
    mean = torch.tensor(processor.image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(1, 3, 1, 1)
    return (pixel_values.float().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def compute(model, processor, images: list, captions: list[str], kind: str, image_size: int | None):
    """Upsampled maps `(B, T, H, W)`, FLAIR logits `(B, T)` and the displayed images."""
    size = image_size or model.config.vision_config.image_size
    inputs = processor(text=captions, images=images, size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    interpolate = size != model.config.vision_config.image_size
    with torch.no_grad():
        maps = dense_maps(model, inputs["pixel_values"], inputs["input_ids"], kind=kind, upsample=True)
        logits = model(**inputs, interpolate_pos_encoding=interpolate).logits_per_image
    return maps.numpy(), logits.numpy(), preprocessed_images(inputs["pixel_values"], processor)


def draw(maps, logits, pictures, captions: list[str], kind: str, output: Path, alpha: float = 0.5) -> None:
    """One row per image, one panel per caption: the image, the map over it, caption and logit as the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, columns = maps.shape[:2]
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.6 * rows), squeeze=False)
    for i in range(rows):
        for t in range(columns):
            axis = axes[i, t]
            axis.imshow(pictures[i])
            axis.imshow(maps[i, t], cmap="jet", alpha=alpha, vmin=0, vmax=1)
            title = textwrap.shorten(captions[t], width=90, placeholder="...")
            axis.set_title("\n".join(textwrap.wrap(title, 30)) + f"\nFLAIR logit {logits[i, t]:.2f}", fontsize=8)
            axis.axis("off")
    figure.suptitle(f"FLAIR {kind} maps", fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.3 / (3.6 * rows)))  # room for the title above the panels' titles
    partial = output.with_name(f".{output.name}.{os.getpid()}.tmp.png")
    figure.savefig(partial, dpi=80)
    plt.close(figure)
    os.replace(partial, output)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", help="local image files (several with --grid)")
    parser.add_argument("--model", required=True, help="converted FLAIR directory or Hub id")
    parser.add_argument("--caption", action="append", required=True, help="repeat for several captions")
    parser.add_argument("--kind", choices=MAP_KINDS, default="attention", help="map kind (default: attention)")
    parser.add_argument("--image-size", type=int, help="input size (default: the model's; larger gives finer maps)")
    parser.add_argument("--grid", action="store_true", help="several images, one row each")
    parser.add_argument("--output", required=True, help="PNG file to write (an existing file only with --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    args = parser.parse_args(argv)
    if len(args.images) > 1 and not args.grid:
        parser.error("several images need --grid (one row per image)")
    return args


def open_images(paths: list[str]) -> list[Image.Image]:
    """The images as RGB, decoded now: a missing, non-image or corrupt file is one line naming it."""
    images = []
    for path in paths:
        if not Path(path).is_file():
            raise SystemExit(f"error: image not found: {path}")
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except OSError as error:
            raise SystemExit(f"error: {path} is not a readable image ({str(error).split(':')[0]}): give a JPEG, PNG, WebP or BMP file") from None
    return images


def main(argv=None) -> Path:
    args = parse_args(argv)
    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise SystemExit(f"error: {output} exists: pass another --output, or --overwrite to replace it")
    images = open_images(args.images)
    try:
        scorer = FlairScorer.from_pretrained(args.model)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {load_failure(args.model, error)}") from None
    maps, logits, pictures = compute(scorer.model, scorer.processor, images, args.caption, args.kind, args.image_size)
    output.parent.mkdir(parents=True, exist_ok=True)
    draw(maps, logits, pictures, args.caption, args.kind, output)
    print(f"wrote {output} ({len(images)} image(s) x {len(args.caption)} caption(s), {args.kind} maps)")
    return output


if __name__ == "__main__":
    main()
