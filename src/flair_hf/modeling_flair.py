"""PyTorch FLAIR model: CLIP towers plus FLAIR's text-conditioned attention pooling over image patch tokens.

Parameter names of everything FLAIR shares with CLIP follow `transformers.CLIPModel`, so a FLAIR checkpoint also
loads into `CLIPModel` (for global, CLIP-style matching) with only `text_conditioned_pooling.*` and `logit_bias`
left over. This file is self-contained: it does not import transformers' CLIP modules.
"""

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .configuration_flair import FlairConfig, FlairTextConfig, FlairVisionConfig
from .loss import distributed_flair_loss, flair_loss
from .scoring import PAIR_IMAGE_CHUNK_SIZE, PAIR_TEXT_CHUNK_SIZE, flair_cosine, length_sorted_groups, logits, pair_blocks, pairwise_cosine
from .text_packing import TextPacking, at_positions, text_tower_calls


CLIP_OUTPUT_SLOTS = ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds", "text_model_output", "vision_model_output")  # fmt: skip


@dataclass
class FlairOutput(ModelOutput):
    r"""
    Output of [`FlairModel.forward`] for `B` images and `T` texts (`D` = projection dim, `L` = patch tokens).

    The first seven fields are `CLIPOutput`'s, in its order; FLAIR's own follow. The `return_dict=False` tuple has
    CLIP's positions: `loss` first when there is one, then CLIP's six other fields, each in its slot even when `None`
    (e.g. the logits under `return_loss=True`), then FLAIR's fields that are set. Single-tower calls, which CLIP has
    no output for, give only the fields that are set (the embeddings first).

    loss (with `return_loss=True`): the FLAIR training loss (see `flair_hf.loss`); the logits are then not computed.
    logits_per_image (`(B, T)`): FLAIR logits, `exp(logit_scale) * cos(pool(text_j | image_i), text_j) + logit_bias`
        (the CLIP-style ones in [`FlairModelForGlobalScoring`]).
    logits_per_text (`(T, B)`): the transpose of `logits_per_image`.
    text_embeds (`(T, D)`): normalised global text embeddings.
    image_embeds (`(B, D)`): normalised global image embeddings.
    text_model_output, vision_model_output: the towers' outputs (`pooler_output`, `last_hidden_state`, and
        `hidden_states` / `attentions` when asked for). The text tower's `last_hidden_state` is computed (over all
        positions) only with `output_hidden_states` or `output_attentions`; otherwise each caption runs only up to its
        end-of-text token, all that reaches `pooler_output` under the causal mask, and `last_hidden_state` is `None`.
    logits_per_image_as_clip (`(B, T)`): global CLIP-style logits, `exp(logit_scale) * cos(image_i, text_j)`, no bias.
    logits_per_text_as_clip (`(T, B)`): the transpose of `logits_per_image_as_clip`.
    text_conditioned_image_embeds (`(B, T, D)`): normalised output of the pooling head for every pair.
    image_token_embeds (`(B, L, D)`, image-only calls): projected patch tokens, as `get_image_token_features`.
    pooling_attentions (`(B, heads, T, L + 1)`, with `output_attentions=True`): attention weights of the pooling head.
        Slots `0..L-1` are the patch tokens in row-major order; slot `L` is the zero-attention slot
        (`add_zero_attn=True` in the original): a zero key and value that lets a query attend to "nothing".
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None
    logits_per_image_as_clip: torch.FloatTensor | None = None
    logits_per_text_as_clip: torch.FloatTensor | None = None
    text_conditioned_image_embeds: torch.FloatTensor | None = None
    image_token_embeds: torch.FloatTensor | None = None
    pooling_attentions: torch.FloatTensor | None = None

    def to_tuple(self):
        both_towers = self.text_embeds is not None and self.image_embeds is not None
        values = [
            getattr(self, field.name) for field in dataclasses.fields(self)
            if getattr(self, field.name) is not None or both_towers and field.name in CLIP_OUTPUT_SLOTS
        ]  # fmt: skip
        return tuple(value.to_tuple() if isinstance(value, ModelOutput) else value for value in values)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
):
    """Reference attention: `(batch, heads, q, d)` inputs, returns `(batch, q, heads, d)` and the weights."""
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    # softmax in float32 at least (float64 stays float64)
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.promote_types(query.dtype, torch.float32)).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def _attention_interface(config, output_attentions: bool = False) -> Callable:
    """The configured attention function; eager when attention weights are requested."""
    if output_attentions or config._attn_implementation == "eager":
        return eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)


class FlairVisionEmbeddings(nn.Module):
    def __init__(self, config: FlairVisionConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.randn(self.embed_dim))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, self.embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=False
        )
        self.num_patches = (self.image_size // self.patch_size) ** 2
        self.num_positions = self.num_patches + 1
        self.position_embedding = nn.Embedding(self.num_positions, self.embed_dim)
        self.register_buffer("position_ids", torch.arange(self.num_positions).expand((1, -1)), persistent=False)

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """Position embeddings for a `height x width` input: the patch grid's resized bicubically (as CLIP's)."""
        position_embedding = self.position_embedding.weight.unsqueeze(0)
        grid = (height // self.patch_size, width // self.patch_size)
        if grid[0] * grid[1] == self.num_patches and height == width:
            return self.position_embedding(self.position_ids)
        side = int(self.num_patches**0.5)
        patch_pos_embed = position_embedding[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        patch_pos_embed = nn.functional.interpolate(patch_pos_embed, size=grid, mode="bicubic", align_corners=False)
        return torch.cat([position_embedding[:, :1], patch_pos_embed.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        batch_size, _, height, width = pixel_values.shape
        if not interpolate_pos_encoding and (height != self.image_size or width != self.image_size):
            raise ValueError(
                f"Input image size ({height}*{width}) doesn't match model ({self.image_size}*{self.image_size}); "
                "pass interpolate_pos_encoding=True for other sizes."
            )
        patch_embeds = self.patch_embedding(pixel_values.to(dtype=self.patch_embedding.weight.dtype))
        patch_embeds = patch_embeds.flatten(2).transpose(1, 2)
        class_embeds = self.class_embedding.expand(batch_size, 1, -1)
        embeddings = torch.cat([class_embeds, patch_embeds], dim=1)
        if interpolate_pos_encoding:
            return embeddings + self.interpolate_pos_encoding(height, width)
        return embeddings + self.position_embedding(self.position_ids)


class FlairTextEmbeddings(nn.Module):
    def __init__(self, config: FlairTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.register_buffer(
            "position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)), persistent=False
        )

    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        seq_length = input_ids.shape[-1]
        max_positions = self.position_embedding.weight.shape[0]
        if seq_length > max_positions:
            raise ValueError(f"input_ids has {seq_length} positions; the model takes at most {max_positions}")
        return self.token_embedding(input_ids) + self.position_embedding(self.position_ids[:, :seq_length])


class FlairAttention(nn.Module):
    """Multi-head self-attention of the towers (CLIP layout: separate q/k/v/out projections)."""

    def __init__(self, config: FlairTextConfig | FlairVisionConfig, is_causal: bool = False):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.scale = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.is_causal = is_causal
        self.k_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.v_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        query_positions: torch.LongTensor | None = None,
        packing: TextPacking | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Self-attention over `hidden_states`; with `query_positions` (one per sequence) only those positions query
        (output `(batch, 1, width)`), in eager attention under `attention_mask`'s matching rows `(batch, 1, 1, keys)`.
        With `packing`, `hidden_states` and the output are its rows `(tokens, width)`."""
        query_states = hidden_states if query_positions is None else at_positions(hidden_states, query_positions)[:, None]
        queries = self._heads(self.q_proj(query_states), packing)
        keys = self._heads(self.k_proj(hidden_states), packing)
        values = self._heads(self.v_proj(hidden_states), packing)
        attention = _attention_interface(self.config, output_attentions or query_positions is not None)
        attn_output, attn_weights = attention(
            self,
            queries,
            keys,
            values,
            attention_mask,
            scaling=self.scale,
            dropout=self.dropout if self.training else 0.0,
            # a 4-D mask already holds the causal part; flash kernels take a 2-D padding mask and the causal flag
            is_causal=self.is_causal and (attention_mask is None or getattr(attention_mask, "ndim", None) == 2),
        )
        attn_output = attn_output.reshape(queries.shape[0], queries.shape[2], -1)
        return self.out_proj((attn_output if packing is None else packing.pack(attn_output)).contiguous()), attn_weights

    def _heads(self, projected: torch.Tensor, packing: TextPacking | None) -> torch.Tensor:
        """`(batch, positions, width)` (or packed rows) -> `(batch, heads, positions, head_dim)`."""
        states = projected if packing is None else packing.pad(projected)
        return states.view(*states.shape[:-1], self.num_heads, self.head_dim).transpose(1, 2)


