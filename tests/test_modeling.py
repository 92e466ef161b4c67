"""FlairModel behaviour: attention implementations, chunking, CLIP compatibility, training features, dtypes."""

import pytest
import torch
from transformers import AutoModel, CLIPModel

from flair_hf import FlairConfig, FlairModel
from flair_hf_benchmarks.synthetic import ids_ending_at

from conftest import MethodAsModule
from initialisation import assert_original_initialisation


@pytest.fixture(scope="module")
def inputs(tiny_reference):
    return tiny_reference["input_ids"].long(), tiny_reference["pixel_values"]


def test_eager_and_sdpa_agree(tiny_dir, inputs):
    ids, pixels = inputs
    outputs = {}
    for implementation in ("eager", "sdpa"):
        model = FlairModel.from_pretrained(tiny_dir, attn_implementation=implementation).eval()
        assert model.text_model.config._attn_implementation == implementation
        with torch.no_grad():
            out = model(input_ids=ids, pixel_values=pixels)
            outputs[implementation] = (out.logits_per_image, out.logits_per_image_as_clip, out.text_conditioned_image_embeds)
    for eager, sdpa in zip(outputs["eager"], outputs["sdpa"]):
        torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-5)


def test_chunked_pooling_equals_single_pass(tiny_model, inputs):
    ids, pixels = inputs
    with torch.no_grad():
        text = tiny_model.get_text_embeds(ids)
        tokens = tiny_model.get_image_token_features(pixels)
        whole, _ = tiny_model.text_conditioned_pooling(text, tokens)
        chunked = tiny_model.get_text_conditioned_image_features(text, tokens, image_chunk_size=4, text_chunk_size=3)
    assert chunked.shape == (6, 7, 32)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="exactly one of `text_embeds` and `input_ids`"):
        tiny_model.get_text_conditioned_image_features(text, tokens, input_ids=ids)
    with pytest.raises(ValueError, match="exactly one of `image_token_embeds` and `pixel_values`"):
        tiny_model.get_text_conditioned_image_features(text)


def test_zero_attention_slot_and_shapes(tiny_model, inputs):
    ids, pixels = inputs
    with torch.no_grad():
        out = tiny_model(input_ids=ids, pixel_values=pixels, output_attentions=True)
    assert out.pooling_attentions.shape == (6, 8, 7, 197)
    torch.testing.assert_close(out.pooling_attentions.sum(-1), torch.ones(6, 8, 7))
    assert out.image_embeds.shape == (6, 32) and out.text_embeds.shape == (7, 32)
    assert tiny_model.get_image_token_features(pixels).shape == (6, 196, 32)
    as_tuple = tiny_model(input_ids=ids, pixel_values=pixels, return_dict=False)
    torch.testing.assert_close(as_tuple[0], out.logits_per_image)


