"""The FLAIR loss equals the original FlairLoss on the recorded inputs and negatives."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES
from flair_hf.loss import flair_loss, sample_text_indices, text_indices_from_offsets


@pytest.fixture(scope="module")
def loss_reference():
    return load_file(FIXTURES / "tiny" / "loss_reference.safetensors")


def test_recorded_offsets_give_recorded_indices(loss_reference):
    indices = text_indices_from_offsets(loss_reference["random_offsets"], captions_per_image=3)
    assert torch.equal(indices, loss_reference["selected_text_indices"])


@pytest.mark.parametrize("add_mps, name", [(False, "loss_tcs_only"), (True, "loss_tcs_plus_mps")])
def test_loss_matches_reference(tiny_model, loss_reference, add_mps, name):
    r = loss_reference
    with torch.no_grad():
        loss = flair_loss(
            tiny_model.text_conditioned_pooling, r["image_features"], r["image_tokens"], r["text_features"],
            r["logit_scale"], r["logit_bias"], captions_per_image=3,
            text_indices=r["selected_text_indices"], add_mps_loss=add_mps,
        )  # fmt: skip
    assert abs(loss.item() - r[name].item()) <= 1e-5, (loss.item(), r[name].item())


def test_sampling_shapes_and_positives():
    generator = torch.Generator().manual_seed(0)
    offsets, indices = sample_text_indices(5, 4, generator)
    assert offsets.shape == (5, 4) and indices.shape == (5, 8)
    for i in range(5):
        assert indices[i, i : i + 4].tolist() == [i * 4 + k for k in range(4)]
        others = [j for j in range(5) if j != i]
        negatives = [int(x) for x in indices[i] if x // 4 != i]
        assert [x // 4 for x in negatives] == others


def test_mismatched_caption_count_is_an_error(tiny_model, loss_reference):
    r = loss_reference
    with pytest.raises(ValueError, match="expected 3 captions per image: 4 images need 12 text rows, got 11"):
        flair_loss(tiny_model.text_conditioned_pooling, r["image_features"], r["image_tokens"], r["text_features"][:11],
                   r["logit_scale"], r["logit_bias"], captions_per_image=3)  # fmt: skip
