"""The original FLAIR, as its own code computes it: an independent reference for the converter and a speed baseline.

open_clip's `ResidualAttentionBlock`s (one fused `in_proj` per `nn.MultiheadAttention`, `need_weights=False`, a float
causal mask for the text), `x @ proj` projections, FLAIR's `visual_proj` pooling as
`nn.MultiheadAttention(add_zero_attn=True)` over `ln_q/ln_k/ln_v`, and the original's loss (the selected texts of
every image gathered into `(B, B + K - 1, D)` queries, then the global `(B, B * K)` multi-positive grid). Parameter
names are the released checkpoints' own. It shares no code with `flair_hf.modeling_flair`, so agreement between the
two is evidence that the conversion is right; `benchmarks/benchmark_training.py` times its training step.
"""

import torch
import torch.nn.functional as F
from torch import nn


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, intermediate: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, intermediate))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(intermediate, width))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, intermediate: int):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, intermediate) for _ in range(layers)])

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, vision):
        super().__init__()
        width, grid = vision.hidden_size, vision.image_size // vision.patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=vision.patch_size, stride=vision.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width**-0.5)
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width) * width**-0.5)
        self.ln_pre = nn.LayerNorm(width)
        heads = vision.num_attention_heads
        self.transformer = Transformer(width, vision.num_hidden_layers, heads, vision.intermediate_size)
        self.ln_post = nn.LayerNorm(width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1)
        x = self.ln_pre(x + self.positional_embedding.to(x.dtype))
        return self.ln_post(self.transformer(x))


