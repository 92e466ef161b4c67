"""An independent FLAIR forward pass computed straight from the original open_clip tensors.

It follows the original model's structure (open_clip `ResidualAttentionBlock`s with fused `in_proj` weights and
torch's own `nn.MultiheadAttention`, FLAIR's `visual_proj` with `add_zero_attn=True`) and shares no code with
`flair_hf.modeling_flair`, so agreement between the two is evidence that the conversion is right.
"""

import torch
import torch.nn.functional as F
from torch import nn


def _multihead_attention(tensors: dict, prefix: str, num_heads: int, add_zero_attn: bool = False) -> nn.MultiheadAttention:
    weight = tensors[f"{prefix}.in_proj_weight"]
    attention = nn.MultiheadAttention(weight.shape[1], num_heads, batch_first=True, add_zero_attn=add_zero_attn)
    attention.load_state_dict(
        {
            "in_proj_weight": weight,
            "in_proj_bias": tensors[f"{prefix}.in_proj_bias"],
            "out_proj.weight": tensors[f"{prefix}.out_proj.weight"],
            "out_proj.bias": tensors[f"{prefix}.out_proj.bias"],
        }
    )
    return attention.eval()


def _layer_norm(x: torch.Tensor, tensors: dict, prefix: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], tensors[f"{prefix}.weight"], tensors[f"{prefix}.bias"], eps=1e-5)


def _transformer(x: torch.Tensor, tensors: dict, prefix: str, num_heads: int, attn_mask=None) -> torch.Tensor:
    """open_clip `Transformer`: pre-LN residual blocks, exact GELU MLP."""
    layer = 0
    while f"{prefix}.resblocks.{layer}.ln_1.weight" in tensors:
        block = f"{prefix}.resblocks.{layer}"
        attention = _multihead_attention(tensors, f"{block}.attn", num_heads)
        h = _layer_norm(x, tensors, f"{block}.ln_1")
        x = x + attention(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
        h = _layer_norm(x, tensors, f"{block}.ln_2")
        h = F.gelu(F.linear(h, tensors[f"{block}.mlp.c_fc.weight"], tensors[f"{block}.mlp.c_fc.bias"]))
        x = x + F.linear(h, tensors[f"{block}.mlp.c_proj.weight"], tensors[f"{block}.mlp.c_proj.bias"])
        layer += 1
    return x


@torch.no_grad()
def original_forward(
    tensors: dict, pixel_values: torch.Tensor, input_ids: torch.Tensor, vision_heads: int, text_heads: int, pooling_heads: int = 8
) -> dict:
    """FLAIR outputs for `pixel_values` `(B, 3, H, W)` and `input_ids` `(T, 77)` from an original state dict (fp32)."""
    tensors = {key: value.float() for key, value in tensors.items()}
    patch = tensors["visual.conv1.weight"]
    x = F.conv2d(pixel_values, patch, stride=patch.shape[-1]).flatten(2).transpose(1, 2)
    cls = tensors["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + tensors["visual.positional_embedding"]
    x = _layer_norm(x, tensors, "visual.ln_pre")
    x = _layer_norm(_transformer(x, tensors, "visual.transformer", vision_heads), tensors, "visual.ln_post")
    image_embeds = x[:, 0] @ tensors["image_post.proj"]
    image_token_embeds = x[:, 1:] @ tensors["image_post.proj"]

    length = input_ids.shape[1]
    causal = torch.full((length, length), float("-inf")).triu(1)
    t = tensors["token_embedding.weight"][input_ids] + tensors["positional_embedding"][:length]
    t = _layer_norm(_transformer(t, tensors, "transformer", text_heads, attn_mask=causal), tensors, "ln_final")
    text_embeds = t[torch.arange(t.shape[0]), input_ids.argmax(dim=-1)] @ tensors["text_post.proj"]

    pooling = _multihead_attention(tensors, "visual_proj.attn", pooling_heads, add_zero_attn=True)
    queries = _layer_norm(text_embeds, tensors, "visual_proj.ln_q").expand(image_embeds.shape[0], -1, -1)
    keys = _layer_norm(image_token_embeds, tensors, "visual_proj.ln_k")
    values = _layer_norm(image_token_embeds, tensors, "visual_proj.ln_v")
    pooled, attention = pooling(queries, keys, values, need_weights=True, average_attn_weights=True)

    scale, bias = tensors["logit_scale"].exp(), tensors["logit_bias"]
    text_normed = F.normalize(text_embeds, dim=-1)
    logits_per_image = scale * torch.einsum("btd,td->bt", F.normalize(pooled, dim=-1), text_normed) + bias
    logits_as_clip = scale * F.normalize(image_embeds, dim=-1) @ text_normed.t()
    return {
        "image_embeds": image_embeds,
        "image_token_embeds": image_token_embeds,
        "text_embeds": text_embeds,
        "text_conditioned_image_embeds": pooled,
        "pooling_attention_mean": attention,
        "logits_per_image": logits_per_image,
        "logits_as_clip_per_image": logits_as_clip,
    }
