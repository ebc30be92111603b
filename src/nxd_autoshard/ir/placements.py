"""Placements of a tensor across the ranks of one mesh axis: Replicate, Shard(dim), Partial."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

__all__ = ["Placement", "Replicate", "Shard", "Partial", "padded_size", "placement_str"]


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


def shard_tensor(
    full: torch.Tensor,
    placement: Placement,
    tp: int,
    rank: int,
    blocks: int = 1,
    padded: int | None = None,
) -> torch.Tensor:
    """This rank's local piece of a full tensor.

    blocks: equal parts of the dim sharded separately (fused qkv); padded: the global size of the
    dim after zero padding (vocab padding), so every rank holds padded/tp entries.
    """
    if not isinstance(placement, Shard):
        return full
    dim = placement.dim
    if padded is not None and padded != full.shape[dim]:
        if blocks > 1 or padded % tp or padded < full.shape[dim]:
            raise ValueError(
                f"cannot pad dim {dim} of size {full.shape[dim]} to {padded} for "
                f"{tp} shards" + (f" of {blocks} blocks" if blocks > 1 else "")
            )
        pad = [0, 0] * (full.dim() - 1 - dim) + [0, padded - full.shape[dim]]
        full = torch.nn.functional.pad(full, pad)
    if full.shape[dim] % (tp * blocks):
        raise ValueError(
            f"size {full.shape[dim]} of dim {dim} cannot be split into {tp} shards"
            + (f" of {blocks} blocks" if blocks > 1 else "")
        )
    parts = full.chunk(blocks, dim=dim)
    return torch.cat([p.chunk(tp, dim=dim)[rank] for p in parts], dim=dim)
