"""Split pass: cut a local program into pipeline stages between repeated blocks, balanced by cost.

A *block* is a child of a ModuleList whose children share one class (decoder layers).
Every node belongs to one unit (one block; code before the first block joins the first,
code after the last joins the last), and each stage is a contiguous run of units. Values
used across a cut (hidden states, rotary cos/sin, masks, labels) are passed along as
stage outputs/inputs; parameters go to every stage that reads them (tied weights).
"""

from __future__ import annotations

import torch
import torch.fx

_MATMULS = {"mm", "bmm", "addmm", "baddbmm", "matmul", "linear"}


def _shape(val) -> list[int]:
    return [int(s) for s in val.shape] if isinstance(val, torch.Tensor) else []


def node_flops(node: torch.fx.Node) -> int:
    """Forward FLOPs of one node: 2·m·n·k for matmuls, 4·b·h·s·t·d for attention, numel otherwise."""
    name = getattr(getattr(node.target, "overloadpacket", None), "__name__", "")
    out = node.meta.get("val")
    if not isinstance(out, torch.Tensor):
        return 0
    numel = out.numel()
    if name in _MATMULS:
        weight = (
            node.args[-1] if name in ("mm", "bmm", "matmul", "addmm", "baddbmm") else node.args[1]
        )
        k_shape = _shape(weight.meta.get("val")) if isinstance(weight, torch.fx.Node) else []
        k = k_shape[-1] if name == "linear" else (k_shape[-2] if len(k_shape) >= 2 else 1)
        return 2 * numel * k
    if name == "_scaled_dot_product_flash_attention_for_cpu" or "scaled_dot_product" in name:
        q = _shape(node.args[0].meta.get("val"))
        kv_len = _shape(node.args[1].meta.get("val"))[-2]
        return 4 * (q[0] * q[1] * q[2] * q[3]) * kv_len
    return int(numel)
