"""Run under `torch.distributed.run` (gloo, CPU, float64): the distributed FLAIR loss and its gradients on every rank.

Also importable: `inputs_for_rank` and `pooling_head` give the same deterministic data to the single-process reference.
Usage: `distributed_loss_probe.py OUTPUT_DIR mps|no-mps|global [uneven]` (TCS + MPS, TCS alone, MPS alone;
`uneven`: the last rank has one image fewer).
"""

import os
import sys

import torch

B, K, D, L = 3, 2, 16, 5
LOGIT_SCALE, LOGIT_BIAS = 10.0, -5.0


def pooling_head():
    from flair_hf import FlairConfig
    from flair_hf.modeling_flair import FlairTextConditionedPooling

    config = FlairConfig(projection_dim=D, pooling_num_attention_heads=2)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    head = FlairTextConditionedPooling(config)
    for parameter in head.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    return head.double()


def inputs_for_rank(rank: int, batch_size: int = B):
    """Features `(B, D)`, `(B, L, D)`, `(B*K, D)` (float64) and the rank's own `text_indices` `(B, B + K - 1)`."""
    from flair_hf.loss import sample_text_indices

    generator = torch.Generator().manual_seed(100 + rank)
    features = {
        "image_features": torch.randn(batch_size, D, generator=generator, dtype=torch.float64),
        "image_tokens": torch.randn(batch_size, L, D, generator=generator, dtype=torch.float64),
        "text_features": torch.randn(batch_size * K, D, generator=generator, dtype=torch.float64),
    }
    return features, sample_text_indices(batch_size, K, generator)[1]


def main(output_dir: str, mps: str, uneven: bool = False) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from flair_hf.loss import distributed_flair_loss

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    features, text_indices = inputs_for_rank(rank, B - 1 if uneven and rank == world_size - 1 else B)
    features = {k: v.requires_grad_() for k, v in features.items()}
    head = pooling_head()
    try:
        loss = distributed_flair_loss(
            head, features["image_features"], features["image_tokens"], features["text_features"],
            torch.tensor(LOGIT_SCALE, dtype=torch.float64), torch.tensor(LOGIT_BIAS, dtype=torch.float64), K,
            text_indices=text_indices, add_mps_loss=mps != "no-mps", add_tcs_loss=mps != "global",
        )  # fmt: skip
    except ValueError as error:
        print(f"rank {rank} ValueError: {error}", file=sys.stderr)
        sys.exit(3)
    loss.backward()
    tensors = {"loss": loss.detach().reshape(1), "world_size": torch.tensor([world_size])}
    tensors.update({f"grad.{k}": torch.zeros_like(v) if v.grad is None else v.grad for k, v in features.items()})
    tensors.update({f"grad.pooling.{n}": torch.zeros_like(p) if p.grad is None else p.grad for n, p in head.named_parameters()})
    save_file(tensors, f"{output_dir}/rank{rank}.safetensors")
    dist.barrier()  # every rank's file is written
    # leave without tearing gloo down: a rank destroying its process group while a peer's is already gone aborts now
    # and then ("terminate called without an active exception", about 1 run in 16), after the results are complete
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], uneven=sys.argv[3:] == ["uneven"])
