"""Reduction rules: sum/mean/amax/amin, softmax and cumsum along a dim, layer_norm, rms_norm
and batch_norm."""

from __future__ import annotations

import torch

from nxd_autoshard.ir.placements import Partial, Shard
from nxd_autoshard.rules.registry import (
    Decision,
    P,
    R,
    ScaleInput,
    aten,
    norm_dim,
    packet_of,
    padded_of,
    rule,
    tensor_inputs,
)
from nxd_autoshard.rules.views import dim_map_rule

__all__ = ["batch_norm_rule", "layer_norm_rule", "reduction_rule", "rms_norm_rule"]


@rule(aten.sum, aten.mean, aten.amax, aten.amin, padding_aware=True)
def reduction_rule(node, placements, tp):
    """sum/mean/amax over dims: a reduced shard dim gives Partial for sum and mean (each rank's
    mean of its piece, over tp), so only the small reduced value is all-reduced; amax/amin gather."""
    x = node.args[0]
    p = placements[x]
    packet = packet_of(node.target)
    nd = x.meta["val"].dim()
    raw = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = (
        list(range(nd))
        if raw is None or raw == []
        else [norm_dim(d, nd) for d in (raw if isinstance(raw, (list, tuple)) else [raw])]
    )
    keepdim = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
    if isinstance(p, Partial):
        return Decision(P) if packet is aten.sum else None
    if p.dim in dims:
        # padding need not be zero after element-wise ops: a padded dim is gathered, then reduced
        if padded_of(x) or packet not in (aten.sum, aten.mean):
            return None
        return Decision(P, localise=(ScaleInput(),) if packet is aten.mean else ())
    out = p.dim if keepdim else p.dim - sum(1 for d in dims if d < p.dim)
    return Decision(Shard(out), padded=padded_of(x))


def _same_dim_unless(arg_index: int, default=None):
    """Ops with a `dim` argument that must not be the shard dim (softmax, cumsum, ...)."""

    def mapping(node, d):
        nd = node.args[0].meta["val"].dim()
        given = len(node.args) > arg_index
        raw = node.args[arg_index] if given else node.kwargs.get("dim", default)
        dims = raw if isinstance(raw, (list, tuple)) else [raw]
        return None if any(norm_dim(x, nd) == d for x in dims if x is not None) else d

    mapping.__name__ = "same_dim_unless_reduced"
    return mapping


rule(aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax, padding_aware=True)(
    dim_map_rule(_same_dim_unless(1), linear=False)
)
rule(aten.cumsum, padding_aware=True)(dim_map_rule(_same_dim_unless(1)))


@rule(aten.layer_norm)
def layer_norm_rule(node, placements, tp):
    """layer_norm: a shard of a dim it does not normalise passes; weight and bias are replicated."""
    x = node.args[0]
    p = placements[x]
    if isinstance(p, Partial):  # a row-parallel or vocab-parallel sum feeding a norm: reduce first
        return Decision(R, {n: R for n in tensor_inputs(node)})
    if not isinstance(p, Shard):
        return None
    nd = x.meta["val"].dim()
    if p.dim >= nd - len(node.args[1]):
        return None
    needs = {n: R for n in tensor_inputs(node) if n is not x}
    return Decision(Shard(p.dim), needs)


@rule(aten.rms_norm)
def rms_norm_rule(node, placements, tp):
    """rms_norm: as layer_norm."""
    return layer_norm_rule(node, placements, tp)


@rule(
    aten.batch_norm,
    aten.native_batch_norm,
    aten._native_batch_norm_legit_functional,
    aten._native_batch_norm_legit_no_training,
)
def batch_norm_rule(node, placements, tp):
    """batch_norm: statistics per channel (dim 1) over every other dim, so a channel shard passes:
    weight, bias and running stats are sharded alike (a local slice), and the per-channel
    results (batch and new running stats) are Shard(0); a sharded new running stat is gathered
    where the buffer stores it."""
    x = node.args[0]
    p = placements[x]
    if not isinstance(p, Shard) or p.dim != 1 or padded_of(x):
        return None
    channels = x.meta["val"].shape[1]
    needs = {}
    for n in node.args[1:5]:
        if n is None:
            continue
        if isinstance(placements.get(n), (Partial, Shard)) and placements.get(n) != Shard(0):
            return None
        if placements.get(n) != Shard(0):
            needs[n] = Shard(0)
    val = node.meta["val"]
    if not isinstance(val, (list, tuple)):
        return Decision(Shard(1), needs)
    # outputs after the normalised input are per channel, or empty (eval's saved stats)
    per_channel = [isinstance(v, torch.Tensor) and tuple(v.shape) == (channels,) for v in val[1:]]
    return Decision((Shard(1), *(Shard(0) if c else R for c in per_channel)), needs)
