"""Element-wise rules: broadcasting ops whose shards must agree on the aligned dim."""

from __future__ import annotations

from nxd_autoshard.ir.placements import Partial, Replicate, Shard
from nxd_autoshard.rules.registry import (
    Decision,
    P,
    R,
    aten,
    norm_dim,
    packet_of,
    padded_of,
    rule,
    shape_of,
    tensor_inputs,
)

__all__ = ["POINTWISE", "glu_rule", "pointwise_rule", "triangle_rule", "type_as_rule"]


# element-wise ops with no dim argument: output element i reads input element i only
POINTWISE = (
    aten.add,
    aten.sub,
    aten.mul,
    aten.div,
    aten.neg,
    aten.silu,
    aten.gelu,
    aten.tanh,
    aten.relu,
    aten.sigmoid,
    aten.pow,
    aten.rsqrt,
    aten.sqrt,
    aten.exp,
    aten.log,
    aten.where,
    aten.eq,
    aten.ne,
    aten.lt,
    aten.le,
    aten.gt,
    aten.ge,
    aten.logical_and,
    aten.logical_or,
    aten.logical_not,
    aten.__and__,
    aten.__or__,
    aten.bitwise_and,
    aten.bitwise_or,
    aten.bitwise_not,
    aten.clone,
    aten.contiguous,
    aten.alias,
    aten.detach,
    aten.to,
    aten._to_copy,
    aten.dropout,
    aten.abs,
    aten.sin,
    aten.cos,
    aten.erf,
    aten.masked_fill,
    aten.clamp,
    aten.minimum,
    aten.maximum,
    aten.reciprocal,
    aten.square,
    aten.softplus,
    aten.lift_fresh_copy,
    aten.log1p,
    aten.expm1,
    aten.leaky_relu,
    aten.elu,
    aten.hardtanh,
    aten.mish,
    aten.erfc,
    aten.rsub,
    aten.zeros_like,
    aten.ones_like,
    aten.empty_like,
    aten.full_like,
    aten.rand_like,
    aten.floor_divide,
    aten.remainder,
    aten.fmod,
    aten.sign,
    aten.isnan,
    aten.isinf,
    aten.logical_xor,
    aten.nan_to_num,
    aten.hardswish,
    aten.hardsigmoid,
)


# ops that may pass a Partial operand through unreduced; anything else reduces it first,
# so each Partial value is all-reduced once, where Megatron would reduce it
LINEAR_IN_PARTIAL = {aten.clone, aten.contiguous, aten.alias, aten.detach}


ADDITIVE = {aten.add, aten.sub}


@rule(*POINTWISE, padding_aware=True)
def pointwise_rule(node, placements, tp):
    """Broadcasting element-wise ops: shards must agree on the aligned dim."""
    out_nd = node.meta["val"].dim()
    ins = tensor_inputs(node)
    shard_dim = _aligned_shard_dim(node, placements)
    if shard_dim is False:
        return None
    partial_ins = [n for n in ins if isinstance(placements[n], Partial)]
    packet = packet_of(node.target)
    if shard_dim is not None and any(padded_of(n) for n in ins):
        return _padded_pointwise(node, placements, shard_dim)
    if shard_dim is not None:
        needs = {}
        for n in ins:
            nd = n.meta["val"].dim()
            local_dim = shard_dim - (out_nd - nd)
            broadcast = local_dim < 0 or shape_of(n)[local_dim] == 1
            if isinstance(placements[n], Partial):
                needs[n] = R if broadcast else Shard(local_dim)
            elif isinstance(placements[n], Replicate) and not broadcast:
                needs[n] = Shard(local_dim)
        return Decision(Shard(shard_dim), needs)
    if partial_ins:
        if packet in ADDITIVE and len(partial_ins) == len(ins) and not _has_scalar_operand(node):
            return Decision(P)
        if packet in LINEAR_IN_PARTIAL and len(partial_ins) == 1:
            return Decision(P)
        # reduce first: the Megatron all-reduce after a row-parallel layer
        return Decision(R, {n: R for n in partial_ins})
    return Decision(R)


@rule(aten.type_as, padding_aware=True)
def type_as_rule(node, placements, tp):
    """type_as(x, other): x cast to other's dtype, which every rank's piece of other has, so
    other is never gathered, sliced or reduced for it; a Partial x passes when the cast is a
    no-op and is reduced first otherwise (a cast of a sum is not the sum of casts)."""
    x = node.args[0]
    p = placements[x]
    if isinstance(p, Partial):
        same = x.meta["val"].dtype == node.meta["val"].dtype
        return Decision(P) if same else Decision(R, {x: R})
    return Decision(p, padded=padded_of(x) if isinstance(p, Shard) else None)


@rule(aten.tril, aten.triu, padding_aware=True)
def triangle_rule(node, placements, tp):
    """tril/triu: element (i, j) is kept by comparing i and j, so the last two dims stay whole."""
    shard_dim = _aligned_shard_dim(node, placements)
    if shard_dim is not None and shard_dim is not False and shard_dim >= node.meta["val"].dim() - 2:
        return None
    return pointwise_rule(node, placements, tp)


@rule(aten.glu, padding_aware=True)
def glu_rule(node, placements, tp):
    """glu(x, dim) = a * sigmoid(b) with a, b the two halves of dim: that dim stays whole."""
    x = node.args[0]
    p = placements[x]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1)
    if isinstance(p, Shard) and p.dim == norm_dim(dim, x.meta["val"].dim()):
        return None
    return pointwise_rule(node, placements, tp)


def _aligned_shard_dim(node, placements):
    """The output dim the sharded inputs agree on, None when none is sharded, False on a clash."""
    out_nd = node.meta["val"].dim()
    shard_dim = None
    for n in tensor_inputs(node):
        p = placements[n]
        if isinstance(p, Shard):
            aligned = p.dim + out_nd - n.meta["val"].dim()
            if shard_dim is None:
                shard_dim = aligned
            elif shard_dim != aligned:
                return False
    return shard_dim


def _padded_pointwise(node, placements, shard_dim: int):
    """Element-wise op on a padded shard: other operands broadcast over that dim, share the padding,
    or are replicated and get padded and sharded alike (a [vocab] bias of a tied LM head)."""
    out_nd = node.meta["val"].dim()
    padding = {padded_of(n) for n in tensor_inputs(node) if isinstance(placements[n], Shard)}
    if len(padding) != 1:
        return None
    needs = {}
    for n in tensor_inputs(node):
        local_dim = shard_dim - (out_nd - n.meta["val"].dim())
        broadcast = local_dim < 0 or shape_of(n)[local_dim] == 1
        if isinstance(placements[n], Partial):
            return None
        if broadcast and isinstance(placements[n], Shard):
            return None
        if not broadcast and isinstance(placements[n], Replicate):
            needs[n] = Shard(local_dim)
    return Decision(Shard(shard_dim), needs, padded=padding.pop())


def _has_scalar_operand(node) -> bool:
    return any(isinstance(a, (int, float)) for a in node.args[:2])
