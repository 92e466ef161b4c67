"""transformers pipelines with FLAIR: zero-shot image classification, with `flair_hf.register_auto_classes()` and with remote code only."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import FIXTURES, ROOT

LABELS = ["a small white puppy", "a red car", "two football players"]
REMOTE = """
import json
import remote_code_probe  # makes flair_hf unimportable
from transformers import pipeline
classifier = pipeline("zero-shot-image-classification", model={model!r}, trust_remote_code=True)
assert type(classifier.model).__module__.startswith("transformers_modules."), type(classifier.model).__module__
print(json.dumps(classifier({image!r}, candidate_labels={labels!r})))
"""


def expected_scores(tiny_model, tiny_dir):
    """Softmax over the candidates of the model's own FLAIR logits for the pipeline's default prompts."""
    from flair_hf import FlairProcessor

    processor = FlairProcessor.from_pretrained(tiny_dir)
    inputs = processor(text=[f"This is a photo of {label}." for label in LABELS], images=Image.open(FIXTURES / "images" / "puppy.jpg"))
    with torch.no_grad():
        probabilities = tiny_model(**inputs).logits_per_image[0].softmax(-1)
    return dict(zip(LABELS, probabilities.tolist()))


def test_zero_shot_pipeline_with_flair_hf_uses_flair_logits(tiny_dir, tiny_model):
    from transformers import pipeline

    import flair_hf

    flair_hf.register_auto_classes()  # FlairModel for the pipeline, no trust_remote_code

    classifier = pipeline("zero-shot-image-classification", model=str(tiny_dir))
    result = classifier(str(FIXTURES / "images" / "puppy.jpg"), candidate_labels=LABELS)
    expected = expected_scores(tiny_model, tiny_dir)
    assert [r["label"] for r in result] == sorted(expected, key=expected.get, reverse=True)
    for r in result:
        assert r["score"] == pytest.approx(expected[r["label"]], abs=1e-5)


def test_zero_shot_pipeline_from_remote_code_only(tiny_dir, tiny_model, tmp_path):
    code = REMOTE.format(model=str(tiny_dir), image=str(FIXTURES / "images" / "puppy.jpg"), labels=LABELS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": str(ROOT / "tests")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = {r["label"]: r["score"] for r in json.loads(result.stdout.strip().splitlines()[-1])}
    expected = expected_scores(tiny_model, tiny_dir)
    assert scores == pytest.approx(expected, abs=1e-5)
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModelForZeroShotImageClassification"] == "modeling_flair.FlairModel"


FEATURES_REMOTE = """
import json
import remote_code_probe  # makes flair_hf unimportable
from transformers import pipeline
extractor = pipeline("image-feature-extraction", model={model!r}, trust_remote_code=True)
print(json.dumps(extractor({image!r})))
"""


def test_image_feature_extraction_pipeline_gives_the_global_embedding(tiny_dir, tiny_scorer, tmp_path):
    from transformers import pipeline

    import flair_hf

    flair_hf.register_auto_classes()

    image = str(FIXTURES / "images" / "puppy.jpg")
    expected = tiny_scorer.encode_image(image)
    features = pipeline("image-feature-extraction", model=str(tiny_dir))(image, return_tensors=True)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)
    code = FEATURES_REMOTE.format(model=str(tiny_dir), image=image)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": str(ROOT / "tests")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.tensor(json.loads(result.stdout.strip().splitlines()[-1])), expected, atol=1e-5, rtol=0)


def test_single_tower_forward(tiny_model, tiny_reference):
    pixels, ids = tiny_reference["pixel_values"][:2], tiny_reference["input_ids"].long()[:3]
    with torch.no_grad():
        images = tiny_model(pixel_values=pixels)
        texts = tiny_model(input_ids=ids)
        torch.testing.assert_close(images.image_token_embeds, tiny_model.get_image_token_features(pixels))
        torch.testing.assert_close(images[0], torch.nn.functional.normalize(tiny_model.get_image_embeds(pixels), dim=-1))
        torch.testing.assert_close(texts[0], torch.nn.functional.normalize(tiny_model.get_text_embeds(ids), dim=-1))
        assert images.logits_per_image is None and texts.image_embeds is None
    with pytest.raises(ValueError, match="needs input_ids and pixel_values"):
        tiny_model(pixel_values=pixels, return_loss=True, captions_per_image=1)


def test_zero_shot_pipeline_with_global_scoring_model(tiny_dir, tiny_model):
    from flair_hf import FlairModelForGlobalScoring, FlairProcessor
    from manual import BUNDLED_MODEL, python_block

    code = python_block("api.md", "FlairModelForGlobalScoring").replace(BUNDLED_MODEL, repr(str(tiny_dir)))
    scope = {}
    exec(code.rsplit("\n", 2)[0], scope)  # the manual's lines, up to the call
    result = scope["classifier"](str(FIXTURES / "images" / "puppy.jpg"), candidate_labels=LABELS)
    inputs = FlairProcessor.from_pretrained(tiny_dir)(
        text=[f"This is a photo of {label}." for label in LABELS], images=Image.open(FIXTURES / "images" / "puppy.jpg")
    )
    with torch.no_grad():
        output = tiny_model(**inputs)
        expected = output.logits_per_image_as_clip[0].softmax(-1)
        global_output = FlairModelForGlobalScoring.from_pretrained(tiny_dir).eval()(**inputs)
    assert {r["label"]: r["score"] for r in result} == pytest.approx(dict(zip(LABELS, expected.tolist())), abs=1e-5)
    torch.testing.assert_close(global_output.logits_per_image, output.logits_per_image_as_clip, atol=1e-6, rtol=0)
    torch.testing.assert_close(global_output.logits_per_text, output.logits_per_text_as_clip, atol=1e-6, rtol=0)
    assert not torch.allclose(output.logits_per_image, output.logits_per_image_as_clip)  # the two differ


def test_save_pretrained_leaves_the_model_config_alone(tmp_path):
    from flair_hf import FlairConfig, FlairModel

    small = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    model = FlairModel(FlairConfig(projection_dim=16, text_config=small, vision_config={**small, "image_size": 32}))
    assert getattr(model.config, "auto_map", None) is None
    model.save_pretrained(tmp_path / "saved")
    assert getattr(model.config, "auto_map", None) is None  # (architectures and dtype are set by transformers itself)
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForZeroShotImageClassification"] == "modeling_flair.FlairModel"
