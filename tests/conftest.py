"""Shared fixtures: reference data (copied from the original FLAIR code's outputs) and converted checkpoints."""

import json
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flair_hf_conversion import convert_flair_to_hf as converter
from flair_hf_conversion.manifest_weights import manifest_state_dict

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"

def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for servers and process groups the tests start)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MethodAsModule(torch.nn.Module):
    """A one-input method of a model as a module's `forward` (what `torch.jit.trace` and `torch.export` take)."""

    def __init__(self, model, method: str):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, inputs):
        return getattr(self.model, self.method)(inputs)


# the harness for transformers' common tests runs in its own directory (tests/test_transformers_common.py), not here
collect_ignore = ["transformers_common"]

TINY_OPEN_CLIP_CONFIG = json.loads((FIXTURES / "tiny" / "open_clip_config.json").read_text())["model_cfg"]


@pytest.fixture(scope="session")
def reference_inputs():
    inputs = json.loads((FIXTURES / "inputs.json").read_text())
    return {"images": [FIXTURES / "images" / name for name in inputs["images"]], "captions": inputs["captions"]}


@pytest.fixture(scope="session")
def tiny_reference():
    return load_file(FIXTURES / "tiny" / "reference_outputs.safetensors")


@pytest.fixture(scope="session")
def tiny_converted(tmp_path_factory):
    """Both original layouts of the tiny checkpoint, converted (with --verify)."""
    directories = {}
    for layout in ("flair-tiny-state-dict.pt", "flair-tiny-train-ckpt.pt"):
        output = tmp_path_factory.mktemp("tiny") / "model"
        converter.convert(str(FIXTURES / "tiny" / layout), output, TINY_OPEN_CLIP_CONFIG, run_verify=True)
        directories[layout] = output
    return directories


@pytest.fixture(scope="session")
def tiny_dir(tiny_converted):
    return tiny_converted["flair-tiny-state-dict.pt"]


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from flair_hf import FlairModel

    return FlairModel.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="session")
def tiny_scorer(tiny_dir, tiny_model):
    from flair_hf import FlairProcessor, FlairScorer

    return FlairScorer(tiny_model, FlairProcessor.from_pretrained(tiny_dir))


@pytest.fixture(scope="session")
def tiny_onnx(tiny_dir, tmp_path_factory):
    """The tiny model exported to ONNX (fp32) by the export CLI."""
    from flair_hf_conversion import export_onnx

    output = tmp_path_factory.mktemp("onnx") / "tiny-onnx"
    assert export_onnx.main([str(tiny_dir), str(output)]) == 0
    return output


@pytest.fixture(scope="session")
def full_size_checkpoint(tmp_path_factory):
    """The manifest recipe's seed-1000 weights written as an original open_clip `.pt` (bare state dict)."""
    path = tmp_path_factory.mktemp("full") / "vit-b-16-flair-seed1000.pt"
    torch.save(manifest_state_dict(FIXTURES / "vit-b-16-flair-state-dict-manifest.json", seed=1000), path)
    return path


@pytest.fixture(scope="session")
def full_size_dir(full_size_checkpoint, tmp_path_factory):
    output = tmp_path_factory.mktemp("full-hf") / "model"
    converter.convert(str(full_size_checkpoint), output)
    return output
