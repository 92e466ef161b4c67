"""What a CLIP user finds where CLIP has it: hidden states and attentions of both towers equal to `CLIPModel`'s
(loaded from the same directory), `get_*_features` of the same type and values, `return_dict=False` tuples in
`CLIPOutput`'s order, and the text tower cut at each end-of-text token only when the full states are not asked for."""

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from flair_hf import FlairProcessor

CAPTIONS = ["a small white puppy", "a red ladybug on green beads and leaves", "a door", "two men"]


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def models(tiny_dir, request):
    """FlairModel with each attention implementation (attention weights requested run eager), CLIPModel eager."""
    from flair_hf import FlairModel

    flair = FlairModel.from_pretrained(tiny_dir, attn_implementation=request.param).eval()
    return flair, CLIPModel.from_pretrained(tiny_dir, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def batch(tiny_dir):
    from PIL import Image

    from conftest import FIXTURES

    images = [Image.open(FIXTURES / "images" / name) for name in ("puppy.jpg", "arsenal.jpg")]
    return FlairProcessor.from_pretrained(tiny_dir)(text=CAPTIONS, images=images)  # padded, with attention_mask


def test_towers_hidden_states_and_attentions_equal_clip(models, batch):
    flair, clip = models
    flags = {"output_hidden_states": True, "output_attentions": True}
    with torch.no_grad():
        ours = flair(**batch, **flags)
        theirs = clip(**batch, **flags)
    layers = flair.config.text_config.num_hidden_layers
    ends = batch["input_ids"].argmax(-1)
    for tower in ("text_model_output", "vision_model_output"):
        mine, reference = ours[tower], theirs[tower]
        assert len(mine.hidden_states) == len(reference.hidden_states) == layers + 1
        assert len(mine.attentions) == len(reference.attentions) == layers
        for a, b in zip(mine.hidden_states + mine.attentions, reference.hidden_states + reference.attentions):
            assert a.shape == b.shape
            if tower == "text_model_output":  # up to each caption's end-of-text token (what reaches the pooled state)
                for row, end in enumerate(ends.tolist()):
                    torch.testing.assert_close(a[row, ..., : end + 1, :], b[row, ..., : end + 1, :], atol=2e-5, rtol=0)
            else:
                torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    # FLAIR's vision last_hidden_state has the post-LayerNorm on every token; CLIP's none
    vision = flair.vision_model
    torch.testing.assert_close(ours.vision_model_output.last_hidden_state, vision.post_layernorm(theirs.vision_model_output.last_hidden_state), atol=2e-5, rtol=0)
    torch.testing.assert_close(ours.text_embeds, theirs.text_embeds, atol=2e-6, rtol=0)
    torch.testing.assert_close(ours.image_embeds, theirs.image_embeds, atol=2e-6, rtol=0)
    assert ours.pooling_attentions.shape[:3] == (2, flair.config.pooling_num_attention_heads, len(CAPTIONS))


def test_get_features_return_what_clip_returns(models, batch):
    flair, clip = models
    with torch.no_grad():
        for name, inputs in (("get_text_features", {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}),
                             ("get_image_features", {"pixel_values": batch["pixel_values"]})):  # fmt: skip
            ours, theirs = getattr(flair, name)(**inputs), getattr(clip, name)(**inputs)
            assert type(ours) is type(theirs) is BaseModelOutputWithPooling
            torch.testing.assert_close(ours.pooler_output, theirs.pooler_output, atol=2e-6, rtol=0)
            assert ours.last_hidden_state.shape == theirs.last_hidden_state.shape
            as_tuple = getattr(flair, name)(**inputs, return_dict=False)
            assert isinstance(as_tuple, tuple) and len(as_tuple) == len(getattr(clip, name)(**inputs, return_dict=False))
            hidden = getattr(flair, name)(**inputs, output_hidden_states=True).hidden_states
            assert len(hidden) == flair.config.text_config.num_hidden_layers + 1
        # the fast tensor methods give the same embeddings
        torch.testing.assert_close(flair.get_text_embeds(batch["input_ids"], batch["attention_mask"]),
                                   clip.get_text_features(input_ids=batch["input_ids"]).pooler_output, atol=2e-6, rtol=0)  # fmt: skip
        torch.testing.assert_close(flair.get_image_embeds(batch["pixel_values"]), clip.get_image_features(pixel_values=batch["pixel_values"]).pooler_output, atol=2e-6, rtol=0)


def test_tuple_output_is_in_clip_order(models, batch):
    flair, clip = models
    with torch.no_grad():
        ours, theirs = flair(**batch, return_dict=False), clip(**batch, return_dict=False)
        as_dict = flair(**batch)
    # CLIPOutput without a loss: logits_per_image, logits_per_text, text_embeds, image_embeds, text/vision outputs
    assert isinstance(ours, tuple) and len(theirs) == 6
    torch.testing.assert_close(ours[0], as_dict.logits_per_image, atol=0, rtol=0)
    torch.testing.assert_close(ours[1], as_dict.logits_per_text, atol=0, rtol=0)
    for index in (2, 3):  # text_embeds, image_embeds: the same normalised embeddings as CLIP's
        torch.testing.assert_close(ours[index], theirs[index], atol=2e-6, rtol=0)
    torch.testing.assert_close(ours[5][0], as_dict.vision_model_output.last_hidden_state, atol=0, rtol=0)
    torch.testing.assert_close(ours[6], as_dict.logits_per_image_as_clip, atol=0, rtol=0)
    torch.testing.assert_close(as_dict.logits_per_image_as_clip, theirs[0], atol=2e-5, rtol=0)
    flair.config.return_dict = False  # the config's setting is one path with the argument's
    try:
        assert isinstance(flair(**batch), tuple) and isinstance(flair.get_text_features(batch["input_ids"]), tuple)
    finally:
        flair.config.return_dict = True


def test_text_tower_runs_in_full_only_when_its_states_are_asked_for(models, batch):
    flair, _ = models
    with torch.no_grad():
        plain = flair(**batch)
        full = flair(**batch, output_hidden_states=True)
    assert plain.text_model_output.last_hidden_state is None and plain.text_model_output.pooler_output is not None
    assert full.text_model_output.last_hidden_state.shape[:2] == batch["input_ids"].shape
    torch.testing.assert_close(plain.logits_per_image, full.logits_per_image, atol=1e-5, rtol=0)
    with torch.no_grad():  # without a padding mask, attention weights requested (eager) still get the causal mask
        unmasked = flair(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], output_attentions=True)
    torch.testing.assert_close(unmasked.logits_per_image, plain.logits_per_image, atol=1e-5, rtol=0)


