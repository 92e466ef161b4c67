"""Every attention implementation on the processor's real output (padding mask included): FLAIR's logits, text
embeddings and pooled embeddings equal eager's, and so do the text tower's states under a mask with a hole (where the
2-D mask reaches the kernels). The flash paths (flash_attention_2 and _3) run transformers' own
`flash_attention_forward` with only the kernel replaced by an emulation of flash-attn's contract, checked first on
transformers' CLIPModel."""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import FIXTURES

CAPTIONS = ["a puppy", "a small white puppy with black ears sits in front of a closed white door", "a red ladybug"]


def _attend(q, k, v, softmax_scale, causal):
    """(L, heads, D) each -> (L, heads, D); a causal mask aligned at the bottom right, as flash-attn >= 2.1."""
    mask = None
    if causal:
        mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril(k.shape[0] - q.shape[0])
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=softmax_scale)
    return out.transpose(0, 1)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):  # fmt: skip
    """flash-attn's dense call: (B, L, heads, D) tensors."""
    return torch.stack([_attend(q[b], k[b], v[b], softmax_scale, causal) for b in range(q.shape[0])])


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False):  # fmt: skip
    """flash-attn's variable-length call: sequences packed along dim 0, bounded by the cumulative lengths."""
    pieces = [
        _attend(q[cu_seqlens_q[i] : cu_seqlens_q[i + 1]], k[cu_seqlens_k[i] : cu_seqlens_k[i + 1]],
                v[cu_seqlens_k[i] : cu_seqlens_k[i + 1]], softmax_scale, causal)  # fmt: skip
        for i in range(len(cu_seqlens_q) - 1)
    ]
    return torch.cat(pieces)


@pytest.fixture
def emulated_flash(monkeypatch):
    import transformers.modeling_flash_attention_utils as utils

    def lazy_imports(implementation, attention_wrapper=None, allow_all_kernels=False):
        return flash_attn_func, flash_attn_varlen_func, None, utils._pad_input, utils._unpad_input

    monkeypatch.setattr(utils, "_lazy_imports", lazy_imports)
    monkeypatch.setattr(utils, "_loaded_implementation", None)
    yield
    utils._loaded_implementation = None  # the next user loads its own kernel


def use_attention(model, implementation: str):
    """Switch every (sub-)config's attention implementation without the loader's availability checks."""
    for config in {id(c): c for c in (model.config, *(getattr(model.config, n, None) for n in ("text_config", "vision_config"))) if c}.values():
        config._attn_implementation = implementation
    return model


@pytest.fixture(scope="module")
def processed(tiny_dir):
    from flair_hf import FlairProcessor

    processor = FlairProcessor.from_pretrained(tiny_dir)
    images = [Image.open(FIXTURES / "images" / name) for name in ("puppy.jpg", "arsenal.jpg")]
    inputs = processor(text=CAPTIONS, images=images, padding="longest")
    assert not bool(inputs["attention_mask"].all())  # real padding
    return inputs


def test_the_flash_emulation_reproduces_clip(tiny_dir, processed, emulated_flash):
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(tiny_dir, attn_implementation="eager").eval()
    text = {key: processed[key] for key in ("input_ids", "attention_mask")}
    with torch.no_grad():
        eager = clip.get_text_features(**text)
        flash = use_attention(clip, "flash_attention_2").get_text_features(**text)
    torch.testing.assert_close(_tensor(flash), _tensor(eager), atol=2e-5, rtol=2e-5)


def _tensor(output):
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@pytest.mark.parametrize("implementation", ["sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"])
def test_every_attention_implementation_equals_eager_with_a_padding_mask(tiny_dir, processed, implementation, emulated_flash):
    from flair_hf import FlairModel

    model = FlairModel.from_pretrained(tiny_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        eager = model(**processed)
        other = use_attention(model, implementation)(**processed)
    for name in ("logits_per_image", "logits_per_image_as_clip", "text_embeds", "text_conditioned_image_embeds"):
        torch.testing.assert_close(getattr(other, name), getattr(eager, name), atol=2e-5, rtol=2e-5, msg=name)


@pytest.mark.parametrize("implementation", ["sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"])
def test_text_tower_states_with_a_hole_in_the_padding_mask_equal_eager(
    tiny_dir, processed, implementation, emulated_flash
):
    """The full text tower (hidden states asked for) under a padding mask with a hole before the end-of-text token:
    every state that the mask keeps, and the pooled output, equal eager's (flex gets transformers' BlockMask)."""
    from flair_hf import FlairModel

    model = FlairModel.from_pretrained(tiny_dir, attn_implementation="eager").eval()
    ids, mask = processed["input_ids"], processed["attention_mask"].clone()
    mask[1, 3] = 0
    kept = mask.bool()  # a masked position's own state depends on how its query row is treated; no kept one does
    with torch.no_grad():
        eager = model.text_model(ids, mask, output_hidden_states=True)
        other = use_attention(model, implementation).text_model(ids, mask, output_hidden_states=True)
    torch.testing.assert_close(other.pooler_output, eager.pooler_output, atol=2e-5, rtol=2e-5)
    assert len(other.hidden_states) == len(eager.hidden_states) == model.config.text_config.num_hidden_layers + 1
    for layer, (ours, reference) in enumerate(zip(other.hidden_states, eager.hidden_states)):
        torch.testing.assert_close(ours[kept], reference[kept], atol=2e-5, rtol=2e-5, msg=f"hidden state {layer}")
    with torch.no_grad():
        assert (model.text_model(ids, processed["attention_mask"]).pooler_output - other.pooler_output)[1].abs().max() > 1e-4
