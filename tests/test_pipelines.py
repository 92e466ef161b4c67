"""transformers pipelines with FLAIR: zero-shot image classification, with `import flair_hf` and with remote code only."""

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
import json, sys
sys.path.insert(0, {tests!r})
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

    import flair_hf  # noqa: F401  (registers FlairModel for the pipeline)

    classifier = pipeline("zero-shot-image-classification", model=str(tiny_dir))
    result = classifier(str(FIXTURES / "images" / "puppy.jpg"), candidate_labels=LABELS)
    expected = expected_scores(tiny_model, tiny_dir)
    assert [r["label"] for r in result] == sorted(expected, key=expected.get, reverse=True)
    for r in result:
        assert r["score"] == pytest.approx(expected[r["label"]], abs=1e-5)


def test_zero_shot_pipeline_from_remote_code_only(tiny_dir, tiny_model, tmp_path):
    code = REMOTE.format(tests=str(ROOT / "tests"), model=str(tiny_dir), image=str(FIXTURES / "images" / "puppy.jpg"), labels=LABELS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = {r["label"]: r["score"] for r in json.loads(result.stdout.strip().splitlines()[-1])}
    expected = expected_scores(tiny_model, tiny_dir)
    assert scores == pytest.approx(expected, abs=1e-5)
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModelForZeroShotImageClassification"] == "modeling_flair.FlairModel"


def test_readme_pipeline_example_runs(tiny_dir, tmp_path):
    import re

    readme = (ROOT / "README.md").read_text()
    example = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "zero-shot-image-classification" in b)
    example = example.replace('"flair-cc3m-recap-hf"', repr(str(tiny_dir))) + "\nprint(classifier.__class__.__name__)\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", example], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ZeroShotImageClassificationPipeline" in result.stdout
