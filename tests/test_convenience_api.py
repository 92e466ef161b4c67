"""encode_text / encode_image / score on strings, paths, PIL images and arrays, directly and through remote code."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import FIXTURES, ROOT

IMAGE = FIXTURES / "images" / "puppy.jpg"
TEXTS = ["a small white puppy", "a red car", "two football players"]


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    from flair_hf import FlairModel, FlairProcessor

    return FlairModel.from_pretrained(tiny_dir).eval(), FlairProcessor.from_pretrained(tiny_dir)


def test_encode_text_equals_normalised_features(loaded):
    model, processor = loaded
    with torch.no_grad():
        expected = F.normalize(model.get_text_embeds(processor(text=TEXTS)["input_ids"]), dim=-1)
    torch.testing.assert_close(model.encode_text(TEXTS, batch_size=2, show_progress_bar=True), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.encode_text(TEXTS[0]), expected[:1], atol=1e-6, rtol=0)
    assert model.encode_text([]).shape == (0, model.config.projection_dim)


def test_encode_image_takes_paths_pil_and_arrays(loaded):
    model, processor = loaded
    picture = Image.open(IMAGE)
    with torch.no_grad():
        expected = F.normalize(model.get_image_embeds(processor(images=[picture])["pixel_values"]), dim=-1)
    embeddings = model.encode_image([str(IMAGE), picture, np.asarray(picture.convert("RGB"))], batch_size=2)
    assert embeddings.shape == (3, model.config.projection_dim)
    for row in embeddings:
        torch.testing.assert_close(row[None], expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="does not download images"):
        model.encode_image("https://example.com/cat.jpg")


def test_score_gives_flair_logits_and_probabilities(loaded):
    model, processor = loaded
    result = model.score(str(IMAGE), TEXTS)
    with torch.no_grad():
        logits = model(**processor(text=TEXTS, images=Image.open(IMAGE))).logits_per_image
    torch.testing.assert_close(result["logits"], logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(result["probs"], logits.softmax(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(result["sigmoid_probs"], torch.sigmoid(logits), atol=1e-6, rtol=0)


def test_in_memory_model_says_how_to_get_a_processor():
    from flair_hf import FlairConfig, FlairModel

    model = FlairModel(FlairConfig(projection_dim=16, text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2}, vision_config={"hidden_size": 16, "intermediate_size": 32,
                       "num_hidden_layers": 1, "num_attention_heads": 2}))  # fmt: skip
    with pytest.raises(ValueError, match="load the model with from_pretrained"):
        model.encode_text("a dog")


REMOTE = """
import json, sys
sys.path.insert(0, {tests!r})
import remote_code_probe  # makes flair_hf unimportable
from transformers import AutoModel
model = AutoModel.from_pretrained({model!r}, trust_remote_code=True).eval()
print(json.dumps({{"text": model.encode_text({texts!r}).tolist(), "logits": model.score({image!r}, {texts!r})["logits"].tolist()}}))
"""


def test_convenience_api_through_remote_code(tiny_dir, loaded, tmp_path):
    model, _ = loaded
    code = REMOTE.format(tests=str(ROOT / "tests"), model=str(tiny_dir), texts=TEXTS, image=str(IMAGE))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    torch.testing.assert_close(torch.tensor(remote["text"]), model.encode_text(TEXTS), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(remote["logits"]), model.score(str(IMAGE), TEXTS)["logits"], atol=1e-5, rtol=0)


def test_readme_three_line_example_runs(tiny_dir, tmp_path):
    from readme_blocks import run_readme_python

    assert "tensor([[" in run_readme_python("model.score(", tiny_dir, tmp_path)


def test_empty_inputs_are_one_line_errors(tiny_dir):
    from transformers import pipeline

    from flair_hf import FlairModel

    model = FlairModel.from_pretrained(tiny_dir).eval()
    image = str(FIXTURES / "images" / "puppy.jpg")
    with pytest.raises(ValueError, match=r"^score\(\) got 1 images and 0 texts: pass at least one of each$"):
        model.score(image, [])
    with pytest.raises(ValueError, match=r"^score\(\) got 0 images and 1 texts: pass at least one of each$"):
        model.score([], ["a puppy"])
    classifier = pipeline("zero-shot-image-classification", model=str(tiny_dir))
    with pytest.raises(ValueError, match=r"^FlairTokenizer got an empty list of texts \(e.g. candidate_labels=\[\]\): pass at least one$"):
        classifier(image, candidate_labels=[])
    with pytest.raises(ValueError, match=r"^FlairModel got 0 images in pixel_values: pass at least one$"):
        model(input_ids=torch.ones(1, 77, dtype=torch.long), pixel_values=torch.zeros(0, 3, 32, 32))
