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


def test_two_process_loss_and_gradients_equal_single_process(tmp_path):
    """2 gloo processes: per-rank losses and all gradients equal one process computing the same formula."""
    import os
    import subprocess
    import sys

    from conftest import ROOT
    from distributed_loss_probe import K, inputs_for_rank, pooling_head
    from flair_hf.loss import flair_loss

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               str(ROOT / "tests" / "distributed_loss_probe.py"), str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    assert all(r["world_size"].item() == 2 for r in ranks)

    head = pooling_head()
    inputs = [inputs_for_rank(r, 2) for r in range(2)]
    features = [{k: v.requires_grad_() for k, v in f.items()} for f, _ in inputs]
    total = 0
    for r in range(2):
        loss = flair_loss(
            head, features[r]["image_features"], features[r]["image_tokens"], features[r]["text_features"],
            torch.tensor(10.0), torch.tensor(-5.0), K, remote_text_features=[features[1 - r]["text_features"]],
            **inputs[r][1],
        )  # fmt: skip
        torch.testing.assert_close(loss.detach().reshape(1), ranks[r]["loss"])
        total = total + loss
    total.backward()
    for r in range(2):
        for name, value in features[r].items():
            torch.testing.assert_close(ranks[r][f"grad.{name}"], value.grad, atol=1e-6, rtol=1e-5)
    for name, parameter in head.named_parameters():
        summed = ranks[0][f"grad.pooling.{name}"] + ranks[1][f"grad.pooling.{name}"]
        torch.testing.assert_close(summed, parameter.grad, atol=1e-6, rtol=1e-5)
    # the cross-rank term matters: without it the loss differs
    alone = flair_loss(head, *(features[0][k].detach() for k in ("image_features", "image_tokens", "text_features")),
                       torch.tensor(10.0), torch.tensor(-5.0), K, text_indices=inputs[0][1]["text_indices"])  # fmt: skip
    assert abs(alone.item() - ranks[0]["loss"].item()) > 1e-3


def test_model_forward_return_loss_equals_flair_loss(tiny_model, tiny_reference):
    pixels = tiny_reference["pixel_values"][:2]
    ids = tiny_reference["input_ids"].long()[:6]
    torch.manual_seed(0)
    with torch.no_grad():
        output = tiny_model(input_ids=ids, pixel_values=pixels, return_loss=True, captions_per_image=3)
        torch.manual_seed(0)
        expected = flair_loss(
            tiny_model.text_conditioned_pooling, tiny_model.get_image_features(pixels),
            tiny_model.get_image_token_features(pixels), tiny_model.get_text_features(ids),
            tiny_model.logit_scale.exp(), tiny_model.logit_bias, captions_per_image=3,
        )  # fmt: skip
    assert output.loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert output.logits_per_image is None
    with pytest.raises(ValueError, match="captions_per_image"):
        tiny_model(input_ids=ids, pixel_values=pixels, return_loss=True)
