"""Run under `torch.distributed.run` (gloo, CPU): the distributed FLAIR loss and its gradients on every rank.

Also importable: `inputs_for_rank` and `pooling_head` give the same deterministic data to the single-process reference.
"""

import sys

import torch

B, K, D, L = 3, 2, 16, 5


def pooling_head():
    from flair_hf import FlairConfig
    from flair_hf.modeling_flair import FlairTextConditionedPooling

    config = FlairConfig(projection_dim=D, pooling_num_attention_heads=2)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    head = FlairTextConditionedPooling(config)
    for parameter in head.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    return head


def inputs_for_rank(rank: int, world_size: int):
    generator = torch.Generator().manual_seed(100 + rank)
    features = {
        "image_features": torch.randn(B, D, generator=generator),
        "image_tokens": torch.randn(B, L, D, generator=generator),
        "text_features": torch.randn(B * K, D, generator=generator),
    }
    from flair_hf.loss import sample_remote_text_indices, sample_text_indices

    indices = {
        "text_indices": sample_text_indices(B, K, generator)[1],
        "remote_text_indices": [sample_remote_text_indices(B, B, K, generator) for _ in range(world_size - 1)],
    }
    return features, indices


def main(output_dir: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from flair_hf.loss import distributed_flair_loss

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    features, indices = inputs_for_rank(rank, world_size)
    features = {k: v.requires_grad_() for k, v in features.items()}
    head = pooling_head()
    loss = distributed_flair_loss(
        head, features["image_features"], features["image_tokens"], features["text_features"],
        torch.tensor(10.0), torch.tensor(-5.0), K, **indices,
    )  # fmt: skip
    loss.backward()
    tensors = {"loss": loss.detach().reshape(1), "world_size": torch.tensor([world_size])}
    tensors.update({f"grad.{k}": v.grad for k, v in features.items()})
    tensors.update({f"grad.pooling.{n}": p.grad for n, p in head.named_parameters()})
    save_file(tensors, f"{output_dir}/rank{rank}.safetensors")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
