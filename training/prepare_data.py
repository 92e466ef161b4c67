"""Caption files -> webdataset shards for `training/train.py`: `datasets` reads the tables, img2dataset fetches images.

    python training/prepare_data.py cc3m_3long_3short_1raw_captions_url.csv --output-dir shards/cc3m-recap
    python training/prepare_data.py "pixelprose/*.parquet" --output-dir shards/pixelprose --processes 16

1. The caption tables (DreamLIP CSV: the `Image Path` URL column and the caption columns `raw_caption`,
   `shortIB_captions`, ..., `longLLA_captions`; or PixelProse parquet: `url` and `vlm_caption`, saved as `caption`)
   are read with `datasets` (CSV or parquet, local paths or globs), reduced to the URL and caption columns, and
   written as one parquet file.
2. img2dataset downloads the images into webdataset shards (`00000.tar`, ...), one `.jpg` and one `.json` per sample;
   the `.json` holds the caption columns (`--save_additional_columns`), which is what the trainer reads.
3. A summary (rows read, images fetched, failed) is printed and written to `OUTPUT_DIR/prepare_summary.json`,
   with the `--train-data` / `--train-num-samples` options to train on the result.

Everything is written to `OUTPUT_DIR.partial` and moved to `OUTPUT_DIR` only when it succeeded. Needs the `data`
extra: `pip install -e ".[data]"`.
"""

import argparse
import glob
import json
import os
import sys
from pathlib import Path

from flair_hf.captions import DREAMLIP_KEYS as DREAMLIP_CAPTION_COLUMNS
from flair_hf_training.outputs import written_whole

DREAMLIP_URL_COLUMN = "Image Path"
PIXELPROSE_URL_COLUMN, PIXELPROSE_CAPTION_COLUMN = "url", "vlm_caption"


