"""Zero-shot semantic segmentation of a FLAIR checkpoint (HF format), the SCLIP scheme FLAIR/COSMOS evaluate with.

    python benchmarks/evaluate_segmentation.py --model DIR_OR_HUB_ID --benchmark voc20 [--benchmark context59 ...]
        --data-root PATH [--method similarity|attention] [--output results.json] [--compare-paper]

Class names (SCLIP's files; `a, b` on a line = synonyms of one class) through the 80 OpenAI ImageNet templates; the
image resized to the set's short side, 224x224 sliding windows (stride 112) of patch-token / class cosines (or, with
`--method attention`, the pooling head's caption attention maps), averaged, upsampled to the image, softmax with the
set's logit scale, background by probability threshold (and area threshold for voc21). Every number has an option;
the per-set defaults are in the table of docs/dense-maps.md and `flair_hf.segmentation.SEGMENTATION_SETS`. Writes JSON and a
markdown table (next to the JSON, `.md`) and prints the table.
"""

import argparse
import dataclasses
import time

import torch

from flair_hf_benchmarks.model_loading import OnnxEvaluationModel, load_model_and_processor
from flair_hf_benchmarks.reporting import published_comparison, write_results

from flair_hf.retrieval_data import BenchmarkDataError
from flair_hf.segmentation import SEGMENTATION_SETS, evaluate_segmentation
from flair_hf.segmentation_data import SEGMENTATION_LAYOUTS, load_segmentation_benchmark

OBTAINING = """obtaining the data (mmsegmentation's preparation, which these layouts follow):
  VOC2012 from the PASCAL VOC site; PASCAL-Context: VOC2010 images + Context labels via mmseg's
  tools/dataset_converters/pascal_context.py; COCO-Stuff164k images + stuffthingmaps via mmseg's coco_stuff164k.py;
  COCO-Object _instanceTrainIds.png from the COCO instance annotations via SCLIP's cvt_coco_object.py; Cityscapes
  leftImg8bit + gtFine (registration) via csCreateTrainIdLabelImgs; ADE20K ADEChallengeData2016.zip."""


def parse_args(argv=None):
    layouts = "layouts under --data-root:\n" + "\n".join(f"  {name}: {layout}" for name, layout in SEGMENTATION_LAYOUTS.items())
    layouts += "\n\n" + OBTAINING
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=layouts, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="converted FLAIR directory, ONNX export (conversion/export_onnx.py) or Hub id")
    parser.add_argument("--benchmark", action="append", required=True, choices=sorted(SEGMENTATION_SETS), help="repeat for several")
    parser.add_argument("--data-root", required=True, help="root holding the benchmarks' layouts (see below)")
    parser.add_argument("--method", choices=["similarity", "attention"], default="similarity",
                        help="patch-token cosine (default) or the pooling head's caption attention maps")  # fmt: skip
    parser.add_argument("--logit-scale", type=float, help="softmax temperature (default: per set, 40-65)")
    parser.add_argument("--prob-thd", type=float, help="below this probability -> background (default: per set)")
    parser.add_argument("--area-thd", type=float, help="drop foreground classes of at most this area share (default: voc21 0.1)")
    parser.add_argument("--short-side", type=int, help="resize the short side to this (default: per set, 336-560)")
    parser.add_argument("--crop", type=int, default=224, help="sliding window size (default: 224)")
    parser.add_argument("--stride", type=int, default=112, help="sliding window stride (default: 112)")
    parser.add_argument("--window-batch", type=int, default=16, help="windows per forward pass (default: 16)")
    parser.add_argument("--max-images", type=int, help="evaluate only the first N images (a quick check)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if available")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="load the model in this dtype (default: float32; bfloat16 is faster on GPUs)")  # fmt: skip
    parser.add_argument("--output", default="segmentation_results.json", help="JSON file (default: segmentation_results.json)")
    parser.add_argument("--compare-paper", action="store_true", help="print the published mIoU beside ours where known")
    args = parser.parse_args(argv)
    args.benchmark = list(dict.fromkeys(args.benchmark))
    return args


def settings_for(benchmark: str, args):
    overrides = {"logit_scale": args.logit_scale, "prob_thd": args.prob_thd, "short_side": args.short_side}
    overrides = {key: value for key, value in overrides.items() if value is not None}
    if args.area_thd is not None:
        overrides["area_thd"] = args.area_thd
    return dataclasses.replace(SEGMENTATION_SETS[benchmark], **overrides)


def markdown_table(results: list[dict], compare_paper: bool) -> str:
    lines = ["| benchmark | method | images | mIoU | pixel acc. |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['benchmark']} | {r['method']} | {r['num_images']} | {r['mIoU']:.1f} | {r['pixel_accuracy']:.1f} |")
    if compare_paper:
        lines += [""] + [published_comparison(r["model"], r["benchmark"], r["mIoU"], r["num_images"]) for r in results]
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    try:
        datasets_to_run = [(name, load_segmentation_benchmark(name, args.data_root, args.max_images)) for name in args.benchmark]
    except BenchmarkDataError as error:
        raise SystemExit(f"error: {error}") from None
    model, processor = load_model_and_processor(args.model, getattr(torch, args.dtype), args.device)
    size = model.config.vision_config.image_size
    if isinstance(model, OnnxEvaluationModel) and args.crop != size:
        raise SystemExit(f"error: --model {args.model} is an ONNX export, which takes {size}x{size} windows only: use --crop {size}")
    tokenizer = processor.tokenizer
    results = []
    for name, dataset in datasets_to_run:
        settings = settings_for(name, args)
        start = time.perf_counter()
        try:
            metrics = evaluate_segmentation(model, tokenizer, dataset, name, args.method, settings, args.crop, args.stride, args.window_batch)
        except BenchmarkDataError as error:
            raise SystemExit(f"error: {error}") from None
        results.append({
            "benchmark": name, "method": args.method, **metrics, "seconds": time.perf_counter() - start,
            "settings": dataclasses.asdict(settings), "crop": args.crop, "stride": args.stride, "model": str(args.model),
            "dtype": args.dtype, "device": args.device,
        })  # fmt: skip
    table = markdown_table(results, args.compare_paper)
    write_results(results, table, args.output)
    return results


if __name__ == "__main__":
    main()
