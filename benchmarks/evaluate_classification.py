"""Zero-shot image classification of a FLAIR checkpoint (HF format): top-1 / top-5, FLAIR and CLIP-style scoring.

    python benchmarks/evaluate_classification.py --model DIR_OR_HUB_ID --dataset imagenet-1k --data-root DIR
        [--scoring flair --scoring clip] [--output results.json]
    python benchmarks/evaluate_classification.py --model DIR --data-root my_folder        # any ImageFolder
    python benchmarks/evaluate_classification.py --model DIR --dataset ORG/NAME --split test   # a Hub dataset (online)

Local data is an ImageFolder (`DIR/<class folder>/<image>`, read with `datasets`' `imagefolder` builder; labels are
the sorted folder names). For `--dataset imagenet-1k` the folders are ImageNet's WordNet ids (1,000 of them, e.g.
`val/n01440764/...`) and the class names are OpenAI's ImageNet names; otherwise the folder names (underscores as
spaces) or `--classnames FILE` (one name per line, label order). Prompts: OpenAI's 80 ImageNet templates.
`clip` scoring: global image embedding vs class embedding; `flair`: the class embedding queries the pooling head.
Writes JSON and a markdown table (`.md` next to it) and prints the table.

clip-benchmark (PyPI) is not used: it requires torchvision and open_clip, which this project does not.
"""

import argparse
import time
from pathlib import Path

import torch

from flair_hf_benchmarks.model_loading import load_model_and_processor
from flair_hf_benchmarks.reporting import published_comparison, write_results

from flair_hf.zero_shot import SCORINGS, evaluate_classification, imagenet_classnames


def load_images(args):
    """(`datasets.Dataset` with image and label columns, class names)."""
    import datasets

    if args.data_root:
        root = Path(args.data_root)
        if not root.is_dir():
            raise SystemExit(f"error: --data-root {root}: no such directory (an ImageFolder: DIR/<class>/<image>)")
        class_folders = [folder for folder in root.iterdir() if folder.is_dir() and any(folder.iterdir())]
        if not class_folders:
            loose = sum(1 for path in root.iterdir() if path.is_file())
            raise SystemExit(
                f"error: --data-root {root} has no class folders with images ({loose} files directly in it): an ImageFolder "
                "is DIR/<class>/<image>, one folder per class"
            )
        # data_files, not data_dir: `datasets` would read a split name ("test", "val") from the path's folders
        dataset = datasets.load_dataset("imagefolder", data_files={"train": str(root / "**")}, split="train")
        if "label" not in dataset.features:
            raise SystemExit(f"error: --data-root {root}: no labels found; an ImageFolder is DIR/<class>/<image>, one folder per class")
        folders = dataset.features["label"].names
        if args.dataset == "imagenet-1k":
            if len(folders) != 1000:
                raise SystemExit(f"error: imagenet-1k needs the 1,000 WordNet-id folders under {root}; found {len(folders)}")
            names = imagenet_classnames()
        else:
            names = [folder.replace("_", " ") for folder in folders]
    else:
        try:
            dataset = datasets.load_dataset(args.dataset, split=args.split)
        except Exception as error:  # noqa: BLE001 - offline or unknown id: one actionable line
            raise SystemExit(
                f"error: cannot load the Hub dataset {args.dataset} ({type(error).__name__}); offline, give the images as "
                "an ImageFolder with --data-root"
            ) from None
        label = dataset.features.get(args.label_column)
        names = imagenet_classnames() if args.dataset == "imagenet-1k" else getattr(label, "names", None)
        if names is None:
            raise SystemExit(f"error: {args.dataset}: column {args.label_column!r} has no class names; pass --classnames FILE")
    if args.classnames:
        names = [line.strip() for line in Path(args.classnames).read_text().splitlines() if line.strip()]
    if args.max_images:
        dataset = dataset.shuffle(seed=0).select(range(min(args.max_images, len(dataset))))
    return dataset, names


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="converted FLAIR directory, ONNX export (conversion/export_onnx.py) or Hub id")
    parser.add_argument("--dataset", default="imagefolder", help="imagenet-1k, imagefolder (default) or a Hub dataset id")
    parser.add_argument("--data-root", help="local ImageFolder (for imagenet-1k: the val folder of WordNet-id folders)")
    parser.add_argument("--split", default="validation", help="split of a Hub dataset (default: validation)")
    parser.add_argument("--image-column", default="image", help="image column (default: image)")
    parser.add_argument("--label-column", default="label", help="label column (default: label)")
    parser.add_argument("--classnames", help="file with one class name per line, in label order")
    parser.add_argument("--scoring", action="append", choices=SCORINGS, help="repeat for several (default: both)")
    parser.add_argument("--max-images", type=int, help="a random subset of N images (seed 0), for a quick check")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if available")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="default: float32")
    parser.add_argument("--output", default="classification_results.json", help="JSON file; the table goes next to it (.md)")
    parser.add_argument("--compare-paper", action="store_true", help="print the published figure beside ours where known")
    args = parser.parse_args(argv)
    if not args.data_root and args.dataset == "imagefolder":
        parser.error("give --data-root (an ImageFolder) or --dataset with a Hub id")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    dataset, names = load_images(args)
    model, processor = load_model_and_processor(args.model, getattr(torch, args.dtype), args.device)
    start = time.perf_counter()
    result = evaluate_classification(
        model, processor, dataset, names, args.image_column, args.label_column, scorings=args.scoring or SCORINGS,
        batch_size=args.batch_size,
    )  # fmt: skip
    result.update(dataset=args.dataset, model=str(args.model), seconds=time.perf_counter() - start, dtype=args.dtype)
    lines = ["| dataset | scoring | images | classes | top-1 | top-5 |", "|---|---|---|---|---|---|"]
    for scoring, accuracy in result["accuracy"].items():
        top5 = f"{accuracy['top5']:.1f}" if "top5" in accuracy else "–"
        lines.append(f"| {args.dataset} | {scoring} | {result['num_images']} | {result['num_classes']} | {accuracy['top1']:.1f} | {top5} |")
    table = "\n".join(lines)
    if args.compare_paper:
        flair_top1 = result["accuracy"].get("flair", next(iter(result["accuracy"].values())))["top1"]
        table += "\n\n" + published_comparison(args.model, args.dataset, flair_top1, result["num_images"])
    write_results(result, table, args.output)
    return result


if __name__ == "__main__":
    main()
