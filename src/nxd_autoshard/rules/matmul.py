"""Matmul-like rules: linear, mm, bmm, matmul, baddbmm and expert_linear (grouped experts)."""

from __future__ import annotations

from nxd_autoshard.ir.meta import is_parameter
from nxd_autoshard.ir.ops import expert_linear, expert_matmul, grouped_linear
from nxd_autoshard.ir.placements import Partial, Replicate, Shard
from nxd_autoshard.rules.registry import Decision, P, R, aten, padded_of, rule, shape_of

__all__ = ["baddbmm_rule", "expert_linear_rule", "linear_rule", "matmul_rule"]


def _matmul_decision(a, b, pa, pb, out_nd):
    """a[..., m, k] @ b[..., k, n] with broadcast batch dims; both operands given."""
    na, nb = a.meta["val"].dim(), b.meta["val"].dim()
    if na < 2 or nb < 2:
        return None
    if isinstance(pa, Partial) or isinstance(pb, Partial):
        if isinstance(pa, Partial) and isinstance(pb, Replicate):
            return Decision(P)
        if isinstance(pb, Partial) and isinstance(pa, Replicate):
            return Decision(P)
        return None
    ka, kb = na - 1, nb - 2
    if _padded_shard(a, pa) and pa.dim != na - 2 or _padded_shard(b, pb) and pb.dim != nb - 1:
        return None  # only a free (non-contracted, non-batch) dim may carry padding
    if isinstance(pa, Shard) and pa.dim == ka:
        if isinstance(pb, Shard) and pb.dim != kb:
            return None
        return Decision(P, {b: Shard(kb)})
    if isinstance(pb, Shard) and pb.dim == kb:
        if isinstance(pa, Shard):
            return None
        return Decision(P, {a: Shard(ka)})
    if isinstance(pa, Shard) and pa.dim == na - 2:
        if isinstance(pb, Shard):
            return None
        return Decision(Shard(out_nd - 2), padded=padded_of(a))
    if isinstance(pb, Shard) and pb.dim == nb - 1:
        if isinstance(pa, Shard):
            return None
        return Decision(Shard(out_nd - 1), padded=padded_of(b))
    # a batch dim is sharded: align both operands on it
    sharded = [(n, p) for n, p in ((a, pa), (b, pb)) if isinstance(p, Shard)]
    if not sharded:  # both replicated (baddbmm with only its bias sharded)
        return Decision(R)
    out_dim = {sharded[0][1].dim + out_nd - sharded[0][0].meta["val"].dim()}
    for n, p in sharded[1:]:
        out_dim.add(p.dim + out_nd - n.meta["val"].dim())
    if len(out_dim) != 1:
        return None
    od = out_dim.pop()
    needs = {}
    for n, p in ((a, pa), (b, pb)):
        if isinstance(p, Replicate):
            local = od - (out_nd - n.meta["val"].dim())
            if local >= 0 and shape_of(n)[local] != 1:
                needs[n] = Shard(local)
    return Decision(Shard(od), needs)


def _trained(weight) -> bool:
    """A parameter: a Partial input through it would need its weight gradient all-reduced
    (weight-sized), so the input is reduced first (activation-sized, and often reduced anyway)."""
    return is_parameter(weight)


def _padded_shard(node, placement) -> bool:
    return isinstance(placement, Shard) and padded_of(node) is not None


@rule(aten.matmul, aten.bmm, aten.mm, padding_aware=True)
def matmul_rule(node, placements, tp):
    """a @ b: a contracted shard gives Partial, a free dim's shard passes, a batch shard aligns."""
    a, b = node.args[0], node.args[1]
    return _matmul_decision(a, b, placements[a], placements[b], node.meta["val"].dim())


@rule(aten.linear, padding_aware=True)
def linear_rule(node, placements, tp):
    """linear(x, W) with W [out, in]: column (W S(0)), row (W S(1)) or a replicated weight."""
    x, w = node.args[0], node.args[1]
    if len(node.args) > 2 and node.args[2] is not None:
        return None  # split_bias runs first: biases are separate adds
    px, pw = placements[x], placements[w]
    last = x.meta["val"].dim() - 1
    if padded_of(x):
        return None
    if isinstance(pw, Shard) and pw.dim == 0:
        needs = {x: R} if not isinstance(px, Replicate) else {}
        return Decision(Shard(last), needs, padded=padded_of(w))  # a padded vocab: padded logits
    if padded_of(w):
        return None
    if isinstance(pw, Shard) and pw.dim == 1:
        return Decision(P, {x: Shard(last)} if px != Shard(last) else {})
    if isinstance(pw, Replicate):
        if isinstance(px, Partial) and not _trained(w):
            return Decision(P)
        if isinstance(px, Shard) and px.dim != last:
            return Decision(Shard(px.dim))
        return Decision(R, {x: R})
    return None


@rule(expert_linear, grouped_linear, expert_matmul)
def expert_linear_rule(node, placements, tp):
    """expert_linear / grouped_linear(x, W, offsets), W [experts, out, in] (expert_matmul: W
    [experts, in, out]): column (W split on out) or row (W split on in)."""
    x, w, offsets = node.args[:3]
    out_dim, in_dim = (2, 1) if node.target is expert_matmul else (1, 2)
    px, pw = placements[x], placements[w]
    keep_offsets = {offsets: R} if not isinstance(placements.get(offsets), Replicate) else {}
    if pw == Shard(out_dim):
        return Decision(Shard(1), {**keep_offsets, **({x: R} if px != R else {})})
    if pw == Shard(in_dim):
        return Decision(P, {**keep_offsets, **({x: Shard(1)} if px != Shard(1) else {})})
    if isinstance(pw, Replicate):
        if isinstance(px, Partial) and not _trained(w):
            return Decision(P, keep_offsets)
        return Decision(R, {**keep_offsets, x: R})
    return None


@rule(aten.baddbmm)
def baddbmm_rule(node, placements, tp):
    """bias + a @ b: as matmul, the bias sharded like the product (a Partial product refuses)."""
    bias, a, b = node.args[0], node.args[1], node.args[2]
    d = _matmul_decision(a, b, placements[a], placements[b], node.meta["val"].dim())
    if d is None or isinstance(d.out, Partial):
        return None
    # the bias (which broadcasts) is added as the product is placed; a Partial bias is reduced
    need = R
    if isinstance(d.out, Shard):
        local = d.out.dim - (node.meta["val"].dim() - bias.meta["val"].dim())
        if local >= 0 and shape_of(bias)[local] != 1:
            need = Shard(local)
    if placements[bias] != need:
        d.needs[bias] = need
    return d
