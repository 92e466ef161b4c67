"""What the benchmark scripts write: results as JSON and, for the evaluation CLIs, the markdown table next to it."""

import json
from pathlib import Path


def write_text_whole(text: str, output) -> Path:
    """Write `text` to `output` through a partial file renamed into place (never half-written), creating its folder."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    partial.write_text(text)
    partial.replace(output)
    return output


def write_json(data, output) -> Path:
    """Write `data` as indented JSON to `output`, whole."""
    return write_text_whole(json.dumps(data, indent=2), output)


def write_results(results, table: str, output) -> Path:
    """Write `results` to `output` (JSON) and `table` to the same name with `.md`; print the table and both paths."""
    output = write_json(results, output)
    write_text_whole(table + "\n", output.with_suffix(".md"))
    print(table)
    print(f"wrote {output} and {output.with_suffix('.md')}")
    return output


# Published figures from secondary sources (summaries of the paper; its own tables could not be read here):
# (release, benchmark) -> (value, what it measures, images in the full set it was measured on)
SECONDARY_SOURCE_FIGURES = {
    ("flair-merged30m", "imagenet-1k"): (56.6, "ImageNet-1k zero-shot top-1", 50000),
    ("flair-merged30m", "voc20"): (73.0, "VOC20 zero-shot mIoU", 1449),
}


def published_comparison(model: str, benchmark: str, measured: float, num_images: int) -> str:
    """One line comparing `measured` with the published figure of the release named in `model`, labelled as from a
    secondary source; published figures are compared only with a run over the full set."""
    release = next((r for r, b in SECONDARY_SOURCE_FIGURES if b == benchmark and r in str(model)), None)
    if release is None:
        return f"No published {benchmark} figure is recorded for this model (known: flair-merged30m on imagenet-1k and voc20)."
    value, what, full = SECONDARY_SOURCE_FIGURES[release, benchmark]
    if num_images != full:
        return (f"Published {what} of {release}: {value} (secondary source), measured on all {full:,} images; this run has "
                f"{num_images:,}, so it is not compared.")  # fmt: skip
    return f"{what} of {release}: ours {measured:.1f}, published {value} (secondary source), difference {measured - value:+.1f}."
