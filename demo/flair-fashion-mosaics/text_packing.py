"""Running each text only up to its end-of-text token: packing, and the CPU's row budget per text-tower call.

Under the causal mask no position after a text's end-of-text token reaches its pooled state, so the text tower may
drop them. `TextPacking` keeps a batch's positions up to each end-of-text token as rows (LayerNorms, projections and
MLPs run on these alone); `text_tower_calls` says in how many calls a batch runs (`CPU_TEXT_ROWS_PER_CALL`), and
`scoring.length_sorted_groups` which texts go together.
"""

import math

import torch

CPU_TEXT_ROWS_PER_CALL = 2560  # positions per text-tower call on the CPU: one call over many more runs slower there
# (allocations past glibc's 32 MiB mmap threshold fault their pages in on every call); measured on a 2-core CPU


def at_positions(states: torch.Tensor, positions: torch.LongTensor) -> torch.Tensor:
    """`states[b, positions[b]]` for every sequence `b`: `(batch, ...)` (traceable: no Python batch size)."""
    return states[torch.arange(states.shape[0], device=states.device), positions]


def text_tower_calls(ends: torch.LongTensor, device: torch.device, distributed: bool) -> int:
    """How many calls texts with end-of-text tokens at `ends` (on the host) run in: on the CPU, enough for at most
    `CPU_TEXT_ROWS_PER_CALL` kept positions each (at most one per text); elsewhere, and under torch.distributed
    (where ranks must make equal calls), one."""
    if device.type != "cpu" or distributed:
        return 1
    return min(math.ceil(int((ends + 1).sum()) / CPU_TEXT_ROWS_PER_CALL), len(ends))


class TextPacking:
    """The positions of a `(batch, length)` text batch up to each end-of-text token, as rows `(tokens, ...)`.

    Packed, a layer's LayerNorms, projections and MLP run on these rows alone; its attention runs on them padded back
    to `(batch, length, ...)` with zeros after each end-of-text token, which no kept position attends to under the
    causal mask. `ends` may sit on the host (no device sync); the index follows the rows to their device."""

    def __init__(self, ends: torch.LongTensor, length: int, device: torch.device):
        kept = torch.arange(length, device=ends.device) <= ends[:, None]
        self.shape = tuple(kept.shape)
        self.index = kept.flatten().nonzero().squeeze(1).to(device)

    def pack(self, states: torch.Tensor) -> torch.Tensor:
        """`(batch, length, ...)` -> the kept rows `(tokens, ...)`."""
        return states.flatten(0, 1).index_select(0, self.index.to(states.device))

    def pad(self, rows: torch.Tensor) -> torch.Tensor:
        """The kept rows `(tokens, ...)` -> `(batch, length, ...)`, zeros elsewhere."""
        padded = rows.new_zeros(self.shape[0] * self.shape[1], *rows.shape[1:])
        return padded.index_copy_(0, self.index.to(rows.device), rows).view(*self.shape, *rows.shape[1:])
