"""Converted checkpoints reproduce every tensor the original FLAIR code computed (tests/fixtures)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, ROOT
from reference_tensors import model_outputs

TINY_TOLERANCE = 1e-5
FULL_SIZE_TOLERANCE = 1e-4


def assert_all_close(outputs: dict, reference: dict, tolerance: float, names=None):
    names = names or list(reference)
    assert names, "no reference tensors to compare"
    for name in names:
        got, expected = outputs[name].float(), reference[name].float()
        assert got.shape == expected.shape, f"{name}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
        difference = (got - expected).abs().max().item()
        assert difference <= tolerance, f"{name}: max abs difference {difference:.3e} > {tolerance}"


def run_remote_probe(model_dir: Path, images, captions, tmp_path: Path) -> dict:
    """Load `model_dir` in a fresh interpreter where `flair_hf` cannot be imported; return its outputs."""
    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps({"images": [str(p) for p in images], "captions": captions}))
    output = tmp_path / "outputs.safetensors"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "remote_code_probe.py"), str(model_dir), str(inputs), str(output)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["flair_hf_blocked"], "flair_hf was importable in the remote-code subprocess"
    assert all(module.startswith("transformers_modules.") for module in report["modules"]), report["modules"]
    return load_file(output)


def tiny_outputs(model, processor, images, captions) -> dict:
    encoding = processor(text=captions, images=[str(p) for p in images])
    return model_outputs(model, encoding["input_ids"], encoding["pixel_values"])


@pytest.mark.parametrize("layout", ["flair-tiny-state-dict.pt", "flair-tiny-train-ckpt.pt"])
def test_tiny_layouts_match_reference(layout, tiny_converted, tiny_reference, reference_inputs):
    from flair_hf import FlairModel, FlairProcessor

    model = FlairModel.from_pretrained(tiny_converted[layout]).eval()
    processor = FlairProcessor.from_pretrained(tiny_converted[layout])
    outputs = tiny_outputs(model, processor, reference_inputs["images"], reference_inputs["captions"])
    assert set(tiny_reference) <= set(outputs)
    assert_all_close(outputs, tiny_reference, TINY_TOLERANCE)


def test_tiny_forward_output_matches_reference(tiny_model, tiny_reference):
    ids, pixels = tiny_reference["input_ids"].long(), tiny_reference["pixel_values"]
    with torch.no_grad():
        output = tiny_model(input_ids=ids, pixel_values=pixels)
    assert_all_close(
        {"logits_per_image": output.logits_per_image, "logits_as_clip_per_image": output.logits_per_image_as_clip},
        tiny_reference, TINY_TOLERANCE, ["logits_per_image", "logits_as_clip_per_image"],
    )  # fmt: skip
    torch.testing.assert_close(output.logits_per_text, output.logits_per_image.t())


def test_tiny_remote_code_matches_reference(tiny_converted, tiny_reference, reference_inputs, tmp_path):
    outputs = run_remote_probe(
        tiny_converted["flair-tiny-train-ckpt.pt"], reference_inputs["images"], reference_inputs["captions"], tmp_path
    )
    assert_all_close(outputs, tiny_reference, TINY_TOLERANCE)


def test_full_size_remote_code_matches_seed1000_reference(full_size_dir, tmp_path):
    reference = load_file(FIXTURES / "vit-b-16-flair-seed1000-reference.safetensors")
    inputs = json.loads((FIXTURES / "vit-b-16-flair-seed1000-inputs.json").read_text())
    images = [FIXTURES / "images" / name for name in inputs["images"]]
    outputs = run_remote_probe(full_size_dir, images, inputs["captions"], tmp_path)
    outputs["image_token_embeds_first8"] = outputs["image_token_embeds"][:, :8]
    names = [name for name in reference if name != "input_ids"]
    assert len(names) == 10
    assert_all_close(outputs, reference, FULL_SIZE_TOLERANCE, names)
    assert torch.equal(outputs["input_ids"].long(), reference["input_ids"].long())
