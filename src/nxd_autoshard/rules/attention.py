"""Attention rule: scaled_dot_product_attention sharded by batch or heads."""

from __future__ import annotations

import torch.fx

from nxd_autoshard.ir.placements import Partial, Replicate, Shard
from nxd_autoshard.rules.registry import Decision, R, aten, rule, shape_of

__all__ = ["sdpa_rule"]


@rule(aten.scaled_dot_product_attention)
def sdpa_rule(node, placements, tp):
    """scaled_dot_product_attention: q, k, v sharded alike on batch or heads; the mask follows."""
    q, k, v = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    pls = [placements[n] for n in (q, k, v)]
    if any(isinstance(p, Partial) for p in pls):
        return None
    dims = {p.dim for p in pls if isinstance(p, Shard)}
    if len(dims) != 1:
        return None
    d = dims.pop()
    if d >= q.meta["val"].dim() - 2:
        return None
    gqa = node.kwargs.get("enable_gqa", False) or (len(node.args) > 7 and node.args[7])
    needs = {}
    for n, p in zip((q, k, v), pls):
        if isinstance(p, Replicate):
            if gqa and d == 1 and shape_of(n)[1] % tp:
                return None
            needs[n] = Shard(d)
    if isinstance(mask, torch.fx.Node):
        pm = placements[mask]
        m_nd = mask.meta["val"].dim()
        local = d - (q.meta["val"].dim() - m_nd)
        if local >= 0 and shape_of(mask)[local] != 1:
            if pm != Shard(local):
                needs[mask] = Shard(local)
        elif not isinstance(pm, Replicate):
            needs[mask] = R
    return Decision(Shard(d), needs)
