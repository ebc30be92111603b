"""Write rules, the functional forms of in-place writes: slice_scatter/select_scatter, index_put,
scatter/scatter_add, and gather (capture turns `copy` into a cast and a broadcast of its source).

They all write (or read) some positions of one dim, or of the leading indexed dims: a shard of any
other dim passes when every operand holds the same piece of it, and a replicated operand is
sharded to match (a local slice, no communication). The written or indexed dim itself is never
sharded: the positions written on one rank would belong to another.
"""

from __future__ import annotations

import torch.fx

from nxd_autoshard.ir.placements import Partial, Shard
from nxd_autoshard.rules.registry import (
    Decision,
    P,
    R,
    aten,
    norm_dim,
    packet_of,
    rule,
    shape_of,
)

__all__ = ["gather_rule", "index_rule", "index_put_rule", "scatter_rule", "slice_scatter_rule"]


def _arg(node: torch.fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _shard_through(out_dim_of, dim_in, nodes, placements, out_ndim, forbidden) -> Decision | None:
    """The output Shard(d) that the sharded operands agree on, with the needs of the others.

    out_dim_of(node, dim) -> the output dim an operand's dim stands for (None: no such dim);
    dim_in(node, d) -> the operand's dim for output dim d, or None when the operand lacks or
    broadcasts it (then it is needed replicated); forbidden: output dims that may not be sharded.
    """
    dims = set()
    for n in nodes:
        p = placements.get(n)
        if isinstance(p, Shard):
            d = out_dim_of(n, p.dim)
            if d is None:
                return None
            dims.add(d)
    if len(dims) != 1:
        return None
    d = dims.pop()
    if d in forbidden or not 0 <= d < out_ndim:
        return None
    needs = {}
    for n in nodes:
        own = dim_in(n, d)
        want = R if own is None else Shard(own)
        if placements.get(n) != want:
            if isinstance(placements.get(n), Shard):
                return None  # sharded along another dim, or a broadcast one
            needs[n] = want
    return Decision(Shard(d), needs)


def _partial_or_none(nodes, placements, linear: bool) -> Decision | None:
    """Every floating operand Partial: the write is linear in them, so the result is Partial."""
    pls = [placements.get(n) for n in nodes]
    if linear and pls and all(isinstance(p, Partial) for p in pls):
        return Decision(P)
    return None


def _trailing(node: torch.fx.Node, operand: torch.fx.Node, d: int) -> int | None:
    """The operand's dim that broadcasts against output dim d (right-aligned), or None."""
    out_shape, own = shape_of(node), shape_of(operand)
    own_dim = len(own) - (len(out_shape) - d)
    if own_dim < 0 or own[own_dim] != out_shape[d]:
        return None
    return own_dim


@rule(aten.slice_scatter, aten.select_scatter)
def slice_scatter_rule(node, placements, tp):
    """slice_scatter/select_scatter(base, src, dim, ...): base and src share the shard of a dim
    other than the written one; a replicated side (the `new_empty` buffer a model fills) is sharded."""
    base, src = node.args[0], node.args[1]
    ndim = base.meta["val"].dim()
    dim = norm_dim(_arg(node, 2, "dim", 0), ndim)
    select = packet_of(node.target) is aten.select_scatter
    if any(isinstance(placements.get(n), Partial) for n in (base, src)):
        return _partial_or_none([base, src], placements, linear=True)

    def out_dim_of(n, own):
        if n is base or not select:
            return own
        return own + 1 if own >= dim else own  # src of select_scatter lacks the selected dim

    def dim_in(n, d):
        if n is base or not select:
            return d
        return d - 1 if d > dim else d

    return _shard_through(out_dim_of, dim_in, [base, src], placements, ndim, {dim})


@rule(aten.index_put)
def index_put_rule(node, placements, tp):
    """index_put(self, indices, values): self and values share the shard of a dim after the
    indexed ones (values broadcast from the right); the index tensors are replicated."""
    x, indices, values = node.args[0], node.args[1], node.args[2]
    ndim = x.meta["val"].dim()
    index_nodes = [i for i in indices if isinstance(i, torch.fx.Node)]
    floats = [x] + ([values] if isinstance(values, torch.fx.Node) else [])
    if any(isinstance(placements.get(n), Shard) for n in index_nodes):
        return None
    if any(isinstance(placements.get(n), Partial) for n in floats):
        return _partial_or_none(floats, placements, linear=True)

    def out_dim_of(n, own):
        return own if n is x else ndim - (len(shape_of(n)) - own)

    def dim_in(n, d):
        return d if n is x else _trailing(node, n, d)

    decision = _shard_through(
        out_dim_of, dim_in, floats, placements, ndim, set(range(len(indices)))
    )
    if decision is not None:
        decision.needs.update({i: R for i in index_nodes if placements.get(i) != R})
    return decision


@rule(aten.scatter, aten.scatter_add)
def scatter_rule(node, placements, tp):
    """scatter/scatter_add(self, dim, index, src): self, index and src share the shard of a dim
    other than `dim`, which they must all span whole (index may be smaller than self elsewhere)."""
    x, index = node.args[0], node.args[2]
    src = node.args[3] if len(node.args) > 3 else node.kwargs.get("src")
    ndim = x.meta["val"].dim()
    dim = norm_dim(node.args[1], ndim)
    operands = [x, index] + ([src] if isinstance(src, torch.fx.Node) else [])
    if any(isinstance(placements.get(n), Partial) for n in operands):
        floats = [x] + ([src] if isinstance(src, torch.fx.Node) else [])
        if isinstance(placements.get(index), Partial):
            return None
        if packet_of(node.target) is aten.scatter and not isinstance(src, torch.fx.Node):
            return None  # a scalar written into a Partial: each rank would add it once
        linear = node.kwargs.get("reduce") in (None, "add", "sum")  # not "multiply", "amax"...
        return _partial_or_none(floats, placements, linear=linear)
    full = shape_of(x)

    def dim_in(n, d):
        return d if shape_of(n)[d] == full[d] else None

    forbidden = {dim} | {d for d in range(ndim) if any(shape_of(n)[d] != full[d] for n in operands)}
    return _shard_through(lambda n, own: own, dim_in, operands, placements, ndim, forbidden)


@rule(aten.gather)
def gather_rule(node, placements, tp):
    """gather(self, dim, index): self, index and the result share the shard of a dim other than
    `dim` when self and index span it whole."""
    x, index = node.args[0], node.args[2]
    ndim = x.meta["val"].dim()
    dim = norm_dim(node.args[1], ndim)
    if any(isinstance(placements.get(n), Partial) for n in (x, index)):
        return None
    full, idx = shape_of(x), shape_of(index)
    forbidden = {dim} | {d for d in range(ndim) if idx[d] != full[d]}
    return _shard_through(
        lambda n, own: own, lambda n, d: d, [x, index], placements, ndim, forbidden
    )


@rule(aten.index)
def index_rule(node, placements, tp):
    """x[i0, i1, ...] (leading index tensors, no skipped dims): a shard of a dim after the
    indexed ones passes, moved to where the result keeps it; the indices are replicated."""
    x, indices = node.args[0], node.args[1]
    if any(i is None for i in indices):
        return None  # slices between indices move the dims around: not handled
    p = placements.get(x)
    index_nodes = [i for i in indices if isinstance(i, torch.fx.Node)]
    needs = {i: R for i in index_nodes if isinstance(placements.get(i), (Shard, Partial))}
    if isinstance(p, Partial):
        return Decision(P, needs)  # a selection of rows: linear in x
    k = len(indices)
    if not isinstance(p, Shard) or p.dim < k:
        return None
    return Decision(Shard(node.meta["val"].dim() - (x.meta["val"].dim() - p.dim)), needs)
