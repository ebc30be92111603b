"""Placements of a tensor across the ranks of one mesh axis: Replicate, Shard(dim), Partial."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

__all__ = [
    "Blocks",
    "Partial",
    "Placement",
    "Replicate",
    "Shard",
    "block_sizes",
    "padded_size",
    "placement_str",
    "shard_tensor",
    "unshard_tensor",
]


class Placement:
    """Base class of the three placements; instances are frozen and hashable."""

    def is_replicate(self) -> bool:
        return isinstance(self, Replicate)

    def is_shard(self, dim: int | None = None) -> bool:
        return isinstance(self, Shard) and (dim is None or self.dim == dim)

    def is_partial(self) -> bool:
        return isinstance(self, Partial)


@dataclass(frozen=True)
class Replicate(Placement):
    """Every rank holds the whole tensor."""

    def __str__(self) -> str:
        return "R"


@dataclass(frozen=True)
class Shard(Placement):
    """Every rank holds one contiguous chunk of the tensor along `dim` (non-negative)."""

    dim: int

    def __str__(self) -> str:
        return f"S({self.dim})"


@dataclass(frozen=True)
class Partial(Placement):
    """Every rank holds a full-shape addend; the tensor is the sum over ranks."""

    reduce_op: str = "sum"

    def __str__(self) -> str:
        return "P"


def placement_str(placement: Placement | tuple | None) -> str:
    """Compact text of a placement or of a tuple of them (multi-output ops)."""
    if placement is None:
        return "-"
    if isinstance(placement, tuple):
        return "(" + ", ".join(placement_str(p) for p in placement) + ")"
    return str(placement)


def padded_size(size: int, tp: int) -> int:
    """`size` rounded up to a multiple of tp: the global size of a vocab dim sharded with padding.

    A padded `Shard(dim)` keeps the one vocabulary: each rank holds `padded_size(size, tp) // tp`
    entries of `dim`, the last rank's tail being zero padding that outputs and gradients never see.
    """
    return -(-size // tp) * tp


Blocks = int | tuple[int, ...]  # equal blocks (a count) or the global size of each block


def block_sizes(size: int, blocks: Blocks) -> list[int]:
    """The global sizes of a shard dim's blocks: `blocks` equal ones, or the sizes given."""
    if isinstance(blocks, int):
        return [size // blocks] * blocks
    return list(blocks)


def shard_tensor(
    full: torch.Tensor,
    placement: Placement,
    tp: int,
    rank: int,
    blocks: Blocks = 1,
    padded: int | None = None,
) -> torch.Tensor:
    """This rank's local piece of a full tensor.

    blocks: parts of the dim sharded separately (a fused q|k|v: equal parts by count, or the
    sizes of unequal ones); padded: the global size of the dim after zero padding (vocab
    padding), so every rank holds padded/tp entries.
    """
    if not isinstance(placement, Shard):
        return full
    dim = placement.dim
    blocked = blocks != 1
    if padded is not None and padded != full.shape[dim]:
        if blocked or padded % tp or padded < full.shape[dim]:
            raise ValueError(
                f"cannot pad dim {dim} of size {full.shape[dim]} to {padded} for "
                f"{tp} shards" + (f" of blocks {blocks}" if blocked else "")
            )
        pad = [0, 0] * (full.dim() - 1 - dim) + [0, padded - full.shape[dim]]
        full = torch.nn.functional.pad(full, pad)
    sizes = block_sizes(full.shape[dim], blocks)
    if sum(sizes) != full.shape[dim] or any(s % tp for s in sizes):
        raise ValueError(
            f"size {full.shape[dim]} of dim {dim} cannot be split into {tp} shards"
            + (f" of blocks {blocks}" if blocked else "")
        )
    parts = full.split(sizes, dim=dim)
    return torch.cat([p.chunk(tp, dim=dim)[rank] for p in parts], dim=dim)


def unshard_tensor(
    pieces: list[torch.Tensor], placement: Shard, blocks: Blocks = 1, size: int | None = None
) -> torch.Tensor:
    """The full tensor from every rank's piece (the inverse of `shard_tensor`); size: the real
    size of a padded dim, whose padding is dropped."""
    dim, tp = placement.dim, len(pieces)
    total = sum(p.shape[dim] for p in pieces)
    local = [s // tp for s in block_sizes(total, blocks)]
    per_rank = [p.split(local, dim=dim) for p in pieces]
    full = torch.cat([torch.cat([r[b] for r in per_rank], dim) for b in range(len(local))], dim)
    return full if size is None else full.narrow(dim, 0, size)
