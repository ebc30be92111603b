"""The one FLOP model: forward FLOPs of a node, from its shapes (global, or a rank's local ones).

Split balances stages by it (global shapes of the local program); the report shows each
stage's matmul FLOPs per rank by it (local shapes from the placements).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx

from nxd_autoshard.ir.opsets import op_name

_MATMULS = {"mm", "bmm", "addmm", "baddbmm", "matmul", "linear"}


def _shape(node) -> list[int]:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return [int(s) for s in val.shape] if isinstance(val, torch.Tensor) else []


def _prod(sizes: list[int]) -> int:
    out = 1
    for size in sizes:
        out *= size
    return out


def node_flops(
    node: torch.fx.Node,
    shape: Callable[[torch.fx.Node], list[int]] = _shape,
    *,
    matmuls_only: bool = False,
) -> int:
    """Forward FLOPs of one node: 2·m·n·k for matmuls (k, the contracted size: the activation's
    last dim), 4·b·h·s·t·d for attention, the output's element count otherwise (0 with
    `matmuls_only`). `shape(node)` gives a node's sizes (by default its global ones)."""
    name = op_name(node)
    if not isinstance(node.meta.get("val"), torch.Tensor):
        return 0
    out = shape(node)
    if name in _MATMULS:
        first = node.args[1] if name in ("addmm", "baddbmm") else node.args[0]
        k = shape(first)[-1:] if isinstance(first, torch.fx.Node) else []
        return 2 * _prod(out) * k[0] if k else 0
    if "scaled_dot_product" in name:
        q, key = shape(node.args[0]), shape(node.args[1])
        return 4 * _prod(q) * key[-2] if q and len(key) >= 2 else 0
    return 0 if matmuls_only else _prod(out)
