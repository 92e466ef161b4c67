"""sentence-transformers loads a converted FLAIR directory (remote code only) and embeds texts and images into the
shared space, equal to the model's own global embeddings."""

import json
import os
import subprocess
import sys

import torch

from conftest import FIXTURES, ROOT

TEXTS = ["a small white puppy", "a red car"]
CODE = """
import json
import remote_code_probe  # makes flair_hf unimportable
from PIL import Image
from sentence_transformers import SentenceTransformer
model = SentenceTransformer({model!r}, trust_remote_code=True, device="cpu")
texts = model.encode({texts!r}, normalize_embeddings=True)
images = model.encode([Image.open({image!r})], normalize_embeddings=True)
print(json.dumps({{"texts": texts.tolist(), "images": images.tolist(), "similarity": model.similarity(images, texts).tolist()}}))
"""


def test_sentence_transformer_embeds_texts_and_images(tiny_dir, tiny_scorer, tmp_path):
    image = str(FIXTURES / "images" / "puppy.jpg")
    code = CODE.format(model=str(tiny_dir), texts=TEXTS, image=image)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": str(ROOT / "tests")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    texts, images = tiny_scorer.encode_text(TEXTS), tiny_scorer.encode_image(image)
    torch.testing.assert_close(torch.tensor(out["texts"]), texts, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(out["images"]), images, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(out["similarity"]), images @ texts.t(), atol=1e-5, rtol=0)  # CLIP-style cosine