def read_caption_table(sources: list[str], max_rows: int | None = None):
    """The caption tables as one `datasets.Dataset` (CSV or parquet, chosen by extension)."""
    import datasets

    files = sorted({path for source in sources for path in (glob.glob(source) or [source])})
    missing = [path for path in files if not Path(path).is_file()]
    if missing:
        raise SystemExit(f"caption file not found: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    kinds = {Path(path).suffix.lower().lstrip(".") for path in files}
    if not kinds <= {"csv", "parquet"} or len(kinds) != 1:
        raise SystemExit(f"caption files must all be .csv or all .parquet, got: {', '.join(sorted(kinds))}")
    table = datasets.load_dataset(kinds.pop(), data_files=files, split="train")
    return table.select(range(min(max_rows, len(table)))) if max_rows is not None else table


def caption_columns_for(table, url_column: str | None, caption_columns: list[str] | None) -> tuple[str, dict[str, str]]:
    """The URL column and `{source column: name saved in each sample's .json}`: DreamLIP or PixelProse, or as given."""
    names = set(table.column_names)
    if caption_columns:
        columns = {name: name for name in caption_columns}
        url_column = url_column or (DREAMLIP_URL_COLUMN if DREAMLIP_URL_COLUMN in names else PIXELPROSE_URL_COLUMN)
    elif DREAMLIP_URL_COLUMN in names and names & set(DREAMLIP_CAPTION_COLUMNS):
        columns = {name: name for name in DREAMLIP_CAPTION_COLUMNS if name in names}
        url_column = url_column or DREAMLIP_URL_COLUMN
    elif PIXELPROSE_CAPTION_COLUMN in names:
        columns = {PIXELPROSE_CAPTION_COLUMN: "caption"}  # one long caption: the trainer's PixelProse key
        url_column = url_column or PIXELPROSE_URL_COLUMN
    else:
        raise SystemExit(
            f"cannot tell the caption format from the columns {sorted(names)}: expected DreamLIP ({DREAMLIP_URL_COLUMN!r} "
            f"and {', '.join(DREAMLIP_CAPTION_COLUMNS)}) or PixelProse ({PIXELPROSE_URL_COLUMN!r}, "
            f"{PIXELPROSE_CAPTION_COLUMN!r}); or name them with --url-column and --caption-columns"
        )
    absent = [name for name in [url_column, *columns] if name not in names]
    if absent:
        raise SystemExit(f"columns not in the caption files: {', '.join(absent)} (present: {', '.join(sorted(names))})")
    return url_column, columns


def write_url_table(table, url_column: str, columns: dict[str, str], path: Path) -> int:
    """Keep the rows with a URL, rename to `url` + saved caption names, write parquet; return the row count."""
    table = table.select_columns([url_column, *columns]).rename_columns({url_column: "url", **columns})
    table = table.filter(lambda row: isinstance(row["url"], str) and row["url"].strip() != "", desc="rows with a URL")
    table.to_parquet(str(path))
    return len(table)


def download_shards(url_table: Path, output: Path, saved_columns: list[str], args) -> None:
    """img2dataset: images into webdataset shards with the caption columns in each sample's `.json`."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no update check over the network at import
    try:
        from img2dataset import download
    except ImportError as error:
        raise SystemExit(f"img2dataset is not installed ({error}): pip install -e '.[data]'") from error
    download(
        url_list=str(url_table), input_format="parquet", url_col="url", save_additional_columns=saved_columns,
        output_format="webdataset", output_folder=str(output), image_size=args.image_size, resize_mode=args.resize_mode,
        resize_only_if_bigger=True, processes_count=args.processes, thread_count=args.threads,
        number_sample_per_shard=args.samples_per_shard, timeout=args.timeout, retries=args.retries,
        enable_wandb=False, distributor="multiprocessing",
    )  # fmt: skip


def summarize(output: Path, rows_read: int, rows_with_url: int) -> dict:
    """Totals from img2dataset's per-shard stats files and the shard names to train on."""
    stats = [json.loads(path.read_text()) for path in sorted(output.glob("*_stats.json"))]
    shards = sorted(path.name for path in output.glob("*.tar"))
    fetched = sum(s["successes"] for s in stats)
    summary = {
        "rows_read": rows_read, "rows_with_url": rows_with_url, "images_fetched": fetched,
        "failed": sum(s["count"] for s in stats) - fetched,
        "failed_to_download": sum(s["failed_to_download"] for s in stats),
        "failed_to_resize": sum(s["failed_to_resize"] for s in stats), "shards": len(shards),
    }  # fmt: skip
    if shards:
        first, last = shards[0].removesuffix(".tar"), shards[-1].removesuffix(".tar")
        summary["shard_pattern"] = f"{{{first}..{last}}}.tar" if first != last else f"{first}.tar"
    return summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("captions", nargs="+", help="caption files: .csv (DreamLIP) or .parquet (PixelProse), globs allowed")
    parser.add_argument("--output-dir", required=True, help="where the shards go (must not exist or be empty)")
    parser.add_argument("--url-column", help="image URL column (default: 'Image Path' for DreamLIP, 'url' for PixelProse)")
    parser.add_argument("--caption-columns", nargs="+", help="caption columns to keep (default: by the detected format)")
    parser.add_argument("--max-rows", type=int, help="use only the first N rows (a quick trial)")
    parser.add_argument("--image-size", type=int, default=256, help="resize target of img2dataset (default: 256)")
    parser.add_argument("--resize-mode", default="keep_ratio", help="img2dataset resize mode (default: keep_ratio)")
    parser.add_argument("--samples-per-shard", type=int, default=10000, help="samples per .tar (default: 10000)")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="download processes (default: CPUs)")
    parser.add_argument("--threads", type=int, default=64, help="download threads per process (default: 64)")
    parser.add_argument("--timeout", type=int, default=10, help="seconds per download (default: 10)")
    parser.add_argument("--retries", type=int, default=0, help="retries per failed download (default: 0)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    output = Path(args.output_dir)
    if output.is_file() or (output.is_dir() and any(output.iterdir())):
        raise SystemExit(f"{output} already exists and is not an empty directory: choose a new --output-dir")
    table = read_caption_table(args.captions, args.max_rows)
    url_column, columns = caption_columns_for(table, args.url_column, args.caption_columns)
    print(f"read {len(table)} rows; URL column {url_column!r}, captions {', '.join(columns)}", file=sys.stderr)
    with written_whole(output) as partial:
        url_table = partial / "_captions.parquet"
        rows_with_url = write_url_table(table, url_column, columns, url_table)
        download_shards(url_table, partial, list(columns.values()), args)
        url_table.unlink()
        summary = summarize(partial, len(table), rows_with_url)
        (partial / "prepare_summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"rows read: {summary['rows_read']}, images fetched: {summary['images_fetched']}, failed: {summary['failed']} "
        f"({summary['failed_to_download']} download, {summary['failed_to_resize']} resize), shards: {summary['shards']}"
    )
    if summary["images_fetched"]:
        print(f"train with: --train-data \"{output / summary['shard_pattern']}\" --train-num-samples {summary['images_fetched']}")
    return summary


if __name__ == "__main__":
    main()
