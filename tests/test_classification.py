"""Zero-shot classification: ImageFolder through datasets, both scorings equal a direct computation, the CLI."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import ROOT
from flair_hf.zero_shot import imagenet_classnames, imagenet_templates, topk_accuracy

from flair_hf_benchmarks import evaluate_classification

CLASSES = ["golden_retriever", "sports_car", "tree"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(3):
            rng = np.random.default_rng(10 * c + i)
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_bundled_class_names_and_templates():
    names = imagenet_classnames()
    assert len(names) == 1000 and names[:3] == ["tench", "goldfish", "great white shark"] and len(imagenet_templates()) == 80


def test_topk_accuracy_by_hand():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.5, 0.5, 0.0]])
    result = topk_accuracy(scores, torch.tensor([0, 1, 1]), ks=(1, 2))
    assert result == {"top1": pytest.approx(100 / 3, abs=1e-4), "top2": 100.0}  # the tie in row 3 goes to class 0


def test_cli_equals_a_direct_computation(tiny_dir, tiny_model, image_folder, tmp_path):
    from flair_hf import FlairProcessor

    output = tmp_path / "results.json"
    result = evaluate_classification.main(["--model", str(tiny_dir), "--data-root", str(image_folder), "--output", str(output),
                                           "--batch-size", "4"])  # fmt: skip
    assert json.loads(output.read_text())["accuracy"] == result["accuracy"]
    assert (result["num_images"], result["num_classes"]) == (9, 3) and "| imagefolder | flair | 9 | 3 |" in output.with_suffix(".md").read_text()
    # independent: each class's 80 prompts written out and embedded one class at a time (CLIP's recipe: normalise,
    # average over templates, normalise), the model's own features, both scorings, argmax
    processor = FlairProcessor.from_pretrained(tiny_dir)
    templates = (ROOT / "src" / "flair_hf" / "data" / "openai_imagenet_templates.txt").read_text().splitlines()
    rows = []
    with torch.no_grad():
        for name in CLASSES:
            prompts = [template.replace("{}", name.replace("_", " ")) for template in templates if template.strip()]
            ids = processor(text=prompts)["input_ids"]
            rows.append(F.normalize(F.normalize(tiny_model.get_text_embeds(ids), dim=-1).mean(0), dim=0))
    classes = torch.stack(rows)
    images, labels = [], []
    for label, name in enumerate(CLASSES):
        for i in range(3):
            images.append(Image.open(image_folder / name / f"{i}.png"))
            labels.append(label)
    with torch.no_grad():
        pixels = processor(images=images)["pixel_values"]
        embeds, tokens = tiny_model.get_image_and_token_features(pixels)
        clip = F.normalize(embeds, dim=-1) @ classes.t()
        pooled = tiny_model.text_conditioned_pooling(classes, tokens)[0]  # (B, C, D)
        flair = F.cosine_similarity(pooled, classes[None], dim=-1)
    for name, scores in (("clip", clip), ("flair", flair)):
        expected = float((scores.argmax(1) == torch.tensor(labels)).float().mean() * 100)
        assert result["accuracy"][name]["top1"] == pytest.approx(expected, abs=1e-3), name


def test_files_named_like_a_split_are_still_one_imagefolder(tiny_dir, image_folder, tmp_path):
    """`datasets` reads split names from file and folder names (`test-000001-0.png`, as training/mosaics.py names
    its items): the ImageFolder must still load whole."""
    root = tmp_path / "items"
    for folder in image_folder.iterdir():
        (root / folder.name).mkdir(parents=True)
        for image in folder.iterdir():
            (root / folder.name / f"test-{image.name}").write_bytes(image.read_bytes())
    result = evaluate_classification.main(["--model", str(tiny_dir), "--data-root", str(root), "--output", str(tmp_path / "r.json")])
    assert (result["num_images"], result["num_classes"]) == (9, 3)


def test_errors_are_one_line(tiny_dir, image_folder, tmp_path):
    with pytest.raises(SystemExit, match="imagenet-1k needs the 1,000 WordNet-id folders"):
        evaluate_classification.main(["--model", str(tiny_dir), "--dataset", "imagenet-1k", "--data-root", str(image_folder)])
    with pytest.raises(SystemExit, match="no such directory"):
        evaluate_classification.main(["--model", str(tiny_dir), "--data-root", str(tmp_path / "none")])
    with pytest.raises(SystemExit, match="cannot load the Hub dataset someone/missing"):
        evaluate_classification.main(["--model", str(tiny_dir), "--dataset", "someone/missing"])
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "a.png")
    (tmp_path / "empty").mkdir()
    for root, files in ((flat, 1), (tmp_path / "empty", 0)):
        with pytest.raises(SystemExit) as error:
            evaluate_classification.main(["--model", str(tiny_dir), "--data-root", str(root)])
        assert str(error.value) == (f"error: --data-root {root} has no class folders with images ({files} files directly in it): "
                                    "an ImageFolder is DIR/<class>/<image>, one folder per class")  # fmt: skip


@pytest.mark.parametrize("keep", [("config.json",), ("config.json", "model.safetensors")])
def test_incomplete_model_directories_are_one_line_errors(tiny_dir, image_folder, tmp_path, keep):
    import shutil

    partial = tmp_path / "partial"
    partial.mkdir()
    for name in keep:
        shutil.copy(tiny_dir / name, partial / name)
    with pytest.raises(SystemExit) as error:
        evaluate_classification.main(["--model", str(partial), "--data-root", str(image_folder)])
    missing = "processor_config.json, tokenizer.json, tokenizer_config.json" + ("" if len(keep) == 2 else ", model.safetensors")
    assert str(error.value).startswith(f"error: --model {partial} lacks {missing}: give a directory written by")


def test_the_imagenet_command_of_the_manual(tiny_dir, image_folder, tmp_path):
    """The Evaluation page's ImageNet command with the tiny model and a 3-class ImageFolder in place of ImageNet."""
    from manual import bash_commands, run_command, section, workdir

    (command,) = bash_commands(section("evaluation.md", "Zero-shot image classification"))
    command = command.replace("flair-merged30m-hf", str(tiny_dir)).replace("/data/imagenet/val", str(image_folder))
    command = command.replace("--dataset imagenet-1k", "--dataset imagefolder")  # 3 classes here, not ImageNet's 1,000
    work = workdir(tmp_path)
    run_command(command, work)
    assert json.loads((work / "imagenet.json").read_text())["num_images"] == 9
