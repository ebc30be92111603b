"""View and dim-moving rules: view/reshape/expand, (un)flatten, complex views, transpose/permute/
(un)squeeze, select, pad."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch.fx

from nxd_autoshard.ir.placements import Partial, Shard
from nxd_autoshard.rules.registry import (
    Decision,
    DivideSize,
    P,
    R,
    aten,
    norm_dim,
    padded_of,
    rule,
    shape_of,
    view_groups,
)

__all__ = ["dim_map_rule", "expand_rule", "unflatten_rule", "view_rule"]


@rule(aten.view, aten.reshape, aten._unsafe_view, padding_aware=True)
def view_rule(node, placements, tp):
    """view/reshape: a shard follows the outermost dim of its group; sizes are divided by tp."""
    x = node.args[0]
    p = placements[x]
    if isinstance(p, Partial):
        return Decision(P)
    in_shape, out_shape = shape_of(x), shape_of(node)
    groups = view_groups(in_shape, out_shape)
    if groups is None:
        return None
    for ins, outs in groups:
        if p.dim not in ins:
            continue
        big_ins = [d for d in ins if in_shape[d] != 1]
        big_outs = [d for d in outs if out_shape[d] != 1]
        if not big_ins or big_ins[0] != p.dim or not big_outs:
            return None
        target = big_outs[0]
        padded = padded_of(x)
        if padded:
            # the padded dim must map to one output dim of the same size, or the padding moves
            if big_ins != [p.dim] or big_outs != [target] or out_shape[target] != in_shape[p.dim]:
                return None
            return Decision(Shard(target), localise=(DivideSize(target, padded),), padded=padded)
        if out_shape[target] % tp:
            # a fused (3, heads, head_dim) split of a projection (timm's qkv): shard the first
            # dim tp divides, the ones before it being equal blocks of the input's shard dim
            # (never the innermost dim: that would split head_dim, which attention contracts)
            later = [d for d in big_outs[1:-1] if out_shape[d] % tp == 0]
            if not later or len(big_ins) != 1:
                return Decision(
                    R, {x: R}, note=f"size {out_shape[target]} is not divisible by tp={tp}"
                )
            count = math.prod(out_shape[d] for d in big_outs if d < later[0])
            return Decision(Shard(later[0]), localise=(DivideSize(later[0]),), blocks=count)
        return Decision(Shard(target), localise=(DivideSize(target),))
    return None


@rule(aten.expand)
def expand_rule(node, placements, tp):
    """expand: the shard moves right by the new leading dims; its size literal is divided by tp."""
    x = node.args[0]
    p = placements[x]
    if isinstance(p, Partial):
        return Decision(P)
    out_dim = p.dim + len(node.args[1]) - x.meta["val"].dim()
    return Decision(Shard(out_dim), localise=(DivideSize(out_dim),))


def dim_map_rule(mapping: Callable[[torch.fx.Node, int], int | None], linear: bool = True):
    """A rule for ops that move dims around: the output dim of the input's shard dim (mapping
    returns None to gather); a Partial input passes through when the op is linear."""

    def rule_fn(node, placements, tp):
        x = node.args[0]
        p = placements[x]
        if isinstance(p, Partial):
            return Decision(P) if linear else None
        out = mapping(node, p.dim)
        return None if out is None else Decision(Shard(out), padded=padded_of(x))

    rule_fn.__name__ = f"dim_map_rule({mapping.__name__})"
    return rule_fn


def _flatten_map(node, d):
    """flatten(x, start, end): the shard passes when it is the outermost merged dim (a
    contiguous piece of the merged dim) or outside the merged run."""
    nd = node.args[0].meta["val"].dim()
    start = norm_dim(node.args[1] if len(node.args) > 1 else 0, nd)
    end = norm_dim(node.args[2] if len(node.args) > 2 else -1, nd)
    if d < start or d == start:
        return d
    return d - (end - start) if d > end else None


@rule(aten.unflatten)
def unflatten_rule(node, placements, tp):
    """unflatten(x, dim, sizes): a shard of `dim` goes to its outermost new dim, whose size is
    divided by tp; other dims move right."""
    x = node.args[0]
    p = placements[x]
    if isinstance(p, Partial):
        return Decision(P)
    dim = norm_dim(node.args[1], x.meta["val"].dim())
    sizes = list(node.args[2])
    if p.dim < dim:
        return Decision(Shard(p.dim))
    if p.dim > dim:
        return Decision(Shard(p.dim + len(sizes) - 1))
    if not isinstance(sizes[0], int) or sizes[0] == -1 or sizes[0] % tp:
        return None
    return Decision(Shard(dim), localise=(DivideSize(0, arg=2),))


def _complex_map(node, d):
    """view_as_complex pairs the last dim (size 2) into one complex value: it stays whole."""
    return None if d == node.args[0].meta["val"].dim() - 1 else d


def _real_map(node, d):
    return d  # view_as_real adds a last dim (the real and imaginary parts)


def _repeat_interleave_map(node, d):
    """repeat_interleave(x, n, dim): each element's repeats stay next to it, so a contiguous
    shard of `dim` repeated is the same shard of the result; an other dim passes."""
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    if dim is None:
        return None  # no dim: the input is flattened first
    if not isinstance(node.args[1], int) and norm_dim(dim, node.args[0].meta["val"].dim()) == d:
        return None  # per-element repeat counts: the pieces are not even
    return d


def _transpose_map(node, d):
    nd = node.args[0].meta["val"].dim()
    a, b = norm_dim(node.args[1], nd), norm_dim(node.args[2], nd)
    return b if d == a else a if d == b else d


def _t_map(node, d):
    return 1 - d if node.args[0].meta["val"].dim() == 2 else d


def _permute_map(node, d):
    nd = node.args[0].meta["val"].dim()
    order = [norm_dim(x, nd) for x in node.args[1]]
    return order.index(d)


def _unsqueeze_map(node, d):
    pos = norm_dim(node.args[1], node.meta["val"].dim())
    return d + 1 if d >= pos else d


def _squeeze_map(node, d):
    x_shape = shape_of(node.args[0])
    nd = len(x_shape)
    if len(node.args) == 1:
        dims = [i for i, s in enumerate(x_shape) if s == 1]
    else:
        raw = node.args[1]
        dims = [norm_dim(i, nd) for i in (raw if isinstance(raw, (list, tuple)) else [raw])]
        dims = [i for i in dims if x_shape[i] == 1]
    if d in dims:
        return None
    return d - sum(1 for i in dims if i < d)


def _select_map(node, d):
    dim = norm_dim(node.args[1], node.args[0].meta["val"].dim())
    if dim == d:
        return None
    return d - 1 if d > dim else d


def _pad_map(node, d):
    nd = node.args[0].meta["val"].dim()
    padded = len(node.args[1]) // 2
    return None if d >= nd - padded else d


def _index_select_map(node, d):
    dim = norm_dim(node.args[1], node.args[0].meta["val"].dim())
    return None if dim == d else d


rule(aten.flatten, padding_aware=False)(dim_map_rule(_flatten_map))
rule(aten.view_as_complex)(dim_map_rule(_complex_map))
rule(aten.view_as_real)(dim_map_rule(_real_map))
rule(aten.repeat_interleave)(dim_map_rule(_repeat_interleave_map))
rule(aten.transpose, padding_aware=True)(dim_map_rule(_transpose_map))
rule(aten.t, padding_aware=True)(dim_map_rule(_t_map))
rule(aten.permute, padding_aware=True)(dim_map_rule(_permute_map))
rule(aten.unsqueeze, padding_aware=True)(dim_map_rule(_unsqueeze_map))
rule(aten.squeeze, padding_aware=True)(dim_map_rule(_squeeze_map))
rule(aten.select, padding_aware=True)(dim_map_rule(_select_map))
rule(aten.pad, aten.constant_pad_nd, padding_aware=True)(dim_map_rule(_pad_map, linear=False))
rule(aten.index_select, padding_aware=True)(dim_map_rule(_index_select_map))