def test_pooling_head_equals_torch_multihead_attention_with_a_zero_slot(tiny_model, inputs):
    """Independently: torch's own `nn.MultiheadAttention(add_zero_attn=True)`, as the original builds the head, with
    the head's weights, on the LayerNormed texts and patch tokens: pooled embeddings and per-head weights equal."""
    ids, pixels = inputs
    pooling = tiny_model.text_conditioned_pooling
    reference = torch.nn.MultiheadAttention(pooling.embed_dim, pooling.num_heads, add_zero_attn=True, batch_first=True)
    with torch.no_grad():
        reference.in_proj_weight.copy_(torch.cat([pooling.q_proj.weight, pooling.k_proj.weight, pooling.v_proj.weight]))
        reference.in_proj_bias.copy_(torch.cat([pooling.q_proj.bias, pooling.k_proj.bias, pooling.v_proj.bias]))
        reference.out_proj.load_state_dict(pooling.out_proj.state_dict())
        text, tokens = tiny_model.get_text_embeds(ids), tiny_model.get_image_token_features(pixels)
        queries = pooling.query_layer_norm(text).expand(tokens.shape[0], -1, -1)
        expected, expected_weights = reference(queries, pooling.key_layer_norm(tokens), pooling.value_layer_norm(tokens),
                                               average_attn_weights=False)  # fmt: skip
        pooled, weights = pooling(text, tokens, True)
    torch.testing.assert_close(pooled, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(weights, expected_weights, atol=1e-6, rtol=1e-5)


def test_loads_into_clip_model_with_only_flair_tensors_left(tiny_dir, tiny_model, inputs):
    ids, pixels = inputs
    clip, info = CLIPModel.from_pretrained(tiny_dir, output_loading_info=True)
    clip.eval()
    assert info["missing_keys"] == set() or not info["missing_keys"]
    leftover = set(info["unexpected_keys"])
    assert leftover == {k for k in tiny_model.state_dict() if k.startswith("text_conditioned_pooling.")} | {"logit_bias"}
    with torch.no_grad():
        clip_out = clip(input_ids=ids, pixel_values=pixels)
        flair_out = tiny_model(input_ids=ids, pixel_values=pixels)
    torch.testing.assert_close(clip_out.logits_per_image, flair_out.logits_per_image_as_clip, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("objective", ["logits", "loss"])
def test_gradient_checkpointing_gives_same_loss_and_gradients(tiny_dir, inputs, objective):
    """Checkpointed layers give the same objective and gradients: the logits' sum, and the FLAIR training loss (whose
    text tower runs packed, captions of different lengths)."""
    ids, pixels = inputs
    if objective == "loss":  # 2 images x 3 captions
        pixels, ids = pixels[:2], ids_ending_at([5, 30, 12, 76, 9, 20], torch.Generator().manual_seed(0))
    values, gradients = [], []
    for checkpointing in (False, True):
        model = FlairModel.from_pretrained(tiny_dir).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.vision_model.encoder.layers)
            assert all(layer.gradient_checkpointing for layer in model.text_model.encoder.layers)
        torch.manual_seed(0)  # the loss's sampled negatives
        if objective == "loss":
            value = model(input_ids=ids, pixel_values=pixels, return_loss=True, captions_per_image=3).loss
        else:
            value = model(input_ids=ids, pixel_values=pixels).logits_per_image.sum()
        value.backward()
        values.append(value.detach())
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(values[1], values[0], atol=0, rtol=1e-6)
    assert len(gradients[0]) == len(list(model.parameters()))
    for name in gradients[0]:
        torch.testing.assert_close(gradients[0][name], gradients[1][name], atol=1e-5, rtol=1e-4)


def layer_input_shapes(model, ids, attention_mask=None) -> tuple[torch.Tensor, list, list]:
    """`get_text_embeds(ids)` and the input shapes of the text tower's first and last layers."""
    first, last = [], []
    layers = model.text_model.encoder.layers
    hooks = [layers[0].register_forward_hook(lambda module, args, output: first.append(tuple(args[0].shape))),
             layers[-1].register_forward_hook(lambda module, args, output: last.append(tuple(output.shape[:2])))]  # fmt: skip
    try:
        embeds = model.get_text_embeds(ids, attention_mask)
    finally:
        for hook in hooks:
            hook.remove()
    return embeds, first, last


def test_text_embeddings_cut_at_end_of_text_equal_full_length():
    """`get_text_embeds` runs one call cut at the longest text, every layer but the last on the positions up to each
    end-of-text token alone (packed rows), the last at the end-of-text tokens; the embeddings, their gradients and a
    padding mask's effect equal the full 77-token pass."""

    small = {"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 2}
    config = FlairConfig(projection_dim=16, text_config={**small, "num_hidden_layers": 3}, vision_config={**small, "num_hidden_layers": 1})
    torch.manual_seed(0)
    model = FlairModel(config).train()  # two packed layers: rows pass from one to the next
    generator = torch.Generator().manual_seed(0)
    ends = [5, 70, 12, 74, 30, 0, 45, 9, 20, 60, 1]
    ids = ids_ending_at(ends, generator)
    mask = (ids != 0).long()
    fast, first, last = layer_input_shapes(model, ids, mask)
    assert first == [(sum(ends) + len(ends), model.config.text_config.hidden_size)]  # the kept positions alone
    assert last == [(len(ends), 1)]  # the last layer at the end-of-text tokens only
    full = model.text_projection(model.text_model(ids, mask).pooler_output)
    torch.testing.assert_close(fast, full, atol=1e-6, rtol=1e-5)
    weights = torch.randn(fast.shape, generator=generator)
    grads = [torch.autograd.grad((out * weights).sum(), model.text_model.embeddings.token_embedding.weight)[0] for out in (fast, full)]
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)  # summed over rows in another order
    holed = mask.clone()
    holed[1, 10] = holed[3, 2] = 0  # masked positions before the end-of-text token do change the embedding
    with torch.no_grad():
        full = model.text_projection(model.text_model(ids, holed).pooler_output)
        masked, first, _ = layer_input_shapes(model, ids, holed)
        assert first == [(len(ends), 75, model.config.text_config.hidden_size)]  # padded under the mask, cut at 75
        torch.testing.assert_close(masked, full, atol=1e-6, rtol=1e-5)
        assert (model.get_text_embeds(ids) - full)[[1, 3]].abs().max() > 1e-3


def test_long_batches_on_the_cpu_run_in_sorted_calls_of_bounded_rows(tiny_dir, monkeypatch):
    """Past `CPU_TEXT_ROWS_PER_CALL` kept positions, texts run sorted by length in calls of about that many rows, each
    cut at its longest text, after one embedding pass; the embeddings come back in the input order, equal to the
    full pass, and so do the gradients."""
    import flair_hf.text_packing as text_packing

    monkeypatch.setattr(text_packing, "CPU_TEXT_ROWS_PER_CALL", 100)
    model = FlairModel.from_pretrained(tiny_dir).eval()
    ends = [5, 70, 12, 74, 30, 0, 45, 9, 20, 60, 1]  # 337 kept positions: 4 calls
    ids = ids_ending_at(ends, torch.Generator().manual_seed(0))
    weights = torch.linspace(-1, 1, model.config.projection_dim)
    embedding_calls = []
    hook = model.text_model.embeddings.register_forward_hook(lambda *_: embedding_calls.append(1))
    try:
        fast, first, last = layer_input_shapes(model, ids)
    finally:
        hook.remove()
    assert len(embedding_calls) == 1  # the embeddings run once for all calls: one dense token-embedding gradient
    expected = model.text_projection(model.text_model(ids).pooler_output)
    torch.testing.assert_close(fast, expected, atol=1e-6, rtol=1e-5)
    parameters = [p for p in model.text_model.parameters() if p.requires_grad]
    gradients = torch.autograd.grad((fast * weights).sum(), parameters)
    expected_gradients = torch.autograd.grad((expected * weights).sum(), parameters)
    for gradient, expected_gradient in zip(gradients, expected_gradients, strict=True):
        torch.testing.assert_close(gradient, expected_gradient, atol=1e-5, rtol=1e-4)
    fast = fast.detach()
    width = model.config.text_config.hidden_size
    # sorted ends [0, 1, 5], [9, 12, 20], [30, 45, 60], [70, 74]: packed rows of each call
    assert first == [(9, width), (44, width), (138, width), (146, width)]
    assert last == [(3, 1), (3, 1), (3, 1), (2, 1)]
    monkeypatch.setattr(text_packing, "CPU_TEXT_ROWS_PER_CALL", 1)  # more calls than texts: one text per call
    with torch.no_grad():
        single, first, _ = layer_input_shapes(model, ids)
    assert first == [(1, end + 1, width) for end in sorted(ends)]  # one text: nothing to pack
    torch.testing.assert_close(single, fast, atol=1e-6, rtol=1e-5)


def test_captions_of_equal_length_run_unpacked(tiny_dir):
    """Captions all of the same length (77 tokens, the worst case) drop no position: one padded call, no packing,
    and the last layer computes the end-of-text tokens alone."""
    model = FlairModel.from_pretrained(tiny_dir).eval()
    ids = ids_ending_at([76] * 6, torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast, first, last = layer_input_shapes(model, ids)
        torch.testing.assert_close(fast, model.text_projection(model.text_model(ids).pooler_output), atol=1e-6, rtol=1e-5)
    assert first == [(6, 77, model.config.text_config.hidden_size)] and last == [(6, 1)]


def test_traced_or_exported_text_features_do_not_bake_in_example_lengths(tiny_model):
    """Tracing or exporting runs one call over every position: a graph made on 4 short captions stays right on 6
    long ones."""
    wrapper = MethodAsModule(tiny_model, "get_text_embeds").eval()
    generator = torch.Generator().manual_seed(0)
    short, long = ids_ending_at([3, 5, 4, 6], generator), ids_ending_at([40, 70, 12, 76, 9, 33], generator)  # other batch size too
    with torch.no_grad():
        traced = torch.jit.trace(wrapper, short, check_trace=False)
        exported = torch.export.export(wrapper, (short,), dynamic_shapes=({0: torch.export.Dim("texts")},)).module()
        for graph in (traced, exported):
            torch.testing.assert_close(graph(long), tiny_model.get_text_embeds(long), atol=1e-5, rtol=1e-5)


def test_no_texts_give_no_text_embeddings(tiny_model):
    with torch.no_grad():
        embeds = tiny_model.get_text_embeds(torch.zeros(0, 77, dtype=torch.long))
    assert embeds.shape == (0, tiny_model.config.projection_dim)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loading(tiny_dir, inputs, dtype, tiny_model):
    ids, pixels = inputs
    model = AutoModel.from_pretrained(tiny_dir, dtype=dtype).eval()
    assert isinstance(model, FlairModel) and {parameter.dtype for parameter in model.parameters()} == {dtype}
    with torch.no_grad():
        low = model(input_ids=ids, pixel_values=pixels.to(dtype)).logits_per_image.float()
        full = tiny_model(input_ids=ids, pixel_values=pixels).logits_per_image
    # the logits are exp(logit_scale) * cosine + bias: their error is exp(logit_scale) times the cosine's, which the
    # dtype's rounding keeps near its epsilon (bf16 2^-7, fp16 2^-10): measured 0.57 and 0.60 eps; allowed 2 eps
    tolerance = 2 * torch.finfo(dtype).eps * tiny_model.logit_scale.exp().item()
    error = (low - full).abs().max().item()
    assert error <= tolerance, (error, tolerance)


def test_device_maps_keep_residual_blocks_whole(tiny_model):
    """A device map built with the model's `_no_split_modules` (as `device_map="auto"` builds it) spreads a model over
    three devices without splitting an encoder layer, an embeddings module or the pooling head (each adds a residual
    or positions across its children)."""
    from accelerate import infer_auto_device_map

    from flair_hf.modeling_flair import FlairEncoderLayer, FlairTextConditionedPooling, FlairTextEmbeddings, FlairVisionEmbeddings

    small = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 2}
    text = {**small, "vocab_size": 1000, "bos_token_id": 998, "eos_token_id": 999}
    model = FlairModel(FlairConfig(projection_dim=64, text_config=text, vision_config={**small, "image_size": 32, "patch_size": 8}))
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    device_map = infer_auto_device_map(model, max_memory={0: size // 3, 1: size // 3, "cpu": 10 * size},
                                       no_split_module_classes=model._no_split_modules)  # fmt: skip
    assert set(device_map.values()) == {0, 1, "cpu"}  # really spread
    whole = (FlairEncoderLayer, FlairTextConditionedPooling, FlairTextEmbeddings, FlairVisionEmbeddings)
    blocks = [name for name, module in model.named_modules() if isinstance(module, whole)]
    split = [key for key in device_map if any(key.startswith(block + ".") for block in blocks)]
    assert not split, split
    assert tiny_model.get_input_embeddings() is tiny_model.text_model.embeddings.token_embedding


def test_random_init_from_config_is_the_originals_and_runs():

    config = FlairConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32},
        projection_dim=16,
    )  # fmt: skip
    model = FlairModel(config).eval()
    assert_original_initialisation(model)
    ids = torch.tensor([[49406, 320, 1929, 49407] + [0] * 73])
    out = model(input_ids=ids, pixel_values=torch.randn(2, 3, 32, 32))
    assert out.logits_per_image.shape == (2, 1)