class Projection(nn.Module):
    def __init__(self, width: int, dim: int):
        super().__init__()
        self.proj = nn.Parameter(torch.randn(width, dim) * width**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.proj


class AttentionPooling(nn.Module):
    """FLAIR's `visual_proj`: texts query an image's tokens through `nn.MultiheadAttention(add_zero_attn=True)`."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True, add_zero_attn=True)
        self.ln_q, self.ln_k, self.ln_v = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor, need_weights: bool = False):
        """Pooled `(B, M, D)` for queries `(B, M, D)` over tokens `(B, L, D)`, and the head-averaged weights if asked."""
        pooled, weights = self.attn(self.ln_q(queries), self.ln_k(tokens), self.ln_v(tokens), need_weights=need_weights)
        return (pooled, weights) if need_weights else pooled


class OriginalFlair(nn.Module):
    """FLAIR as the original code computes it, with the released checkpoints' parameter names."""

    def __init__(self, config):
        super().__init__()
        text, vision, dim = config.text_config, config.vision_config, config.projection_dim
        self.visual = VisionTransformer(vision)
        self.transformer = Transformer(text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.intermediate_size)
        self.token_embedding = nn.Embedding(text.vocab_size, text.hidden_size)
        self.positional_embedding = nn.Parameter(torch.randn(text.max_position_embeddings, text.hidden_size) * 0.01)
        self.ln_final = nn.LayerNorm(text.hidden_size)
        self.text_post = Projection(text.hidden_size, dim)
        self.image_post = Projection(vision.hidden_size, dim)
        self.visual_proj = AttentionPooling(dim, config.pooling_num_attention_heads)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.logit_bias = nn.Parameter(torch.tensor(config.logit_bias_init_value))
        context = text.max_position_embeddings
        self.register_buffer("attn_mask", torch.full((context, context), float("-inf")).triu(1), persistent=False)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:length]
        x = self.ln_final(self.transformer(x, self.attn_mask[:length, :length]))
        return self.text_post(x[torch.arange(x.shape[0]), ids.argmax(dim=-1)])

    def encode_image(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.image_post(self.visual(pixels))
        return x[:, 0], x[:, 1:]

    def loss(self, ids: torch.Tensor, pixels: torch.Tensor, captions_per_image: int, text_indices: torch.Tensor):
        """The original FLAIR loss: (text-conditioned sigmoid + multi-positive sigmoid) / 2, one process."""
        return self.loss_from_features(self.encode_text(ids), *self.encode_image(pixels), captions_per_image, text_indices)

    def loss_from_features(self, text_features, image_features, image_tokens, captions_per_image: int, text_indices):
        scale, bias = self.logit_scale.exp(), self.logit_bias
        selected = text_features[text_indices]  # (B, B + K - 1, D)
        local = F.normalize(self.visual_proj(selected, image_tokens), dim=-1)
        tcs_logits = scale * (local * F.normalize(selected, dim=-1)).sum(-1) + bias
        images = torch.arange(image_features.shape[0], device=text_indices.device)[:, None]
        tcs_labels = 2 * (text_indices // captions_per_image == images).float() - 1
        tcs = -F.logsigmoid(tcs_labels * tcs_logits).sum() / tcs_logits.shape[1]
        mps_logits = scale * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).t() + bias
        texts = torch.arange(text_features.shape[0], device=text_indices.device)[None, :]
        mps_labels = 2 * (texts // captions_per_image == images).float() - 1
        mps = -F.logsigmoid(mps_labels * mps_logits).sum() / mps_logits.shape[1]
        return (tcs + mps) / 2


@torch.no_grad()
def original_forward(tensors: dict, pixel_values: torch.Tensor, input_ids: torch.Tensor, config) -> dict:
    """FLAIR outputs for `pixel_values` `(B, 3, H, W)` and `input_ids` `(T, n)` from an original state dict (fp32);
    `config` is the matching `FlairConfig` (sizes and head counts)."""
    model = OriginalFlair(config).eval()
    model.load_state_dict({key: value.float() for key, value in tensors.items()})
    image_embeds, image_token_embeds = model.encode_image(pixel_values)
    text_embeds = model.encode_text(input_ids)
    queries = text_embeds.expand(image_embeds.shape[0], -1, -1)
    pooled, attention = model.visual_proj(queries, image_token_embeds, need_weights=True)
    scale, bias = model.logit_scale.exp(), model.logit_bias
    text_normed = F.normalize(text_embeds, dim=-1)
    return {
        "image_embeds": image_embeds,
        "image_token_embeds": image_token_embeds,
        "text_embeds": text_embeds,
        "text_conditioned_image_embeds": pooled,
        "pooling_attention_mean": attention,
        "logits_per_image": scale * torch.einsum("btd,td->bt", F.normalize(pooled, dim=-1), text_normed) + bias,
        "logits_as_clip_per_image": scale * F.normalize(image_embeds, dim=-1) @ text_normed.t(),
    }


def attention_pooling_of(pooling) -> AttentionPooling:
    """`FlairTextConditionedPooling`'s weights in the original's pooling block (`visual_proj`): fused `in_proj`."""
    block = AttentionPooling(pooling.embed_dim, pooling.num_heads)
    block.load_state_dict({
        "attn.in_proj_weight": torch.cat([pooling.q_proj.weight, pooling.k_proj.weight, pooling.v_proj.weight]),
        "attn.in_proj_bias": torch.cat([pooling.q_proj.bias, pooling.k_proj.bias, pooling.v_proj.bias]),
        "attn.out_proj.weight": pooling.out_proj.weight, "attn.out_proj.bias": pooling.out_proj.bias,
        **{f"ln_{name}.{part}": getattr(getattr(pooling, f"{long}_layer_norm"), part)
           for name, long in (("q", "query"), ("k", "key"), ("v", "value")) for part in ("weight", "bias")},
    })  # fmt: skip
    return block.to(pooling.q_proj.weight.device).eval()


@torch.no_grad()
def original_pair_scores(block: AttentionPooling, text_embeds: torch.Tensor, image_token_embeds: torch.Tensor) -> torch.Tensor:
    """FLAIR cosines `(B, T)` as the original's evaluation computes them: per image, one call of the pooling block
    with all texts as queries (`need_weights=False`, its default), then the cosine with each text."""
    texts = F.normalize(text_embeds, dim=-1)
    rows = [(F.normalize(block(text_embeds[None], tokens[None])[0], dim=-1) * texts).sum(-1) for tokens in image_token_embeds]
    return torch.stack(rows)
