"""Ops that the graph passes put in place of model code they normalise (so rules can see weights)."""

from __future__ import annotations

import torch

__all__ = ["expert_linear"]


def expert_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of `x` grouped by expert (group e ends at offsets[e]) times weight[e].T, weight [E, out, in].

    It is transformers' `grouped_mm_fallback(x, weight.transpose(-2, -1), offsets)` with the
    weight itself as an argument, so a column (out) or row (in) shard of the experts is visible.
    """
    return torch.ops.transformers.grouped_mm_fallback(x, weight.transpose(-2, -1), offsets)
