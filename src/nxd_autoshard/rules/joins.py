"""Split and join rules: split/chunk/unbind, slice (and its equal blocks), cat/stack."""

from __future__ import annotations

import torch.fx

from nxd_autoshard.ir.placements import Partial, Replicate, Shard
from nxd_autoshard.rules.registry import (
    Decision,
    P,
    SliceBlock,
    SplitSizes,
    aten,
    norm_dim,
    packet_of,
    padded_of,
    rule,
    shape_of,
    shape_of_val,
)
from nxd_autoshard.rules.views import dim_map_rule

__all__ = ["cat_rule", "slice_block_rule", "slice_rule", "split_rule", "stack_rule"]


def _slice_map(node, d):
    nd = node.args[0].meta["val"].dim()
    dim = norm_dim(node.args[1] if len(node.args) > 1 else 0, nd)
    if dim != d:
        return d
    start = node.args[2] if len(node.args) > 2 else None
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    full = shape_of(node.args[0])[d]
    whole = start in (None, 0) and (end is None or (isinstance(end, int) and end >= full))
    return d if whole and step == 1 else None


_slice_dim_map = dim_map_rule(_slice_map)


def _slice_bounds(node) -> tuple[int, int, int, int] | None:
    """(dim, start, end, step) of a slice with int bounds, end clipped to the size."""
    x = node.args[0]
    nd = x.meta["val"].dim()
    dim = norm_dim(node.args[1] if len(node.args) > 1 else 0, nd)
    start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
    end = node.args[3] if len(node.args) > 3 and node.args[3] is not None else shape_of(x)[dim]
    step = node.args[4] if len(node.args) > 4 else 1
    if not all(isinstance(v, int) for v in (start, end, step)):
        return None
    return dim, start, min(end, shape_of(x)[dim]), step


def _shard_dim_slice(node, placements):
    """(the input's placement, the slice's bounds, the dim's size) of a slice with int bounds
    across an unpadded shard dim; None for any other slice."""
    x = node.args[0]
    p = placements[x]
    bounds = _slice_bounds(node)
    if not isinstance(p, Shard) or bounds is None or bounds[0] != p.dim or padded_of(x):
        return None
    return p, bounds, shape_of(x)[bounds[0]]


def slice_block_rule(node, placements, tp):
    """Slices that cut the shard dim into aligned pieces (a fused qkv read as x[..., :d],
    x[..., d:2d], ...; unequal ones when they tile the dim, as a GQA q|k|v) are blocks, like
    chunk: each rank slices its own piece of every block."""
    x = node.args[0]
    cut = _shard_dim_slice(node, placements)
    if cut is None:
        return None
    p, (dim, start, end, step), full = cut
    width = end - start
    siblings = [u for u in x.users if packet_of(u.target) is aten.slice]
    spans = [_slice_bounds(u) for u in siblings]
    if step != 1 or width <= 0 or width == full or width % tp:
        return None
    if any(b is None or b[0] != dim or b[3] != 1 for b in spans):
        return None
    if all(b[2] - b[1] == width and b[1] % width == 0 for b in spans) and full % width == 0:
        blocks = full // width
    else:  # unequal pieces (a GQA q|k|v): they must tile the dim, each split by tp
        pieces = sorted({(b[1], b[2]) for b in spans})
        ends = [0] + [e for _, e in pieces]
        if [a for a, _ in pieces] != ends[:-1] or ends[-1] != full:
            return None
        if any((e - a) % tp for a, e in pieces):
            return None
        blocks = tuple(e - a for a, e in pieces)
    return Decision(Shard(p.dim), localise=(SliceBlock(dim, start, width),), blocks=blocks)


