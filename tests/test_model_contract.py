"""What a transformers user does with any model, on FlairModel: sharded save/load round trips,
`device_map="auto"`, `torch.compile` of the towers, `torch.export` of the image tower, deterministic initialisation."""

import pytest
import torch

from flair_hf import FlairConfig, FlairModel

from conftest import MethodAsModule
from initialisation import assert_original_initialisation

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


@pytest.fixture(scope="module")
def inputs(tiny_reference):
    return tiny_reference["input_ids"].long(), tiny_reference["pixel_values"]


def logits(model, inputs):
    with torch.no_grad():
        return model(input_ids=inputs[0], pixel_values=inputs[1].to(model.dtype)).logits_per_image.float()


def test_sharded_safetensors_round_trip(tiny_model, inputs, tmp_path):
    tiny_model.save_pretrained(tmp_path, max_shard_size="200KB")
    shards = sorted(path.name for path in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file() and not list(tmp_path.glob("*.bin"))
    loaded = FlairModel.from_pretrained(tmp_path).eval()
    for name, tensor in tiny_model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, atol=0, rtol=0, msg=name)
    # equal weights, equal logits up to float32 rounding: the loaded tensors are views into the files at other memory
    # alignments, which the one-row GEMMs of the last text layer round differently in the last bit or two
    reference, eps = logits(tiny_model, inputs), torch.finfo(torch.float32).eps
    torch.testing.assert_close(logits(loaded, inputs), reference, rtol=4 * eps, atol=4 * eps * reference.abs().max().item())


def test_device_map_auto_on_cpu(tiny_dir, tiny_model, inputs):
    mapped = FlairModel.from_pretrained(tiny_dir, device_map="auto").eval()
    assert {p.device.type for p in mapped.parameters()} == {"cpu"}
    torch.testing.assert_close(logits(mapped, inputs), logits(tiny_model, inputs), atol=1e-6, rtol=0)


def test_compiled_towers_equal_eager(tiny_model, inputs):
    ids, pixels = inputs
    with torch.no_grad():
        image = torch.compile(tiny_model.get_image_embeds, backend="aot_eager", fullgraph=False)(pixels)
        text = torch.compile(tiny_model.get_text_embeds, backend="aot_eager", fullgraph=False)(ids)
        torch.testing.assert_close(image, tiny_model.get_image_embeds(pixels), atol=1e-5, rtol=0)
        torch.testing.assert_close(text, tiny_model.get_text_embeds(ids), atol=1e-5, rtol=0)


def test_exported_image_tower_equals_eager_on_another_batch_size(tiny_model, inputs):
    """`torch.export` of the image features (global embeddings and patch tokens) with a dynamic batch: the graph made
    on 2 images gives eager's outputs on 5. (The text tower's export: `test_modeling.py`.)"""
    pixels, features = inputs[1], MethodAsModule(tiny_model, "get_image_and_token_features").eval()
    with torch.no_grad():
        exported = torch.export.export(features, (pixels[:2],), dynamic_shapes=({0: torch.export.Dim("images")},))
        for got, expected in zip(exported.module()(pixels[1:]), tiny_model.get_image_and_token_features(pixels[1:]), strict=True):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_initialisation_is_deterministic_and_complete():
    config = FlairConfig(projection_dim=32, text_config=SMALL, vision_config={**SMALL, "image_size": 32, "patch_size": 8})
    models = []
    for _ in range(2):
        torch.manual_seed(3)
        models.append(FlairModel(config))
    for (name, first), second in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        torch.testing.assert_close(first, second, atol=0, rtol=0, msg=name)
    assert_original_initialisation(models[0])  # every tensor written, each with the original's distribution
    torch.manual_seed(4)
    other = FlairModel(config)
    assert not torch.equal(other.text_model.encoder.layers[0].self_attn.q_proj.weight, models[0].text_model.encoder.layers[0].self_attn.q_proj.weight)