class FlairMLP(nn.Module):
    def __init__(self, config: FlairTextConfig | FlairVisionConfig):
        super().__init__()
        self.config = config
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class FlairEncoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: FlairTextConfig | FlairVisionConfig, is_causal: bool = False):
        super().__init__()
        self.self_attn = FlairAttention(config, is_causal=is_causal)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = FlairMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        query_positions: torch.LongTensor | None = None,
        packing: TextPacking | None = None,
    ) -> torch.Tensor:
        """The pre-LayerNorm block; with `query_positions`, only those positions' outputs `(batch, 1, width)`; with
        `packing`, on its rows `(tokens, width)`."""
        residual = hidden_states if query_positions is None else at_positions(hidden_states, query_positions)[:, None]
        attended = self.self_attn(self.layer_norm1(hidden_states), attention_mask, output_attentions, query_positions, packing)[0]
        hidden_states = residual + attended
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class FlairEncoder(nn.Module):
    def __init__(self, config: FlairTextConfig | FlairVisionConfig, is_causal: bool = False):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList([FlairEncoderLayer(config, is_causal) for _ in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, output_attentions: bool = False
    ) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask, output_attentions)
        return hidden_states


def _output_flags(config, kwargs: dict) -> dict:
    """`output_hidden_states` (a flag, or the indices of the states to keep) and `output_attentions`, as passed, else
    as configured."""
    return {name: kwargs.get(name, getattr(config, name, False)) for name in ("output_hidden_states", "output_attentions")}