def test_config_defaults_are_the_released_architecture_and_validated():
    import json

    from conftest import FIXTURES
    from flair_hf_conversion.state_dict import original_shapes

    config = FlairConfig()
    manifest = json.loads((FIXTURES / "vit-b-16-flair-state-dict-manifest.json").read_text())
    assert original_shapes(config) == {e["name"]: tuple(e["shape"]) for e in manifest["state_dict"]}
    assert config.text_config.hidden_act == config.vision_config.hidden_act == "gelu"
    assert config.pooling_num_attention_heads == 8 and config.logit_bias_init_value == -10.0
    with pytest.raises(Exception, match="projection_dim \\(30\\) is not a multiple of pooling_num_attention_heads"):
        FlairConfig(projection_dim=30)


def test_config_files_of_earlier_versions_still_load(tiny_dir, tmp_path):
    """A saved config with `text_config.length_groups` (the length groups that packing replaced) loads as it is and
    gives the model it gave before (transformers keeps the unknown key, which nothing reads)."""
    import json
    import shutil

    shutil.copytree(tiny_dir, tmp_path / "old")
    config_file = tmp_path / "old" / "config.json"
    config = json.loads(config_file.read_text())
    config["text_config"]["length_groups"] = 4
    config_file.write_text(json.dumps(config))
    old, current = (FlairModel.from_pretrained(path).eval() for path in (tmp_path / "old", tiny_dir))
    ids = ids_ending_at([3, 40], torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(old.get_text_embeds(ids), current.get_text_embeds(ids), atol=0, rtol=0)
        torch.testing.assert_close(old.get_text_embeds(ids), old.text_projection(old.text_model(ids).pooler_output))
