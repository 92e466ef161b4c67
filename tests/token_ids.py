"""Token ids of random captions with chosen end-of-text positions, for the tests of length-dependent text paths."""

import torch


def ids_ending_at(ends, generator: torch.Generator) -> torch.Tensor:
    """`(len(ends), 77)` ids: start token, random tokens, end-of-text at `ends[i]`, zero padding after it."""
    ends = torch.as_tensor(ends)
    ids = torch.randint(1, 49406, (len(ends), 77), generator=generator)
    ids[:, 0] = 49406
    ids[torch.arange(len(ends)), ends] = 49407
    ids[torch.arange(77)[None, :] > ends[:, None]] = 0
    return ids
