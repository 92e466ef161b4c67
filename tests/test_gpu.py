"""CUDA checks (skipped without a GPU): reference parity on the GPU and attention implementations in half precision."""

import importlib.util

import pytest
import torch

from flair_hf import FlairModel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_reference_parity_on_cuda(tiny_dir, tiny_reference):
    model = FlairModel.from_pretrained(tiny_dir).cuda().eval()
    with torch.no_grad():
        out = model(input_ids=tiny_reference["input_ids"].long().cuda(), pixel_values=tiny_reference["pixel_values"].cuda())
    for name, got in (("logits_per_image", out.logits_per_image), ("logits_as_clip_per_image", out.logits_per_image_as_clip)):
        assert (got.cpu() - tiny_reference[name]).abs().max() <= 1e-4, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_implementations_agree_in_half_precision(tiny_dir, tiny_reference, dtype):
    implementations = ["eager", "sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])
    ids, pixels = tiny_reference["input_ids"].long().cuda(), tiny_reference["pixel_values"].cuda().to(dtype)
    logits = {}
    for implementation in implementations:
        model = FlairModel.from_pretrained(tiny_dir, dtype=dtype, attn_implementation=implementation).cuda().eval()
        with torch.no_grad():
            logits[implementation] = model(input_ids=ids, pixel_values=pixels).logits_per_image.float()
    for implementation in implementations[1:]:
        assert (logits[implementation] - logits["eager"]).abs().max() < 0.1, implementation
