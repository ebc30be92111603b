"""Reduction rules: sum/mean, amax/amin, max/min, argmax/argmin, logsumexp, softmax and cumsum
along a dim, layer_norm, rms_norm and batch_norm."""

from __future__ import annotations

import torch

from nxd_autoshard.ir import ops
from nxd_autoshard.ir.placements import Partial, Shard
from nxd_autoshard.rules.pointwise import pointwise_rule
from nxd_autoshard.rules.registry import (
    Decision,
    Lower,
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

__all__ = [
    "argmax_rule",
    "batch_norm_rule",
    "extremum_rule",
    "layer_norm_rule",
    "logsumexp_rule",
    "max_min_rule",
    "reduction_rule",
    "rms_norm_rule",
]


def _reduced_dims(node) -> tuple[list[int], bool]:
    """The dims a reduction reduces (none given: all) and its keepdim, from args or kwargs."""
    nd = node.args[0].meta["val"].dim()
    raw = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if raw is None or raw == [] or raw == ():
        dims = list(range(nd))
    else:
        dims = [norm_dim(d, nd) for d in (raw if isinstance(raw, (list, tuple)) else [raw])]
    keepdim = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
    return dims, keepdim


def _kept_shard(p: Shard, dims: list[int], keepdim: bool) -> Shard:
    """The shard of a reduction over other dims than the shard dim."""
    return Shard(p.dim if keepdim else p.dim - sum(1 for d in dims if d < p.dim))


@rule(aten.sum, aten.mean, padding_aware=True)
def reduction_rule(node, placements, tp):
    """sum/mean over dims: a reduced shard dim gives Partial (each rank's mean of its piece,
    over tp), so only the small reduced value is all-reduced."""
    x = node.args[0]
    p = placements[x]
    packet = packet_of(node.target)
    dims, keepdim = _reduced_dims(node)
    if isinstance(p, Partial):
        return Decision(P) if packet is aten.sum else None
    if p.dim in dims:
        # padding need not be zero after element-wise ops: a padded dim is gathered, then reduced
        if padded_of(x):
            return None
        return Decision(P, localise=(ScaleInput(),) if packet is aten.mean else ())
    return Decision(_kept_shard(p, dims, keepdim), padded=padded_of(x))


def _sharded_reduction(node, placements, dims, keepdim, lower, outputs: int = 1):
    """A reduction whose dims may hold the shard dim: then the runtime op `lower(padding)` (a
    local reduction and an all-reduce of the small result; padding: (dim, real size) of a
    vocab-padded shard dim, whose padding it leaves out) gives a Replicate value; over other
    dims the shard stays. A Partial input is refused."""
    x = node.args[0]
    p = placements[x]
    if isinstance(p, Partial):
        return None
    if p.dim in dims:
        padding = (p.dim, int(x.meta["val"].shape[p.dim])) if padded_of(x) else None
        out = R if outputs == 1 else (R,) * outputs
        return Decision(out, localise=(lower(padding),))
    kept = _kept_shard(p, dims, keepdim)
    if outputs == 1:
        return Decision(kept, padded=padded_of(x))
    return None if padded_of(x) else Decision((kept,) * outputs)


def _lower(op, *args):
    """The localisation to runtime op `op` (x, *args, padding, axis), given the padding."""
    return lambda padding: Lower(op, (*args, padding, "tp"), keep=1)


_EXTREMUM = {
    aten.amax: "max",
    aten.amin: "min",
    aten.max: "max",
    aten.min: "min",
    aten.argmax: "max",
    aten.argmin: "min",
}


@rule(aten.amax, aten.amin, padding_aware=True)
def extremum_rule(node, placements, tp):
    """amax/amin over dims: over the shard dim, the local extremum and an all-reduce max/min
    of it (`amax_all_reduce`), not a gather of the input."""
    dims, keepdim = _reduced_dims(node)
    op = _EXTREMUM[packet_of(node.target)]
    lower = _lower(ops.amax_all_reduce, tuple(dims), keepdim, op)
    return _sharded_reduction(node, placements, dims, keepdim, lower)


@rule(aten.max, aten.min, padding_aware=True)
def max_min_rule(node, placements, tp):
    """max/min: the element-wise one (`other`) as maximum/minimum; the whole reduction as amax
    over every dim; `dim` over the shard dim with global indices (`max_dim_all_reduce`)."""
    overload = node.target._overloadname
    if overload == "other":
        return pointwise_rule(node, placements, tp)
    if overload == "default":  # over every dim, as amax
        return extremum_rule(node, placements, tp)
    if overload != "dim":
        return None
    op = _EXTREMUM[packet_of(node.target)]
    dims, keepdim = _reduced_dims(node)
    lower = _lower(ops.max_dim_all_reduce, dims[0], keepdim, op)
    return _sharded_reduction(node, placements, dims, keepdim, lower, outputs=2)


@rule(aten.argmax, aten.argmin, padding_aware=True)
def argmax_rule(node, placements, tp):
    """argmax/argmin over the shard dim: max_dim_all_reduce's global index; over all dims
    (dim=None) of a 1-d input, as over dim 0; of more dims, refused (a flat global index)."""
    raw = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if raw is None and node.args[0].meta["val"].dim() != 1:
        return None
    dims, keepdim = _reduced_dims(node)
    op = _EXTREMUM[packet_of(node.target)]
    lower = _lower(ops.argmax_all_reduce, dims[0], keepdim, op)
    return _sharded_reduction(node, placements, dims, keepdim, lower)


@rule(aten.logsumexp, padding_aware=True)
def logsumexp_rule(node, placements, tp):
    """logsumexp over dims: over the shard dim, the local one, then a max and a sum all-reduce
    of the small results (`logsumexp_all_reduce`), numerically stable as torch's."""
    dims, keepdim = _reduced_dims(node)
    lower = _lower(ops.logsumexp_all_reduce, tuple(dims), keepdim)
    return _sharded_reduction(node, placements, dims, keepdim, lower)


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
