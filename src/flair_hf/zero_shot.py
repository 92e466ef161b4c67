"""Zero-shot classification with FLAIR: prompt templates, class embeddings, and top-k accuracy on a labelled set.

Class embeddings follow CLIP's recipe: every class name through OpenAI's 80 ImageNet templates, each embedding
L2-normalised, averaged, normalised again (`class_query_embeddings`, also used by `flair_hf.segmentation`). Images are
scored two ways (`evaluate_classification`): `clip`, the cosine of the global image embedding with each class
embedding; `flair`, the class embedding as the query of the text-conditioned pooling head over the image's patch
tokens, the cosine of that pooled embedding with the class embedding (`flair_hf.retrieval.flair_scores`).
"""

from importlib import resources

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .retrieval import flair_scores, global_scores

SCORINGS = ("flair", "clip")


def data_text(*parts: str) -> str:
    """A text file bundled under `flair_hf/data/`."""
    return resources.files("flair_hf").joinpath("data", *parts).read_text(encoding="utf-8")


def imagenet_templates() -> list[str]:
    """OpenAI's 80 ImageNet prompt templates (`{}` = the class name)."""
    return [line for line in data_text("openai_imagenet_templates.txt").splitlines() if line.strip()]


def imagenet_classnames() -> list[str]:
    """OpenAI's 1,000 ImageNet class names in label order (as CLIP's notebook and clip-benchmark, MIT)."""
    return [line for line in data_text("imagenet_classnames.txt").splitlines() if line.strip()]


@torch.no_grad()
def class_query_embeddings(model, tokenizer, classes: list[list[str]], templates: list[str], batch_size: int = 256,
                           progress: bool = True):  # fmt: skip
    """`(Q, D)` normalised template-averaged embeddings of every synonym, and `(Q,)` the class of each query."""
    from tqdm.auto import tqdm

    queries = [(index, name) for index, synonyms in enumerate(classes) for name in synonyms]
    prompts = [template.format(name) for _, name in queries for template in templates]
    device = model.device
    embeddings = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=f"encoding {len(prompts):,} class prompts", unit="batch", disable=not progress):
        ids = tokenizer(prompts[start : start + batch_size], padding="max_length", max_length=77, return_tensors="pt")
        embeddings.append(F.normalize(model.get_text_embeds(ids["input_ids"].to(device)).float(), dim=-1))
    per_template = torch.cat(embeddings).view(len(queries), len(templates), -1)
    query_to_class = torch.tensor([index for index, _ in queries])
    return F.normalize(per_template.mean(dim=1), dim=-1), query_to_class


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent (ties broken by class index)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    hits = order == labels[:, None]
    return {f"top{k}": round(float(hits[:, :k].any(dim=1).float().mean() * 100), 4) for k in ks if k <= scores.shape[1]}


@torch.no_grad()
def evaluate_classification(
    model, processor, dataset, classnames: list[str], image_column: str = "image", label_column: str = "label",
    templates: list[str] | None = None, scorings=SCORINGS, batch_size: int = 64, progress: bool = True,
) -> dict:  # fmt: skip
    """Top-1/top-5 accuracy of each scoring on a labelled image dataset whose labels index `classnames`."""
    unknown = set(scorings) - set(SCORINGS)
    if unknown:
        raise ValueError(f"unknown scoring {sorted(unknown)}: use {', '.join(SCORINGS)}")
    classes, _ = class_query_embeddings(
        model, processor.tokenizer, [[name] for name in classnames], templates or imagenet_templates(), progress=progress
    )
    scores = {name: [] for name in scorings}
    labels = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="classifying", unit="batch", disable=not progress):
        rows = dataset[start : start + batch_size]
        pixels = processor(images=rows[image_column])["pixel_values"].to(model.device, model.dtype)
        image_embeds, tokens = model.get_image_and_token_features(pixels)
        if "clip" in scores:
            scores["clip"].append(global_scores(image_embeds.cpu(), classes.cpu()))
        if "flair" in scores:
            scores["flair"].append(flair_scores(model.text_conditioned_pooling, classes.to(tokens.dtype), tokens))
        labels.extend(rows[label_column])
    labels = torch.tensor(labels)
    return {
        "num_images": len(labels), "num_classes": len(classnames),
        "accuracy": {name: topk_accuracy(torch.cat(values), labels) for name, values in scores.items()},
    }  # fmt: skip


__all__ = [
    "SCORINGS",
    "class_query_embeddings",
    "data_text",
    "evaluate_classification",
    "imagenet_classnames",
    "imagenet_templates",
    "topk_accuracy",
]