def test_loss_output_embeddings_are_normalised(models, batch):
    flair, _ = models
    with torch.no_grad():
        output = flair(input_ids=batch["input_ids"][:2], pixel_values=batch["pixel_values"], return_loss=True,
                       captions_per_image=1, loss_across_ranks=False)  # fmt: skip
    assert output.loss.ndim == 0
    for embeds in (output.text_embeds, output.image_embeds):
        torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(output.text_embeds, F.normalize(flair.get_text_embeds(batch["input_ids"][:2]), dim=-1), atol=1e-6, rtol=0)



@pytest.mark.parametrize("return_loss", [False, True])
def test_tuple_positions_are_clips_whatever_is_none(models, batch, return_loss):
    """Each CLIPOutput field sits at CLIPModel's tuple index, with and without a loss (FLAIR's logits are None then)."""
    from transformers.models.clip.modeling_clip import CLIPOutput

    flair, clip = models
    inputs = {key: batch[key][:2] for key in ("input_ids", "attention_mask")} | {"pixel_values": batch["pixel_values"]}
    options = {"captions_per_image": 1, "loss_across_ranks": False} if return_loss else {}
    with torch.no_grad():
        ours, ours_dict = flair(**inputs, return_loss=return_loss, return_dict=False, **options), flair(**inputs, return_loss=return_loss, **options)
        theirs, theirs_dict = clip(**inputs, return_loss=return_loss, return_dict=False), clip(**inputs, return_loss=return_loss)
    clip_slots = [name for name in CLIPOutput.__dataclass_fields__ if getattr(theirs_dict, name) is not None]
    assert len(theirs) == len(clip_slots) == 6 + return_loss
    for index, name in enumerate(clip_slots):
        expected = getattr(ours_dict, name)
        if name.endswith("model_output"):  # a tower's output, as its own tuple
            assert isinstance(theirs[index], tuple), (index, name)
            ours_slot, expected = ours[index][0], expected.to_tuple()[0]
        else:
            assert torch.is_tensor(theirs[index]), (index, name)
            ours_slot = ours[index]
        if expected is None:  # FLAIR's logits under return_loss=True: the slot is kept, empty
            assert ours_slot is None and return_loss and name.startswith("logits"), (index, name)
        else:
            torch.testing.assert_close(ours_slot, expected, atol=0, rtol=0, msg=f"slot {index} is not {name}")
    if not return_loss:  # FLAIR's own fields follow CLIP's
        torch.testing.assert_close(ours[6], ours_dict.logits_per_image_as_clip, atol=0, rtol=0)
