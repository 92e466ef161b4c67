"""The ONNX export read by a client nobody here wrote: transformers.js (`@huggingface/transformers` from the npm
registry, `demo/web/package-lock.json`) loads the towers with its own `CLIPTextModelWithProjection` /
`CLIPVisionModelWithProjection`, offline, from the export's `onnx/` folder. The page's input code (`demo/web/flair.js`:
open_clip's cleaning and truncation around transformers.js' tokenizer, Pillow's bicubic resize) must give our ids and
pixels, and the embeddings must be PyTorch's."""

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FIXTURES, ROOT
from flair_hf import FlairModel, FlairProcessor
from flair_hf.onnx import FlairOnnxModel
from flair_hf_conversion import export_onnx

WEB = ROOT / "demo" / "web"
BUNDLED = ROOT / "demo" / "flair-fashion-mosaics"
CASES = json.loads((FIXTURES / "tokenizer_cases.json").read_text())["cases"]
RESIZED = sorted(str(p) for p in (FIXTURES / "preprocess_images").iterdir())  # every one needs a resize or a crop
MOSAICS = sorted(str(p) for p in (ROOT / "demo" / "examples").glob("*.png"))  # the bundled model's size: no resize

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js (node) for transformers.js")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    assert (WEB / "node_modules" / "@huggingface" / "transformers").is_dir(), (
        "transformers.js is not installed: run npm ci --ignore-scripts --prefix demo/web"
    )
    directory = tmp_path_factory.mktemp("web") / "flair-onnx"
    export_onnx.export(BUNDLED, directory, quantize="int8")
    return directory


def run_transformers_js(directory, tmp_path, texts, images, dtype="fp32") -> dict:
    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps({"texts": texts, "images": images, "dtype": dtype}))
    result = subprocess.run(["node", str(WEB / "export_check.mjs"), str(directory), str(inputs)], capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    output = json.loads(result.stdout.splitlines()[-1])
    return {key: np.asarray(value["data"], dtype=np.float64).reshape(value["dims"]) for key, value in output.items()}


@pytest.fixture(scope="module")
def pytorch():
    return FlairModel.from_pretrained(BUNDLED).eval(), FlairProcessor.from_pretrained(BUNDLED)


def our_pixels(processor, images) -> np.ndarray:
    return processor(images=[Image.open(path) for path in images], return_tensors="pt")["pixel_values"].numpy()


def test_transformers_js_gives_our_token_ids_and_pytorchs_embeddings(exported, pytorch, tmp_path):
    """All the repository's tokenizer cases (the original's ids: long captions cut keeping <end_of_text>, curly
    quotes, mojibake, HTML entities); the text embeddings and, on images of the model's size, transformers.js' own
    image processor and the image embeddings, within 1e-4 of PyTorch (fp32)."""
    model, processor = pytorch
    texts = [case["text"] for case in CASES]
    got = run_transformers_js(exported, tmp_path, texts, MOSAICS)
    expected_ids = np.zeros((len(CASES), 77), dtype=np.int64)
    for row, case in enumerate(CASES):
        expected_ids[row, : len(case["input_ids"])] = case["input_ids"]
    assert (got["input_ids"] == expected_ids).all(), np.flatnonzero((got["input_ids"] != expected_ids).any(1))[:10]
    pixels = our_pixels(processor, MOSAICS)
    np.testing.assert_allclose(got["pixel_values"], pixels, atol=1e-6, rtol=0)
    with torch.no_grad():
        text_embeds = model.get_text_embeds(torch.from_numpy(expected_ids)).numpy()
        image_embeds = model.get_image_embeds(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(got["text_embeds"], text_embeds, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got["image_embeds"], image_embeds, atol=1e-4, rtol=0)


def test_the_pages_preprocessing_is_flair_image_processors_to_the_pixel(exported, pytorch, tmp_path):
    """`flair.js`' `pixelValues` on the repository's preprocessing cases (up- and downscaled, cropped, padded, grey,
    odd sizes): measured mean and largest difference 0 after normalisation's scale (the goal was mean <= 1/255), so
    the bound is one float32 rounding; the image embeddings of those pixels within 1e-4 of PyTorch's."""
    model, processor = pytorch
    got = run_transformers_js(exported, tmp_path, ["a"], RESIZED)
    pixels = our_pixels(processor, RESIZED)
    scale = np.asarray(processor.image_processor.image_std)[None, :, None, None]  # back to [0, 1] pixel units
    assert (np.abs(got["flair_pixel_values"] - pixels) * scale).max() < 1e-6
    with torch.no_grad():
        image_embeds = model.get_image_embeds(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(got["flair_image_embeds"], image_embeds, atol=1e-4, rtol=0)


def test_transformers_js_q8_loads_the_int8_graphs(exported, tmp_path):
    """`dtype: "q8"` reads the `_quantized` graphs: on the same inputs (dynamic quantization scales each call's
    activations, so the batch must be the same), the embeddings of ONNX Runtime's int8 graphs in Python, not the
    fp32 ones."""
    texts = [case["text"] for case in CASES[:20]]
    got = run_transformers_js(exported, tmp_path, texts, MOSAICS, dtype="q8")
    int8, fp32 = (FlairOnnxModel.from_pretrained(exported, precision=p) for p in ("int8", "fp32"))
    feeds = {"text": {"input_ids": got["input_ids"].astype(np.int64)},
             "image": {"pixel_values": got["pixel_values"].astype(np.float32)}}  # fmt: skip
    for graph, output in (("text", "text_embeds"), ("image", "image_embeds")):
        np.testing.assert_allclose(got[output], int8.sessions[graph].run(None, feeds[graph])[0], atol=1e-4, rtol=0)
        assert np.abs(got[output] - fp32.sessions[graph].run(None, feeds[graph])[0]).max() > 1e-3, graph
