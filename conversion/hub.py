"""The Hub side of conversion: released checkpoints downloaded by name, the model card (`model_card.md`, filled
with the Hub's metadata, published and measured R@1 and the parity figures), and the upload."""

import string
import sys
from pathlib import Path

from flair_hf_conversion.state_dict import ConversionError

HUB_REPO = "xiaorui638/flair"
RELEASED_CHECKPOINTS = ("flair-cc3m-recap", "flair-cc12m-recap", "flair-yfcc15m-recap", "flair-merged30m")


MODEL_CARD = string.Template(Path(__file__).with_name("model_card.md").read_text(encoding="utf-8"))


def resolve_source(source: str, cache_dir: str | None = None) -> Path:
    """A local path as is; a released checkpoint name is downloaded from the Hub (clear error when offline)."""
    if source in RELEASED_CHECKPOINTS:
        from huggingface_hub import hf_hub_download

        print(f"downloading {source}.pt from the Hub repository {HUB_REPO} (offline? set HF_HUB_OFFLINE=1 to fail at once)",
              file=sys.stderr)  # fmt: skip
        try:
            return Path(hf_hub_download(HUB_REPO, f"{source}.pt", cache_dir=cache_dir))
        except Exception as error:  # noqa: BLE001 - any Hub failure gets the same actionable message
            raise ConversionError(
                f"could not download {source}.pt from the Hub repository {HUB_REPO} ({type(error).__name__}: {error}). "
                f"Offline? Download the file elsewhere and pass its local path instead of the name."
            ) from error
    path = Path(source)
    if not path.exists():
        raise ConversionError(f"{source}: no such file, and not a released checkpoint name ({', '.join(RELEASED_CHECKPOINTS)})")
    return path


TRAINING_DATA = {
    "flair-cc3m-recap": ["CC3M-recap (DreamLIP)"],
    "flair-cc12m-recap": ["CC12M-recap (DreamLIP)"],
    "flair-yfcc15m-recap": ["YFCC15M-recap (DreamLIP)"],
    "flair-merged30m": ["CC3M-recap (DreamLIP)", "CC12M-recap (DreamLIP)", "YFCC15M-recap (DreamLIP)"],
}
RETRIEVAL_SETS = {"coco": ("coco", "COCO val2017 (5k images)"), "flickr30k": ("flickr30k", "Flickr30k (1k images)")}


def _retrieval_results(repo_id: str, release: str | None, measured: list[dict]) -> list:
    """`EvalResult`s for the model-index: the published R@1 of a release, and R@1 measured by
    `benchmarks/evaluate_retrieval.py` (its JSON), each marked by its source."""
    from huggingface_hub import EvalResult

    from flair_hf.evaluation import PAPER_R1

    rows = []
    published = PAPER_R1.get(release, {}) if release else {}
    for benchmark, (t2i, i2t) in published.items():
        rows.append((benchmark, t2i, i2t, "FLAIR paper (published)", "https://arxiv.org/abs/2412.03561", "published"))
    for result in measured:
        if result["benchmark"] in RETRIEVAL_SETS:
            metrics = result["metrics"]
            name = f"measured with flair-hf ({result.get('mode', 'flair')} mode, {result['num_images']} images)"
            url = f"https://huggingface.co/{repo_id}"  # measured on this repository's weights
            rows.append((result["benchmark"], metrics["text_to_image_R@1"], metrics["image_to_text_R@1"], name, url, "measured"))
    results = []
    for benchmark, t2i, i2t, source_name, source_url, origin in rows:  # origin keeps them apart in the model-index
        dataset_type, dataset_name = RETRIEVAL_SETS[benchmark]
        for direction, value in (("text-to-image", t2i), ("image-to-text", i2t)):
            results.append(EvalResult(
                task_type="zero-shot-image-text-retrieval", task_name="Zero-shot image-text retrieval",
                dataset_type=dataset_type, dataset_name=dataset_name, dataset_config=origin, metric_type="recall@1",
                metric_name=f"{direction} R@1", metric_value=value, source_name=source_name, source_url=source_url,
            ))  # fmt: skip
    return results


def model_card(repo_id: str, source: str, differences: dict | None, measured: list[dict] | None = None) -> str:
    """The model card: YAML metadata the Hub reads (library, pipeline, license, tags, training data, base model,
    model-index with published and measured retrieval R@1), usage, parity figures, citation."""
    from huggingface_hub import ModelCardData

    release = source if source in RELEASED_CHECKPOINTS else None
    parity = (
        "\n".join(f"- `{name}`: max abs difference {value:.2e}" for name, value in differences.items())
        if differences
        else "- not verified at conversion time (run the converter with `--verify`)"
    )
    metadata = ModelCardData(
        library_name="transformers", pipeline_tag="zero-shot-image-classification", license="mit",
        tags=["flair", "clip", "vision-language", "image-text-retrieval", "zero-shot-image-classification"],
        datasets=TRAINING_DATA.get(release), base_model=HUB_REPO if release else None, model_name=repo_id,
        eval_results=_retrieval_results(repo_id, release, measured or []) or None,
    )  # fmt: skip
    return MODEL_CARD.substitute(metadata=metadata.to_yaml(), repo_id=repo_id, source=source, parity=parity)


def shareable_source(source: str) -> str:
    """What generated files say the model was converted from: a released name as is, a local file by name only."""
    return source if source in RELEASED_CHECKPOINTS else Path(source).name


def push_to_hub(directory: Path, repo_id: str, source: str, differences: dict | None, measured: list[dict] | None = None) -> None:
    """Upload `directory` (with a generated model card) to `repo_id`; a clear error when the Hub is unreachable."""
    from huggingface_hub import HfApi

    source = shareable_source(source)
    (directory / "README.md").write_text(model_card(repo_id, source, differences, measured))
    try:
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(directory), commit_message=f"Convert {source} with flair-hf")
    except Exception as error:  # noqa: BLE001
        raise ConversionError(
            f"push to the Hub repository {repo_id} failed ({type(error).__name__}: {error}); the converted model is "
            f"kept in {directory}. Check your network and `hf auth login`, then upload that folder."
        ) from error