def strided_slice_rule(node, placements, tp):
    """x[..., s::k] over the shard dim (GPT-OSS's interleaved gate and up, `gate_up[..., ::2]`,
    `[..., 1::2]`): where k divides each rank's piece, rank r's elements s, s+k, ... of its piece
    are the r-th contiguous piece of the result, so each rank slices its own piece as it is. The
    shard must be contiguous (blocks=1): a fused layout read in blocks elsewhere refuses."""
    cut = _shard_dim_slice(node, placements)
    if cut is None:
        return None
    p, (dim, start, end, step), full = cut
    if step <= 1 or start >= step or end != full or full % tp or (full // tp) % step:
        return None
    return Decision(Shard(p.dim), blocks=1)


@rule(aten.slice, padding_aware=True)
def slice_rule(node, placements, tp):
    """slice: a block of the shard dim (see slice_block_rule), a stride through it
    (strided_slice_rule), else the shard is kept when the slice leaves the shard dim whole."""
    return (
        slice_block_rule(node, placements, tp)
        or strided_slice_rule(node, placements, tp)
        or _slice_dim_map(node, placements, tp)
    )


@rule(aten.split, aten.split_with_sizes, aten.chunk, aten.unbind)
def split_rule(node, placements, tp):
    """split/chunk/unbind: each piece keeps the shard; equal splits of the shard dim are blocked."""
    x = node.args[0]
    p = placements[x]
    n_out = len(node.meta["val"])
    if isinstance(p, Partial):
        return Decision(tuple([P] * n_out))
    packet = packet_of(node.target)
    nd = x.meta["val"].dim()
    default_dim = 0
    dim_index = 2 if packet in (aten.split, aten.split_with_sizes, aten.chunk) else 1
    has_dim = len(node.args) > dim_index
    raw_dim = node.args[dim_index] if has_dim else node.kwargs.get("dim", default_dim)
    dim = norm_dim(raw_dim, nd)
    if packet is aten.unbind:
        if dim == p.dim:
            return None
        out = Shard(p.dim - 1 if p.dim > dim else p.dim)
        return Decision(tuple([out] * n_out))
    if dim != p.dim:
        return Decision(tuple([p] * n_out))
    sizes = [shape_of_val(v)[dim] for v in node.meta["val"]]
    if any(size % tp for size in sizes):
        return None
    equal = len(set(sizes)) == 1
    if not equal and packet is not aten.split_with_sizes:
        return None  # only explicit sizes can be divided one by one
    localise = (SplitSizes(),) if packet in (aten.split, aten.split_with_sizes) else ()
    blocks = n_out if equal else tuple(sizes)  # unequal: a GQA q|k|v, each piece split by tp
    return Decision(tuple([p] * n_out), localise=localise, blocks=blocks)


def _join_rule(node, placements, *, new_dim: bool):
    """cat (new_dim=False) / stack (new_dim=True): inputs share the shard; cat along it gathers."""
    out_nd = node.meta["val"].dim()
    # torch.cat skips 1-D empty tensors whatever the others' rank (an empty KV cache, `cat((past,
    # k), -2)` with past = torch.tensor([])): they take no part and need nothing
    parts = [
        n
        for n in node.args[0]
        if isinstance(n, torch.fx.Node) and (new_dim or out_nd == 1 or tuple(shape_of(n)) != (0,))
    ]
    dim = norm_dim(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), out_nd)
    pls = [placements[n] for n in parts]
    if any(isinstance(p, Partial) for p in pls):
        return Decision(P) if all(isinstance(p, Partial) for p in pls) else None
    shard_dims = {p.dim for p in pls if isinstance(p, Shard)}
    if len(shard_dims) != 1:
        return None
    d = shard_dims.pop()
    if d == dim and not new_dim:
        return None
    needs = {n: Shard(d) for n, p in zip(parts, pls) if isinstance(p, Replicate)}
    return Decision(Shard(d + 1 if new_dim and d >= dim else d), needs)


@rule(aten.cat)
def cat_rule(node, placements, tp):
    """cat: inputs share the shard; concatenating along it gathers."""
    return _join_rule(node, placements, new_dim=False)


@rule(aten.stack)
def stack_rule(node, placements, tp):
    """stack: inputs share the shard, which moves right when the new dim is before it."""
    return _join_rule(node, placements, new_dim=True)
