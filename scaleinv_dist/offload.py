"""Saved activations in host memory, for activation_checkpointing=offload: each block's input
waits in pinned host memory from its forward to its backward (scaleinv_dist.model)."""
from __future__ import annotations

import torch

MIN_PIECE = 1 << 20  # bytes: the parts of a size below this stay one piece


def piece_sizes(nbytes: int) -> list[int]:
    """Sizes (bytes, largest first) that add up to nbytes: its powers of two of at least MIN_PIECE,
    and one piece for the rest."""
    big = [1 << b for b in range(nbytes.bit_length() - 1, -1, -1) if nbytes >> b & 1 and 1 << b >= MIN_PIECE]
    rest = nbytes - sum(big)
    return big + ([rest] if rest else [])


class HostOffload(torch.autograd.graph.saved_tensors_hooks):
    """torch.autograd.graph.save_on_cpu, with each saved tensor copied into host pieces of
    `piece_sizes`, so that the pinned memory held is the tensors' size.

    PyTorch's pinned-memory allocator rounds each request up to a power of two: with one piece per
    tensor, a 6 GiB block input (2M tokens x 768 fp32) would hold 8 GiB, and the 12 inputs of the
    162M model at 2M tokens 96 GiB instead of 72. The copy to the host is synchronous, the copy back
    asynchronous (pinned), as in save_on_cpu."""

    def __init__(self, pin_memory: bool):
        def pack(t: torch.Tensor):
            raw = t.detach().contiguous().view(-1).view(torch.uint8)
            pieces, at = [], 0
            for size in piece_sizes(raw.numel()):
                piece = torch.empty(size, dtype=torch.uint8, pin_memory=pin_memory)
                piece.copy_(raw[at:at + size])
                pieces.append(piece)
                at += size
            return t.device, t.dtype, t.shape, pieces

        def unpack(packed) -> torch.Tensor:
            device, dtype, shape, pieces = packed
            raw = torch.empty(sum(p.numel() for p in pieces), dtype=torch.uint8, device=device)
            at = 0
            for piece in pieces:
                raw[at:at + piece.numel()].copy_(piece, non_blocking=pin_memory)
                at += piece.numel()
            return raw.view(dtype).view(shape)

        super().__init__(pack, unpack)
