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


def written_out_loss(head, image_features, image_tokens, terms, K, logit_scale, logit_bias, add_mps, add_tcs=True):
    """The FLAIR loss written out pair by pair (independent of `flair_hf.loss`): `terms` is `[(texts, indices)]`,
    this rank's first (its captions positive), then each other rank's (all negative); each term the mean of its
    TCS (if `add_tcs`) and MPS (if `add_mps`) parts."""
    import torch.nn.functional as F

    def sigmoid_sum(logits, labels):
        return -F.logsigmoid(labels * logits).sum()

    def tcs(texts, rows, positives):
        total = 0
        for i, image_rows in enumerate(rows):
            pooled = head(texts[image_rows], image_tokens[i : i + 1])[0][0]
            logits = logit_scale * F.cosine_similarity(pooled, texts[image_rows], dim=-1) + logit_bias
            labels = torch.tensor([1.0 if positives and row // K == i else -1.0 for row in image_rows.tolist()])
            total = total + sigmoid_sum(logits, labels.to(logits.dtype))
        return total / rows.shape[1]

    def mps(texts, positives):
        logits = logit_scale * F.cosine_similarity(image_features[:, None], texts[None], dim=-1) + logit_bias
        labels = torch.tensor([[1.0 if positives and t // K == i else -1.0 for t in range(texts.shape[0])]
                               for i in range(logits.shape[0])]).to(logits.dtype)  # fmt: skip
        return sigmoid_sum(logits, labels) / texts.shape[0]

    def term(texts, rows, positives):
        parts = ([tcs(texts, rows, positives)] if add_tcs else []) + ([mps(texts, positives)] if add_mps else [])
        return sum(parts) / len(parts)

    return sum(term(texts, rows, positives=index == 0) for index, (texts, rows) in enumerate(terms))


def reference_rank_loss(head, features, indices, rank, mode):
    """The cross-rank formula for one rank of the distributed probe (`mode` as the probe's)."""
    from distributed_loss_probe import K, LOGIT_BIAS, LOGIT_SCALE

    order = [rank] + [other for other in range(len(features)) if other != rank]
    terms = [(features[r]["text_features"], indices[r]) for r in order]
    mine = features[rank]
    return written_out_loss(head, mine["image_features"], mine["image_tokens"], terms, K, LOGIT_SCALE, LOGIT_BIAS,
                            add_mps=mode != "no-mps", add_tcs=mode != "global")  # fmt: skip


def run_probe(tmp_path, world_size, mps, port, uneven=False):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world_size), "--master_port",
               str(port), str(ROOT / "tests" / "distributed_loss_probe.py"), str(tmp_path), mps]  # fmt: skip
    command += ["uneven"] if uneven else []
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("world_size, mps, port", [(2, "mps", 29517), (3, "mps", 29518), (3, "no-mps", 29519), (2, "global", 29521)])
def test_distributed_loss_and_gradients_equal_single_process_formula(tmp_path, world_size, mps, port):
    """gloo ranks: per-rank losses and all gradients equal one process evaluating the cross-rank formula (1e-6 rel)."""
    from distributed_loss_probe import inputs_for_rank, pooling_head

    result = run_probe(tmp_path, world_size, mps, port)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(world_size)]
    assert all(r["world_size"].item() == world_size for r in ranks)

    head = pooling_head()
    inputs = [inputs_for_rank(r) for r in range(world_size)]
    features = [{k: v.requires_grad_() for k, v in f.items()} for f, _ in inputs]
    indices = [i for _, i in inputs]
    losses = [reference_rank_loss(head, features, indices, r, mps) for r in range(world_size)]
    sum(losses).backward()
    for r in range(world_size):
        torch.testing.assert_close(ranks[r]["loss"], losses[r].detach().reshape(1), rtol=1e-6, atol=0)
        for name, value in features[r].items():
            expected = torch.zeros_like(value) if value.grad is None else value.grad
            torch.testing.assert_close(ranks[r][f"grad.{name}"], expected, rtol=1e-6, atol=1e-12)
    for name, parameter in head.named_parameters():
        summed = sum(ranks[r][f"grad.pooling.{name}"] for r in range(world_size))
        expected = torch.zeros_like(parameter) if parameter.grad is None else parameter.grad  # no head in the global loss
        torch.testing.assert_close(summed, expected, rtol=1e-6, atol=1e-12)
    # the cross-rank terms matter: the local loss alone is smaller by the remote negatives
    from flair_hf.loss import flair_loss

    detached = [features[0][k].detach() for k in ("image_features", "image_tokens", "text_features")]
    alone = flair_loss(head, *detached, torch.tensor(10.0), torch.tensor(-5.0), 2, text_indices=indices[0],
                       add_mps_loss=mps != "no-mps", add_tcs_loss=mps != "global")  # fmt: skip
    assert ranks[0]["loss"].item() - alone.item() > 1e-3


