"""Run under `torch.distributed.run` (gloo, CPU, float64): FSDP2 gradients of the FLAIR loss when the text tower runs
on packed rows (the positions up to each end-of-text token), with caption lengths that differ across ranks; then text
embeddings of different numbers of texts per rank (none on one), as evaluation shards them.

Also importable: `build_model` and `batch_for_rank` give the single-process reference the same model and data.
Usage: `fsdp_packed_text_probe.py OUTPUT_FILE`; rank 0 writes the full gradients and the per-rank losses.
"""

import sys

import torch

B, K = 2, 3


def build_model():
    import flair_hf.text_packing as text_packing
    from flair_hf import FlairConfig, FlairModel

    # one process splits its texts into calls of at most 16 positions; ranks of a distributed run make one call each
    text_packing.CPU_TEXT_ROWS_PER_CALL = 16

    small = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = FlairConfig(
        projection_dim=16, text_config=small, vision_config={**small, "image_size": 32}
    )
    torch.manual_seed(0)
    model = FlairModel(config).double()
    from flair_hf_training.train import set_scalar_shapes

    set_scalar_shapes(model, (1,))  # as the trainer: FSDP2 takes no 0-d parameters
    return model


def batch_for_rank(rank: int):
    """Pixels `(B, 3, 32, 32)` and `(B*K, 77)` ids whose end-of-text positions differ per rank."""
    from flair_hf_benchmarks.synthetic import ids_ending_at

    generator = torch.Generator().manual_seed(10 + rank)
    ids = ids_ending_at(torch.randint(1, 77 if rank == 0 else 20, (B * K,), generator=generator), generator)
    return torch.randn(B, 3, 32, 32, generator=generator, dtype=torch.float64), ids


def texts_for_rank(rank: int) -> torch.Tensor:
    """5 captions on rank 0, none on rank 1 (whose text tower still runs once, on a one-token stand-in)."""
    return batch_for_rank(rank)[1][: 5 if rank == 0 else 0]


def rank_loss(model, rank: int):
    pixels, ids = batch_for_rank(rank)
    torch.manual_seed(100 + rank)  # the loss samples its negatives from the global generator
    return model(input_ids=ids, pixel_values=pixels, return_loss=True, captions_per_image=K, loss_across_ranks=False).loss


def main(output: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = build_model()
    for tower in (model.text_model, model.vision_model):
        for layer in tower.encoder.layers:
            fully_shard(layer)
    fully_shard(model)
    loss = rank_loss(model, rank)
    loss.backward()  # FSDP2 averages the gradients over ranks
    gradients = {name: p.grad.full_tensor() for name, p in model.named_parameters() if p.grad is not None}
    losses = [torch.zeros((), dtype=torch.float64) for _ in range(dist.get_world_size())]
    dist.all_gather(losses, loss.detach())
    with torch.no_grad():  # text embeddings outside forward: the root's parameters unsharded by hand, the layers' by FSDP2
        model.unshard()
        embeds = model.get_text_embeds(texts_for_rank(rank))
        model.reshard()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, embeds)
    if rank == 0:
        torch.save({"gradients": gradients, "losses": torch.stack(losses), "text_embeds": gathered}, output)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