def _causal_attention_mask(config, implementation: str, attention_mask: torch.Tensor | None, hidden_states: torch.Tensor):
    """The mask the text attention needs: `None` where the kernel's own causal flag suffices (sdpa without padding,
    flash kernels), transformers' `BlockMask` for flex_attention, else additive 4-D (eager, other registered functions).

    FLAIR (like CLIP) pools at the end-of-text token, which under the causal mask never sees padding, so
    `attention_mask` only changes the (unused) states of padding positions.
    """
    if implementation.startswith("flash_attention"):
        return attention_mask if attention_mask is not None and not bool(attention_mask.all()) else None
    if implementation == "flex_attention":
        return create_causal_mask(config=config, inputs_embeds=hidden_states, attention_mask=attention_mask, cache=None)
    if attention_mask is None and implementation == "sdpa":
        return None
    batch_size, seq_length = hidden_states.shape[:2]
    min_value = torch.finfo(hidden_states.dtype).min
    allowed = torch.ones(seq_length, seq_length, dtype=torch.bool, device=hidden_states.device).tril()
    allowed = allowed.expand(batch_size, 1, seq_length, seq_length)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].bool()
        allowed = allowed | torch.eye(seq_length, dtype=torch.bool, device=allowed.device)  # no empty rows
    mask = torch.zeros(allowed.shape, dtype=hidden_states.dtype, device=hidden_states.device)
    return mask.masked_fill(~allowed, min_value)


class FlairPreTrainedModel(PreTrainedModel):
    config: FlairConfig
    config_class = FlairConfig
    base_model_prefix = "flair"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["FlairTextEmbeddings", "FlairEncoderLayer", "FlairVisionEmbeddings", "FlairTextConditionedPooling"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {"hidden_states": FlairEncoderLayer, "attentions": FlairAttention}

    @torch.no_grad()
    def _initialize_weights(self, module, is_custom_code: bool = False):
        """Run `_init_weights` on every module. transformers skips, for code outside its package, modules without
        parameters of their own (here the attention and MLP blocks, initialised through their children); that shortcut
        is unneeded, as every write goes through `transformers.initialization`, which leaves loaded tensors alone."""
        super()._initialize_weights(module, is_custom_code=False)

    def _init_weights(self, module):
        """The original FLAIR's initialisation (open_clip's), so a model trained from scratch starts where the paper's did.

        Text tower: open_clip's `TextTransformer.init_parameters` (normal weights; MLP biases keep torch's uniform).
        Vision tower: torch's defaults, as open_clip's `VisionTransformer.init_parameters` is a no-op (uniform Linear
        and patch-convolution weights, xavier for the fused q/k/v, zero attention biases), with `width**-0.5` normal
        class and position embeddings. Pooling head: `nn.MultiheadAttention`'s defaults. Every scale is multiplied by
        `initializer_factor`.
        """
        factor = self.config.initializer_factor
        if isinstance(module, FlairTextEmbeddings):
            init.normal_(module.token_embedding.weight, std=factor * 0.02)
            init.normal_(module.position_embedding.weight, std=factor * 0.01)
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
        elif isinstance(module, FlairVisionEmbeddings):
            init.normal_(module.class_embedding, std=module.embed_dim**-0.5 * factor)
            _torch_default_uniform(module.patch_embedding.weight, factor)
            init.normal_(module.position_embedding.weight, std=module.embed_dim**-0.5 * factor)
            init.copy_(module.position_ids, torch.arange(module.num_positions).expand((1, -1)))
        elif isinstance(module, FlairAttention) and isinstance(module.config, FlairTextConfig):
            width, layers = module.embed_dim, module.config.num_hidden_layers
            for projection in (module.q_proj, module.k_proj, module.v_proj):
                init.normal_(projection.weight, std=width**-0.5 * factor)
            init.normal_(module.out_proj.weight, std=width**-0.5 * (2 * layers) ** -0.5 * factor)
            _zero_biases(module.q_proj, module.k_proj, module.v_proj, module.out_proj)
        elif isinstance(module, (FlairAttention, FlairTextConditionedPooling)):
            _multihead_attention_default(module, factor)
        elif isinstance(module, FlairMLP):
            for linear in (module.fc1, module.fc2):
                _torch_default_uniform(linear.bias, factor, fan_in=linear.in_features)
            if isinstance(module.config, FlairTextConfig):
                width, layers = module.config.hidden_size, module.config.num_hidden_layers
                init.normal_(module.fc1.weight, std=(2 * width) ** -0.5 * factor)
                init.normal_(module.fc2.weight, std=width**-0.5 * (2 * layers) ** -0.5 * factor)
            else:
                _torch_default_uniform(module.fc1.weight, factor)
                _torch_default_uniform(module.fc2.weight, factor)
        elif isinstance(module, FlairModel):
            init.normal_(module.text_projection.weight, std=module.text_embed_dim**-0.5 * factor)
            init.normal_(module.visual_projection.weight, std=module.vision_embed_dim**-0.5 * factor)
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)
            init.constant_(module.logit_bias, self.config.logit_bias_init_value)
        if isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