def test_distributed_loss_uneven_batches_is_a_clear_error(tmp_path):
    result = run_probe(tmp_path, 2, "mps", 29520, uneven=True)
    assert result.returncode != 0
    assert "needs the same batch size on every rank (rank 0: 3 images / 6 texts, rank 1: 2 images / 4 texts)" in result.stderr


@pytest.mark.parametrize("add_mps", [False, True])
def test_remote_terms_follow_the_other_ranks_indices(tiny_model, loss_reference, add_mps):
    """A remote term is the other rank's TCS grid with all labels negative (plus its global grid with MPS): equal to
    the written-out formula for either set of the other rank's indices, and different between them."""
    r = loss_reference
    head, K = tiny_model.text_conditioned_pooling, 3
    args = (r["image_features"], r["image_tokens"], r["text_features"], r["logit_scale"], torch.tensor(0.0), K)
    remote_texts = r["text_features"].flip(0)
    other_indices = sample_text_indices(4, K, torch.Generator().manual_seed(3))[1]
    with torch.no_grad():
        with_remote = []
        for indices in (r["selected_text_indices"], other_indices):
            loss = flair_loss(head, *args, text_indices=r["selected_text_indices"], remote_text_features=[remote_texts],
                              remote_text_indices=[indices], add_mps_loss=add_mps)  # fmt: skip
            terms = [(r["text_features"], r["selected_text_indices"]), (remote_texts, indices)]
            expected = written_out_loss(head, r["image_features"], r["image_tokens"], terms, K, r["logit_scale"], 0.0, add_mps)
            assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=0)
            with_remote.append(loss)
    assert abs(with_remote[0] - with_remote[1]) > 1e-2
    with pytest.raises(ValueError, match="per-rank batch sizes must be equal"):
        flair_loss(head, *args, remote_text_features=[remote_texts[:9]], remote_text_indices=[other_indices])


def test_model_forward_return_loss_equals_flair_loss(tiny_model, tiny_reference):
    """`FlairModel(return_loss=True)` against the written-out formula, its negatives drawn from the same seed."""
    pixels = tiny_reference["pixel_values"][:2]
    ids = tiny_reference["input_ids"].long()[:6]
    torch.manual_seed(0)
    with torch.no_grad():
        output = tiny_model(input_ids=ids, pixel_values=pixels, return_loss=True, captions_per_image=3)
        torch.manual_seed(0)
        indices = sample_text_indices(2, 3)[1]  # what the model drew
        image_features, tokens = tiny_model.get_image_and_token_features(pixels)
        expected = written_out_loss(tiny_model.text_conditioned_pooling, image_features, tokens, [(tiny_model.get_text_embeds(ids), indices)],
                                    3, tiny_model.logit_scale.exp(), tiny_model.logit_bias, add_mps=True)  # fmt: skip
    assert output.loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert output.logits_per_image is None
    with pytest.raises(ValueError, match="captions_per_image"):
        tiny_model(input_ids=ids, pixel_values=pixels, return_loss=True)


def test_global_loss_alone_is_the_multi_positive_formula_and_leaves_the_head_out(tiny_model, tiny_reference):
    """`add_tcs_loss=False` (the SigLIP-style baseline): the written-out MPS alone; the pooling head gets no gradient."""
    pixels = tiny_reference["pixel_values"][:2]
    ids = tiny_reference["input_ids"].long()[:6]
    tiny_model.zero_grad(set_to_none=True)
    output = tiny_model(input_ids=ids, pixel_values=pixels, return_loss=True, captions_per_image=3, add_tcs_loss=False)
    output.loss.backward()
    with torch.no_grad():
        image_features, tokens = tiny_model.get_image_and_token_features(pixels)
        texts = tiny_model.get_text_embeds(ids)
        expected = written_out_loss(tiny_model.text_conditioned_pooling, image_features, tokens, [(texts, None)], 3,
                                    tiny_model.logit_scale.exp(), tiny_model.logit_bias, add_mps=True, add_tcs=False)  # fmt: skip
    assert output.loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert all(p.grad is None for p in tiny_model.text_conditioned_pooling.parameters())
    assert tiny_model.visual_projection.weight.grad is not None
    tiny_model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="add_tcs_loss=False needs add_mps_loss=True"):
        tiny_model(input_ids=ids, pixel_values=pixels, return_loss=True, captions_per_image=3, add_tcs_loss=False, add_mps_loss=False)
