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


KERNELS = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}
# compared with eager, each its own test: a kernel that is not installed is a skip that says so, not left out
IMPLEMENTATIONS = ["sdpa", "flex_attention"] + [
    pytest.param(name, marks=pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"{name} needs the {module} package"))
    for name, module in KERNELS.items()
]  # fmt: skip


def padding_mask(ids: torch.Tensor) -> torch.Tensor:
    """The processor's mask: every position up to the end-of-text token (the largest id)."""
    return (torch.arange(ids.shape[1], device=ids.device) <= ids.argmax(-1, keepdim=True)).long()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_implementations_agree_in_half_precision(tiny_dir, tiny_reference, dtype, implementation):
    ids, pixels = tiny_reference["input_ids"].long().cuda(), tiny_reference["pixel_values"].cuda().to(dtype)
    logits = {}
    for name in ("eager", implementation):
        model = FlairModel.from_pretrained(tiny_dir, dtype=dtype, attn_implementation=name).cuda().eval()
        with torch.no_grad():
            logits[name] = model(input_ids=ids, pixel_values=pixels, attention_mask=padding_mask(ids)).logits_per_image.float()
    tolerance = 8 * torch.finfo(dtype).eps  # relative (norm) error: a few rounding steps of the dtype
    error = torch.linalg.vector_norm(logits[implementation] - logits["eager"]) / torch.linalg.vector_norm(logits["eager"])
    assert error <= tolerance, (implementation, error.item(), tolerance)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_text_states_under_a_padding_mask_with_a_hole_agree_in_bf16(tiny_dir, tiny_reference, implementation):
    """The full text tower (hidden states asked for, so the 2-D mask reaches the kernels) under a padding mask with a
    hole: every kept state of the implementation equals eager's."""
    ids = tiny_reference["input_ids"].long().cuda()
    mask = padding_mask(ids)
    mask[0, 2] = 0
    kept = mask.bool()
    states = {}
    for name in ("eager", implementation):
        model = FlairModel.from_pretrained(tiny_dir, dtype=torch.bfloat16, attn_implementation=name).cuda().eval()
        with torch.no_grad():
            states[name] = model.text_model(ids, mask, output_hidden_states=True).hidden_states[-1][kept].float()
    tolerance = 8 * torch.finfo(torch.bfloat16).eps  # relative (norm) error: a few rounding steps of the dtype
    error = torch.linalg.vector_norm(states[implementation] - states["eager"]) / torch.linalg.vector_norm(states["eager"])
    assert error <= tolerance, (implementation, error.item(), tolerance)
