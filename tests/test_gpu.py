"""CUDA checks (skipped without a GPU): reference parity on the GPU and attention implementations in half precision."""

import importlib.util

import pytest
import torch

from flair_hf import FlairModel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def no_tf32():
    """fp32 parity needs true fp32: cuBLAS and cuDNN (the patch convolution) may otherwise use TF32 on Ampere+."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_reference_parity_on_cuda(tiny_dir, tiny_reference, no_tf32):
    model = FlairModel.from_pretrained(tiny_dir).cuda().eval()
    with torch.no_grad():
        out = model(input_ids=tiny_reference["input_ids"].long().cuda(), pixel_values=tiny_reference["pixel_values"].cuda())
    for name, got in (("logits_per_image", out.logits_per_image), ("logits_as_clip_per_image", out.logits_per_image_as_clip)):
        assert (got.cpu() - tiny_reference[name]).abs().max() <= 1e-4, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_implementations_agree_in_half_precision(tiny_dir, tiny_reference, dtype):
    implementations = ["eager", "sdpa", "flex_attention"]
    implementations += ["flash_attention_2"] if importlib.util.find_spec("flash_attn") else []
    ids, pixels = tiny_reference["input_ids"].long().cuda(), tiny_reference["pixel_values"].cuda().to(dtype)
    logits = {}
    for implementation in implementations:
        model = FlairModel.from_pretrained(tiny_dir, dtype=dtype, attn_implementation=implementation).cuda().eval()
        with torch.no_grad():
            logits[implementation] = model(input_ids=ids, pixel_values=pixels).logits_per_image.float()
    tolerance = 8 * torch.finfo(dtype).eps  # relative (norm) error: a few rounding steps of the dtype
    for implementation in implementations[1:]:
        error = torch.linalg.vector_norm(logits[implementation] - logits["eager"]) / torch.linalg.vector_norm(logits["eager"])
        assert error <= tolerance, (implementation, error.item(), tolerance)