def _torch_default_uniform(tensor: torch.Tensor, factor: float, fan_in: int | None = None) -> None:
    """torch's default for Linear / Conv weights and biases: `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`."""
    fan_in = fan_in or tensor[0].numel()
    bound = factor / math.sqrt(fan_in)
    init.uniform_(tensor, -bound, bound)


def _zero_biases(*linears: nn.Linear) -> None:
    for linear in linears:
        init.zeros_(linear.bias)


def _multihead_attention_default(module: nn.Module, factor: float) -> None:
    """`nn.MultiheadAttention`'s own initialisation of separate q/k/v projections: xavier-uniform over the fused
    `(3D, D)` in-projection (bound `sqrt(6 / 4D)`), torch's default uniform out-projection, zero biases."""
    width = module.q_proj.in_features
    bound = math.sqrt(6 / (4 * width)) * factor
    for projection in (module.q_proj, module.k_proj, module.v_proj):
        init.uniform_(projection.weight, -bound, bound)
    _torch_default_uniform(module.out_proj.weight, factor)
    _zero_biases(module.q_proj, module.k_proj, module.v_proj, module.out_proj)


class FlairTextModel(FlairPreTrainedModel):
    """Causal text transformer; `pooler_output` is the final-LayerNorm state at the end-of-text token (argmax id)."""

    config: FlairTextConfig
    config_class = FlairTextConfig
    input_modalities = ("text",)

    def __init__(self, config: FlairTextConfig):
        super().__init__(config)
        self.embeddings = FlairTextEmbeddings(config)
        self.encoder = FlairEncoder(config, is_causal=True)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.token_embedding

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, **kwargs: Unpack[TransformersKwargs]
    ) -> BaseModelOutputWithPooling:
        """CLIP's text tower output; `hidden_states` (embeddings, then each layer's output, before the final LayerNorm)
        and `attentions` with `output_hidden_states` / `output_attentions`."""
        hidden_states = self.embeddings(input_ids)
        output_attentions = bool(_output_flags(self.config, kwargs)["output_attentions"])
        implementation = "eager" if output_attentions else self.config._attn_implementation  # as FlairAttention runs
        mask = _causal_attention_mask(self.config, implementation, attention_mask, hidden_states)
        last_hidden_state = self.final_layer_norm(self.encoder(hidden_states, mask, output_attentions))
        end_of_text = input_ids.to(device=last_hidden_state.device).argmax(dim=-1)
        pooled_output = at_positions(last_hidden_state, end_of_text)
        return BaseModelOutputWithPooling(last_hidden_state=last_hidden_state, pooler_output=pooled_output)

    def pooled_output(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`pooler_output` alone, each text computed only up to its end-of-text token (all that reaches it under the
        causal mask): cut at the longest text, every layer but the last on the positions up to each end-of-text token
        alone (`TextPacking`, when some position is dropped), the last at those tokens only, in as many calls as
        `text_tower_calls` says (on the CPU, texts sorted by length into calls of bounded rows, each cut at its
        longest text).

        A padding mask that keeps every position up to each end-of-text token cannot change the result, so it is
        dropped (the kernels then take the causal flag alone); one with holes before it runs the padded pass under
        it. Traced or compiled, the padded pass over every position runs, so that no example's lengths are baked into
        the graph. With no texts under torch.distributed, a one-token call still runs, so that ranks of a sharded
        (FSDP) run issue the same collectives."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return self._pooled_at_end_of_text(input_ids, attention_mask)
        if input_ids.shape[0] == 0:
            if distributed:
                self._pooled_at_end_of_text(input_ids.new_zeros(1, 1))
            return self.final_layer_norm.weight.new_zeros(0, self.config.hidden_size)
        ends = input_ids.argmax(dim=-1).cpu()  # one device sync for the cuts, the packing and the mask check
        if attention_mask is not None:
            cut = int(ends.max()) + 1
            reaching = torch.arange(cut) <= ends[:, None]
            if not bool(attention_mask[:, :cut].bool().cpu()[reaching].all()):
                return self._pooled_at_end_of_text(input_ids[:, :cut], attention_mask[:, :cut])
        calls = text_tower_calls(ends, input_ids.device, distributed)
        if calls == 1:
            return self._pooled_packed(input_ids, ends)
        groups = [torch.from_numpy(group) for group in length_sorted_groups(ends.numpy(), calls)]
        # the embeddings run once for all calls: one dense token-embedding gradient, not one per call
        embedded = self.embeddings(input_ids[:, : int(ends.max()) + 1])
        pooled = [self._pooled_packed(input_ids[group], ends[group], embedded[group]) for group in groups]
        return torch.cat(pooled)[torch.cat(groups).argsort()]

    def _pooled_packed(
        self, input_ids: torch.LongTensor, ends: torch.LongTensor, embedded: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`pooler_output` of one call cut at the longest text, packed when that drops a position (`ends` on the host);
        `embedded`: the embeddings' output for `input_ids`, when already computed."""
        cut = int(ends.max()) + 1
        packing_ends = ends if bool((ends < cut - 1).any()) else None
        embedded = None if embedded is None else embedded[:, :cut]
        return self._pooled_at_end_of_text(input_ids[:, :cut], packing_ends=packing_ends, embedded=embedded)

    def _pooled_at_end_of_text(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        packing_ends: torch.LongTensor | None = None,
        embedded: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`pooler_output` of one call: every layer but the last over all positions (given `packing_ends`, the
        end-of-text positions on the host: over those up to each end-of-text token alone), the last at the end-of-text
        tokens only (no other position of it reaches the pooled state), under the rows of the causal mask there. It
        calls the embeddings (unless given their output, `embedded`) and each encoder layer (not `forward`): hooks and
        FSDP wrapping belong on those."""
        hidden_states = self.embeddings(input_ids) if embedded is None else embedded
        ends = input_ids.argmax(dim=-1).to(hidden_states.device)
        *layers, last = self.encoder.layers
        mask = _causal_attention_mask(self.config, self.config._attn_implementation, attention_mask, hidden_states)
        packing = None if packing_ends is None else TextPacking(packing_ends, input_ids.shape[1], hidden_states.device)
        if packing is not None:
            hidden_states = packing.pack(hidden_states)
        for layer in layers:
            hidden_states = layer(hidden_states, mask, packing=packing)
        if packing is not None:
            hidden_states = packing.pad(hidden_states)
        rows = at_positions(_causal_attention_mask(self.config, "eager", attention_mask, hidden_states)[:, 0], ends)
        rows = rows[:, None, None]  # (batch, 1, 1, keys): the causal mask's row at each end-of-text token
        return self.final_layer_norm(last(hidden_states, rows, query_positions=ends)[:, 0])


class FlairVisionModel(FlairPreTrainedModel):
    """ViT; unlike CLIP's, `last_hidden_state` has the post-LayerNorm applied to every token (as in FLAIR)."""

    config: FlairVisionConfig
    config_class = FlairVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _input_embed_layer = "patch_embedding"

    def __init__(self, config: FlairVisionConfig):
        super().__init__(config)
        self.embeddings = FlairVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # CLIP's spelling
        self.encoder = FlairEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, **kwargs: Unpack[TransformersKwargs]
    ) -> BaseModelOutputWithPooling:
        """`hidden_states` (after the pre-LayerNorm, then each layer's output) and `attentions` as CLIP's."""
        hidden_states = self.pre_layrnorm(self.embeddings(pixel_values, interpolate_pos_encoding))
        output_attentions = bool(_output_flags(self.config, kwargs)["output_attentions"])
        last_hidden_state = self.post_layernorm(self.encoder(hidden_states, None, output_attentions))
        return BaseModelOutputWithPooling(last_hidden_state=last_hidden_state, pooler_output=last_hidden_state[:, 0])


class FlairTextConditionedPooling(nn.Module):
    """
    FLAIR's text-conditioned attention pooling: each text embedding queries an image's projected patch tokens.

    Reproduces `nn.MultiheadAttention(dim, heads, add_zero_attn=True)` applied to `ln_q(text)`, `ln_k(tokens)`,
    `ln_v(tokens)`: a zero key/value slot is appended after the projections, so a query can attend to nothing.
    """

    def __init__(self, config: FlairConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.projection_dim
        self.num_heads = config.pooling_num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.scale = self.head_dim**-0.5
        eps = config.text_config.layer_norm_eps
        self.query_layer_norm = nn.LayerNorm(self.embed_dim, eps=eps)
        self.key_layer_norm = nn.LayerNorm(self.embed_dim, eps=eps)
        self.value_layer_norm = nn.LayerNorm(self.embed_dim, eps=eps)
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.k_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.v_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim)

    def _heads(self, states: torch.Tensor) -> torch.Tensor:
        """`(..., n, D)` -> `(..., heads, n, head_dim)`."""
        return states.unflatten(-1, (self.num_heads, self.head_dim)).transpose(-3, -2)

    def project_queries(self, text_embeds: torch.Tensor) -> torch.Tensor:
        """`(T, D)` text embeddings -> `(heads, T, head_dim)` queries; independent of the image, computed once."""
        return self._heads(self.q_proj(self.query_layer_norm(text_embeds)))

    def project_keys_values(self, image_token_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(B, L, D)` projected patch tokens -> keys and values `(B, heads, L + 1, head_dim)`, zero slot last."""
        keys = self.k_proj(self.key_layer_norm(image_token_embeds))
        values = self.v_proj(self.value_layer_norm(image_token_embeds))
        zero = keys.new_zeros(keys.shape[0], 1, keys.shape[-1])
        return self._heads(torch.cat([keys, zero], dim=1)), self._heads(torch.cat([values, zero], dim=1))

    def attend(
        self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Queries `(heads, T, hd)` (shared) or `(B, heads, T, hd)` (per image) against keys/values
        `(B, heads, L+1, hd)` -> `(B, T, D)` and optional weights."""
        attn_output, attn_weights = self.attention_output(queries, keys, values, output_attentions)
        return self.out_proj(attn_output), attn_weights

    def attention_output(
        self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`attend` before the output projection: the heads' weighted values concatenated, `(B, T, D)`."""
        if queries.dim() == 3:
            queries = queries.unsqueeze(0).expand(keys.shape[0], -1, -1, -1)
        attn_output, attn_weights = _attention_interface(self.config, output_attentions)(
            self, queries, keys, values, None, scaling=self.scale, dropout=0.0, is_causal=False
        )
        return attn_output.flatten(-2), attn_weights

    def pair_blocks(
        self,
        text_embeds: torch.Tensor,
        image_token_embeds: torch.Tensor,
        image_chunk_size: int = PAIR_IMAGE_CHUNK_SIZE,
        text_chunk_size: int = PAIR_TEXT_CHUNK_SIZE,
        device: torch.device | str | None = None,
    ):
        """Every (image, text) pair, in blocks: yields `(images, texts, queries, keys, values)`, the image and text
        index slices of a block and its projected queries `(heads, t, hd)` and keys/values `(b, heads, L + 1, hd)`.

        The blocks are `scoring.pair_blocks`'. Queries are projected once, keys and values once per image chunk; inputs
        move to `device` (default: the head's) chunk by chunk, so `(B, L, D)` tokens may stay on the CPU. Memory per
        block is bounded by the chunk sizes."""
        device = torch.device(device) if device is not None else self.q_proj.weight.device
        queries = self.project_queries(text_embeds.to(device))
        chunk = None
        for images, texts in pair_blocks(image_token_embeds.shape[0], text_embeds.shape[0], image_chunk_size, text_chunk_size):
            if images != chunk:
                chunk, (keys, values) = images, self.project_keys_values(image_token_embeds[images].to(device))
            yield images, texts, queries[:, texts], keys, values

    def forward(
        self, text_embeds: torch.Tensor, image_token_embeds: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pool `(B, L, D)` tokens with every one of `(T, D)` texts in one block: `(B, T, D)`, weights
        `(B, heads, T, L + 1)`. `FlairModel.get_text_conditioned_image_features` does it in bounded blocks."""
        keys, values = self.project_keys_values(image_token_embeds)
        return self.attend(self.project_queries(text_embeds), keys, values, output_attentions)


class FlairModel(FlairPreTrainedModel):
    r"""
    FLAIR: a CLIP ViT and text transformer whose projected patch tokens are pooled by a text-conditioned attention
    head, giving one image embedding per caption. Embedding methods take `input_ids` / `pixel_values` as produced by
    [`FlairProcessor`].
    """

    main_input_name = "input_ids"
    _auto_class = "AutoModel"  # save_pretrained writes the source files and auto_map (remote code)

    def __init__(self, config: FlairConfig):
        super().__init__(config)
        self.projection_dim = config.projection_dim
        self.text_embed_dim = config.text_config.hidden_size
        self.vision_embed_dim = config.vision_config.hidden_size
        self.text_model = FlairTextModel._from_config(config.text_config)
        self.vision_model = FlairVisionModel._from_config(config.vision_config)
        self.visual_projection = nn.Linear(self.vision_embed_dim, self.projection_dim, bias=False)
        self.text_projection = nn.Linear(self.text_embed_dim, self.projection_dim, bias=False)
        self.text_conditioned_pooling = FlairTextConditionedPooling(config)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.logit_bias = nn.Parameter(torch.tensor(config.logit_bias_init_value))
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.embeddings.token_embedding

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`; when it writes remote code, `auto_map` also names this class for
        `AutoModelForZeroShotImageClassification`, so `pipeline("zero-shot-image-classification")` finds it. The
        model's own config is left as it was."""
        if self._auto_class is None:
            return super().save_pretrained(save_directory, *args, **kwargs)
        had_auto_map, auto_map = hasattr(self.config, "auto_map"), getattr(self.config, "auto_map", None)
        entry = f"{type(self).__module__.rsplit('.', 1)[-1]}.{type(self).__name__}"
        self.config.auto_map = {**(auto_map or {}), "AutoModelForZeroShotImageClassification": entry}
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            if had_auto_map:
                self.config.auto_map = auto_map
            else:
                del self.config.auto_map

    @can_return_tuple
    def get_text_features(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, **kwargs: Unpack[TransformersKwargs]
    ) -> BaseModelOutputWithPooling:
        """As `CLIPModel.get_text_features`: the text tower's output over all positions, with `pooler_output` projected
        by `text_projection` (the global text embedding `(T, D)`, not normalised). `get_text_embeds` gives the same
        embeddings faster."""
        text_outputs = self.text_model(input_ids, attention_mask, return_dict=True, **kwargs)
        text_outputs.pooler_output = self.text_projection(text_outputs.pooler_output)
        return text_outputs

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.FloatTensor, interpolate_pos_encoding: bool = False, **kwargs: Unpack[TransformersKwargs]
    ) -> BaseModelOutputWithPooling:
        """As `CLIPModel.get_image_features`: the vision tower's output with `pooler_output` projected by
        `visual_projection` (the global image embedding `(B, D)`, not normalised).

        `interpolate_pos_encoding=True` takes images of other sizes (position embeddings resized bicubically)."""
        vision_outputs = self.vision_model(pixel_values, interpolate_pos_encoding, return_dict=True, **kwargs)
        vision_outputs.pooler_output = self.visual_projection(vision_outputs.pooler_output)
        return vision_outputs

    def get_text_embeds(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Global text embeddings `(T, D)`, not normalised (`get_text_features(...).pooler_output`), each text computed
        only up to its end-of-text token: exact under the causal mask, and what FLAIR's captions make fast."""
        return self.text_projection(self.text_model.pooled_output(input_ids, attention_mask))

    def get_image_embeds(self, pixel_values: torch.FloatTensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """Global image embeddings `(B, D)`, not normalised (`get_image_features(...).pooler_output`)."""
        return self.get_image_features(pixel_values, interpolate_pos_encoding, return_dict=True).pooler_output

    def get_image_token_features(self, pixel_values: torch.FloatTensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """Projected patch tokens `(B, L, D)` (post-LayerNorm applied to each), the keys/values of the pooling head."""
        return self.get_image_and_token_features(pixel_values, interpolate_pos_encoding)[1]

    def get_image_and_token_features(
        self, pixel_values: torch.FloatTensor, interpolate_pos_encoding: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Global image embeddings `(B, D)` and projected patch tokens `(B, L, D)` from one pass of the vision tower."""
        hidden = self.vision_model(pixel_values, interpolate_pos_encoding, return_dict=True).last_hidden_state
        return self.visual_projection(hidden[:, 0]), self.visual_projection(hidden[:, 1:])

    def get_text_conditioned_image_features(
        self,
        text_embeds: torch.Tensor | None = None,
        image_token_embeds: torch.Tensor | None = None,
        *,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_chunk_size: int = PAIR_IMAGE_CHUNK_SIZE,
        text_chunk_size: int = PAIR_TEXT_CHUNK_SIZE,
    ) -> torch.Tensor:
        """
        The pooling head for every (image, text) pair: `(B, T, D)`, not normalised.

        Give either `text_embeds` `(T, D)` (from `get_text_embeds`) or `input_ids`, and either
        `image_token_embeds` `(B, L, D)` (from `get_image_token_features`) or `pixel_values`. Pairs are computed in
        chunks of `image_chunk_size` images x `text_chunk_size` texts, so memory is bounded for large `B x T`.
        """
        text_embeds = self._resolve(text_embeds, input_ids, "text_embeds", "input_ids", self.get_text_embeds, attention_mask)
        image_token_embeds = self._resolve(
            image_token_embeds, pixel_values, "image_token_embeds", "pixel_values", self.get_image_token_features
        )
        pooling = self.text_conditioned_pooling
        pooled = text_embeds.new_empty(image_token_embeds.shape[0], text_embeds.shape[0], self.projection_dim)
        for images, texts, queries, keys, values in pooling.pair_blocks(text_embeds, image_token_embeds, image_chunk_size, text_chunk_size):
            pooled[images, texts] = pooling.attend(queries, keys, values)[0]
        return pooled

    def _text_outputs(self, input_ids, attention_mask, flags: dict[str, bool]) -> BaseModelOutputWithPooling:
        """The text tower's output: over all positions when hidden states or attentions are asked for, else only
        `pooler_output`, each text run up to its end-of-text token."""
        if any(flags.values()):
            return self.text_model(input_ids, attention_mask, return_dict=True, **flags)
        return BaseModelOutputWithPooling(pooler_output=self.text_model.pooled_output(input_ids, attention_mask))

    @staticmethod
    def _resolve(features, inputs, features_name, inputs_name, encode, *encode_args):
        if (features is None) == (inputs is None):
            raise ValueError(f"Pass exactly one of `{features_name}` and `{inputs_name}`")
        return features if features is not None else encode(inputs, *encode_args)

    def _flair_logits(self, text_conditioned_image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        return logits(flair_cosine(text_conditioned_image_embeds, text_embeds), self.logit_scale.exp(), self.logit_bias)

    def _clip_logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        return logits(pairwise_cosine(image_embeds, text_embeds), self.logit_scale.exp())

    def get_logits(
        self, input_ids: torch.LongTensor, pixel_values: torch.FloatTensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """FLAIR logits `(logits_per_image (B, T), logits_per_text (T, B))`, with `logit_bias`, as the original."""
        text_embeds = self.get_text_embeds(input_ids, attention_mask)
        pooled = self.get_text_conditioned_image_features(text_embeds, pixel_values=pixel_values)
        logits_per_image = self._flair_logits(pooled, text_embeds)
        return logits_per_image, logits_per_image.t()

    def get_logits_as_clip(
        self, input_ids: torch.LongTensor, pixel_values: torch.FloatTensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Global-to-global CLIP logits `(per_image (B, T), per_text (T, B))`, no bias, as the original."""
        logits_per_image = self._clip_logits(self.get_image_embeds(pixel_values), self.get_text_embeds(input_ids, attention_mask))
        return logits_per_image, logits_per_image.t()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_loss: bool = False,
        captions_per_image: int | None = None,
        add_mps_loss: bool = True,
        loss_across_ranks: bool = True,
        interpolate_pos_encoding: bool = False,
        add_tcs_loss: bool = True,
        **kwargs: Unpack[TransformersKwargs],
    ) -> FlairOutput:
        r"""
        Score `B` images against `T` texts both ways. `input_ids` `(T, 77)`, `pixel_values` `(B, 3, 224, 224)`.
        `output_hidden_states` / `output_attentions` add the towers' hidden states / attentions to
        `text_model_output` and `vision_model_output` as CLIP's; `output_attentions` also returns the pooling head's
        weights as `pooling_attentions`. `return_dict=False` gives a tuple in `CLIPOutput`'s order.

        With `return_loss=True` (training), `T = B * captions_per_image` and caption `k` of image `i` is row
        `i * K + k`; the output holds the FLAIR loss (text-conditioned sigmoid loss, plus the multi-positive sigmoid
        loss if `add_mps_loss`; `add_tcs_loss=False` leaves the global multi-positive loss alone, a SigLIP-style
        baseline; other ranks' texts are extra negatives when torch.distributed is initialised and
        `loss_across_ranks`) and the normalised embeddings. `interpolate_pos_encoding=True` takes images of other
        sizes than the model's.

        With only `pixel_values` (as the image-feature-extraction pipeline calls it), the output holds the normalised
        global `image_embeds` (first), the projected patch tokens `image_token_embeds` and the vision tower's output;
        with only `input_ids`, the normalised `text_embeds` and the text tower's output.
        """
        for name, batch, what in (("input_ids", input_ids, "texts (e.g. candidate_labels=[])"), ("pixel_values", pixel_values, "images")):
            if batch is not None and batch.shape[0] == 0:
                raise ValueError(f"FlairModel got 0 {what} in {name}: pass at least one")
        if input_ids is None and pixel_values is None or return_loss and (input_ids is None or pixel_values is None):
            raise ValueError("FlairModel needs input_ids and pixel_values (one of them for single-tower embeddings)")
        if return_loss and captions_per_image is None:
            raise ValueError("return_loss=True needs captions_per_image")
        flags = _output_flags(self.config, kwargs)
        fields = {}  # FlairOutput orders them as its fields
        if pixel_values is not None:
            vision_outputs = self.vision_model(pixel_values, interpolate_pos_encoding, return_dict=True, **flags)
            image_embeds = self.visual_projection(vision_outputs.pooler_output)
            image_token_embeds = self.visual_projection(vision_outputs.last_hidden_state[:, 1:])
            fields.update(image_embeds=F.normalize(image_embeds, dim=-1), vision_model_output=vision_outputs)
        if input_ids is not None:
            text_outputs = self._text_outputs(input_ids, attention_mask, flags)
            text_embeds = self.text_projection(text_outputs.pooler_output)
            fields.update(text_embeds=F.normalize(text_embeds, dim=-1), text_model_output=text_outputs)
        if input_ids is None:
            return FlairOutput(**fields, image_token_embeds=image_token_embeds)
        if pixel_values is None:
            return FlairOutput(**fields)
        if return_loss:
            loss_function = distributed_flair_loss if loss_across_ranks else flair_loss
            loss = loss_function(
                self.text_conditioned_pooling, image_embeds, image_token_embeds, text_embeds,
                self.logit_scale.exp(), self.logit_bias, captions_per_image, add_mps_loss=add_mps_loss,
                add_tcs_loss=add_tcs_loss,
            )  # fmt: skip
            return FlairOutput(loss=loss, **fields)
        if flags["output_attentions"]:
            pooled, fields["pooling_attentions"] = self.text_conditioned_pooling(text_embeds, image_token_embeds, True)
        else:
            pooled = self.get_text_conditioned_image_features(text_embeds, image_token_embeds)
        logits_per_image = self._flair_logits(pooled, text_embeds)
        logits_as_clip = self._clip_logits(image_embeds, text_embeds)
        return FlairOutput(
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_image.t(),
            logits_per_image_as_clip=logits_as_clip,
            logits_per_text_as_clip=logits_as_clip.t(),
            text_conditioned_image_embeds=F.normalize(pooled, dim=-1),
            **fields,
        )


class FlairModelForGlobalScoring(FlairModel):
    """`FlairModel` whose `logits_per_image` / `logits_per_text` are the global, CLIP-style ones (what pipelines read),
    e.g. `pipeline("zero-shot-image-classification", model=FlairModelForGlobalScoring.from_pretrained(path), ...)`.
    Same weights and outputs otherwise; the FLAIR logits stay in the output as computed."""

    @can_return_tuple
    def forward(self, *args, **kwargs) -> FlairOutput:
        output = super().forward(*args, **kwargs, return_dict=True)
        if output.logits_per_image_as_clip is not None:
            output.logits_per_image, output.logits_per_text = output.logits_per_image_as_clip, output.logits_per_text_as_clip
        return output


__all__ = ["FlairModel", "FlairModelForGlobalScoring", "FlairPreTrainedModel", "FlairTextModel", "FlairVisionModel", "FlairOutput"]
