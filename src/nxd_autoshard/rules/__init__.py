"""Sharding rules keyed by ATen op: given input placements, the output placement and what inputs need.

A rule returns a `Decision`, or None when the op cannot run on the given placements; the
propagation pass then gathers every input to Replicate and warns, naming node and module.
Rules only read the graph; shape constants are localised by the `rewrite` they return,
which the partition pass calls.

Vocab padding: a vocab dim that tp does not divide is sharded as `Shard(dim)` over a zero-padded
size (`padded_size`), recorded as `node.meta["nxd_padded"]` by propagation. Only the ops in
`PADDING_AWARE` read that mark and say, through `Decision.padded`, whether their output still
carries the padding; propagation gathers a padded input of any other op to Replicate (the gather
slices the padding off), so no rule can mistake padding for data.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx
from torch.fx.experimental import symbolic_shapes as _symbolic

from nxd_autoshard.ir.ops import expert_linear
from nxd_autoshard.ir.placements import Partial, Placement, Replicate, Shard


def hint_int(size) -> int:
    """Example value of a possibly symbolic size (the name moved between torch 2.9 and 2.13)."""
    if isinstance(size, int):
        return size
    for name in ("hint_int", "optimization_hint", "guarding_hint_or_throw"):
        fn = getattr(_symbolic, name, None)
        if fn is not None:
            return int(fn(size))
    return int(size.node.hint)


__all__ = [
    "PADDING_AWARE", "RULES", "Decision", "handles_padding", "padded_of", "rule_for", "shape_of",
    "tensor_inputs", "view_groups",
]


aten = torch.ops.aten


R = Replicate()


P = Partial()


@dataclass
class Decision:
    """Output placement of a node, the placements its tensor inputs need, and a local rewrite."""

    out: Placement | tuple
    needs: dict[torch.fx.Node, Placement] = field(default_factory=dict)
    rewrite: Callable[[torch.fx.Node, int], None] | None = None
    note: str | None = None
    # vocab padding: the padded global size of the output's shard dim; a Shard this decision
    # needs of an input is then padded to the same size (a replicated [vocab] bias, say)
    padded: int | None = None


def padded_of(node) -> int | None:
    """Padded global size of a value's shard dim (vocab padding), or None when it is not padded."""
    return node.meta.get("nxd_padded") if isinstance(node, torch.fx.Node) else None


def shape_of(node) -> tuple[int, ...]:
    """Example sizes of a node's tensor value (symbolic sizes by their hints)."""
    val = node.meta.get("val")
    return tuple(hint_int(s) for s in val.shape)


def is_tensor_node(arg) -> bool:
    """A node whose value is a tensor or a tuple of tensors (split, chunk)."""
    if not isinstance(arg, torch.fx.Node):
        return False
    val = arg.meta.get("val")
    if isinstance(val, (list, tuple)):
        return bool(val) and all(isinstance(v, torch.Tensor) for v in val)
    return isinstance(val, torch.Tensor)


def tensor_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Tensor-valued input nodes in argument order, each once."""
    seen: dict[torch.fx.Node, None] = {}

    def visit(arg):
        if is_tensor_node(arg):
            seen.setdefault(arg, None)
        return arg

    torch.fx.node.map_arg((node.args, node.kwargs), visit)
    return list(seen)


def _norm(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _packet(target):
    return getattr(target, "overloadpacket", target)


POINTWISE = {
    aten.add, aten.sub, aten.mul, aten.div, aten.neg, aten.silu, aten.gelu, aten.tanh, aten.relu,
    aten.sigmoid, aten.pow, aten.rsqrt, aten.sqrt, aten.exp, aten.log, aten.where, aten.eq,
    aten.ne, aten.lt, aten.le, aten.gt, aten.ge, aten.logical_and, aten.logical_or,
    aten.logical_not, aten.__and__, aten.__or__, aten.bitwise_and, aten.bitwise_or,
    aten.bitwise_not, aten.clone, aten.contiguous, aten.alias, aten.detach, aten.to,
    aten._to_copy, aten.type_as, aten.dropout, aten.abs, aten.sin, aten.cos, aten.erf,
    aten.masked_fill, aten.clamp, aten.minimum, aten.maximum, aten.reciprocal, aten.square,
    aten.softplus, aten.lift_fresh_copy, aten.log1p, aten.expm1, aten.tril, aten.triu,
    aten.leaky_relu, aten.elu, aten.hardtanh, aten.mish, aten.erfc, aten.rsub,
    aten.zeros_like, aten.ones_like, aten.empty_like, aten.full_like, aten.rand_like,
    aten.floor_divide, aten.remainder, aten.fmod, aten.sign, aten.isnan, aten.isinf,
    aten.logical_xor, aten.nan_to_num, aten.hardswish, aten.hardsigmoid, aten.glu,
}


# ops that may pass a Partial operand through unreduced; anything else reduces it first,
# so each Partial value is all-reduced once, where Megatron would reduce it
LINEAR_IN_PARTIAL = {aten.clone, aten.contiguous, aten.alias, aten.detach}


ADDITIVE = {aten.add, aten.sub}


def pointwise_rule(node, placements):
    """Broadcasting element-wise ops: shards must agree on the aligned dim."""
    out_nd = node.meta["val"].dim()
    ins = tensor_inputs(node)
    shard_dim = None
    for n in ins:
        p = placements[n]
        if isinstance(p, Shard):
            aligned = p.dim + out_nd - n.meta["val"].dim()
            if shard_dim is None:
                shard_dim = aligned
            elif shard_dim != aligned:
                return None
    partial_ins = [n for n in ins if isinstance(placements[n], Partial)]
    packet = _packet(node.target)
    if packet in (aten.tril, aten.triu) and shard_dim is not None and shard_dim >= out_nd - 2:
        return None
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


def view_groups(in_shape, out_shape):
    """Pair runs of input dims with runs of output dims whose products match."""
    groups, i, j = [], 0, 0
    while i < len(in_shape) or j < len(out_shape):
        if i < len(in_shape) and in_shape[i] == 1 and (j >= len(out_shape) or out_shape[j] != 1):
            groups.append(([i], []))
            i += 1
            continue
        if j < len(out_shape) and out_shape[j] == 1 and (i >= len(in_shape) or in_shape[i] != 1):
            groups.append(([], [j]))
            j += 1
            continue
        if i >= len(in_shape) or j >= len(out_shape):
            return None
        ins, outs, pi, pj = [i], [j], in_shape[i], out_shape[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < len(in_shape):
                pi *= in_shape[i]
                ins.append(i)
                i += 1
            elif pj < pi and j < len(out_shape):
                pj *= out_shape[j]
                outs.append(j)
                j += 1
            else:
                return None
        groups.append((ins, outs))
    return groups


def _divide_literal(position: int, tp: int, padded: int | None = None):
    """Rewrite the size literal at `position` to its local value: size/tp, or padded/tp when padded."""

    def rewrite(node, tp_=tp):
        sizes = list(node.args[1])
        value = sizes[position]
        if isinstance(value, int) and value != -1:
            sizes[position] = (padded or value) // tp_
            node.args = (node.args[0], sizes, *node.args[2:])
        elif isinstance(value, torch.fx.Node):
            raise NotImplementedError(
                f"node '{node.name}' sets a sharded dim from a symbolic size; cannot localise it"
            )

    return rewrite


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
            return Decision(Shard(target), rewrite=_divide_literal(target, tp, padded), padded=padded)
        if out_shape[target] % tp:
            return Decision(R, {x: R}, note=f"size {out_shape[target]} is not divisible by tp={tp}")
        return Decision(Shard(target), rewrite=_divide_literal(target, tp))
    return None


def expand_rule(node, placements, tp):
    x = node.args[0]
    p = placements[x]
    if isinstance(p, Partial):
        return Decision(P)
    out_dim = p.dim + len(node.args[1]) - x.meta["val"].dim()
    return Decision(Shard(out_dim), rewrite=_divide_literal(out_dim, tp))


def _dim_map_rule(mapping: Callable[[torch.fx.Node, int], int | None], linear: bool = True):
    """Ops that move dims around: output dim of the input's shard dim, or None to gather."""

    def rule(node, placements, tp):
        x = node.args[0]
        p = placements[x]
        if isinstance(p, Partial):
            return Decision(P) if linear else None
        out = mapping(node, p.dim)
        return None if out is None else Decision(Shard(out), padded=padded_of(x))

    return rule


def _transpose_map(node, d):
    nd = node.args[0].meta["val"].dim()
    a, b = _norm(node.args[1], nd), _norm(node.args[2], nd)
    return b if d == a else a if d == b else d


def _t_map(node, d):
    return 1 - d if node.args[0].meta["val"].dim() == 2 else d


def _permute_map(node, d):
    nd = node.args[0].meta["val"].dim()
    order = [_norm(x, nd) for x in node.args[1]]
    return order.index(d)


def _unsqueeze_map(node, d):
    pos = _norm(node.args[1], node.meta["val"].dim())
    return d + 1 if d >= pos else d


def _squeeze_map(node, d):
    x_shape = shape_of(node.args[0])
    nd = len(x_shape)
    if len(node.args) == 1:
        dims = [i for i, s in enumerate(x_shape) if s == 1]
    else:
        raw = node.args[1]
        dims = [_norm(i, nd) for i in (raw if isinstance(raw, (list, tuple)) else [raw])]
        dims = [i for i in dims if x_shape[i] == 1]
    if d in dims:
        return None
    return d - sum(1 for i in dims if i < d)


def _select_map(node, d):
    dim = _norm(node.args[1], node.args[0].meta["val"].dim())
    if dim == d:
        return None
    return d - 1 if d > dim else d


def _slice_map(node, d):
    nd = node.args[0].meta["val"].dim()
    dim = _norm(node.args[1] if len(node.args) > 1 else 0, nd)
    if dim != d:
        return d
    start = node.args[2] if len(node.args) > 2 else None
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    full = shape_of(node.args[0])[d]
    whole = start in (None, 0) and (end is None or (isinstance(end, int) and end >= full))
    return d if whole and step == 1 else None


def _same_dim_unless(arg_index: int, default=None):
    """Ops with a `dim` argument that must not be the shard dim (softmax, cumsum, ...)."""

    def mapping(node, d):
        nd = node.args[0].meta["val"].dim()
        raw = node.args[arg_index] if len(node.args) > arg_index else node.kwargs.get("dim", default)
        dims = raw if isinstance(raw, (list, tuple)) else [raw]
        return None if any(_norm(x, nd) == d for x in dims if x is not None) else d

    return mapping


def _pad_map(node, d):
    nd = node.args[0].meta["val"].dim()
    padded = len(node.args[1]) // 2
    return None if d >= nd - padded else d


def _index_select_map(node, d):
    dim = _norm(node.args[1], node.args[0].meta["val"].dim())
    return None if dim == d else d


def _slice_bounds(node) -> tuple[int, int, int, int] | None:
    """(dim, start, end, step) of a slice with int bounds, end clipped to the size."""
    x = node.args[0]
    nd = x.meta["val"].dim()
    dim = _norm(node.args[1] if len(node.args) > 1 else 0, nd)
    start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
    end = node.args[3] if len(node.args) > 3 and node.args[3] is not None else shape_of(x)[dim]
    step = node.args[4] if len(node.args) > 4 else 1
    if not all(isinstance(v, int) for v in (start, end, step)):
        return None
    return dim, start, min(end, shape_of(x)[dim]), step


def slice_block_rule(node, placements, tp):
    """Slices that cut the shard dim into equal, aligned pieces (a fused qkv read as x[..., :d],
    x[..., d:2d], ...) are blocks, like chunk: each rank slices its own piece of every block."""
    x = node.args[0]
    p = placements[x]
    bounds = _slice_bounds(node)
    if not isinstance(p, Shard) or bounds is None or bounds[0] != p.dim or padded_of(x):
        return None
    dim, start, end, step = bounds
    full = shape_of(x)[dim]
    width = end - start
    siblings = [u for u in x.users if _packet(u.target) is aten.slice]
    spans = [_slice_bounds(u) for u in siblings]
    if step != 1 or width <= 0 or width == full or full % width or start % width or width % tp:
        return None
    if any(b is None or b[0] != dim or b[2] - b[1] != width or b[1] % width or b[3] != 1
           for b in spans):
        return None  # unequal pieces (GQA q|k|v): a per-piece shard layout is not supported

    def rewrite(node, tp_=tp, start=start, width=width):
        local = width // tp_
        node.args = (node.args[0], dim, start // tp_, start // tp_ + local, *node.args[4:])

    return Decision(Shard(p.dim), note=f"blocks={full // width}", rewrite=rewrite)


def split_rule(node, placements, tp):
    """split/chunk/unbind: each piece keeps the shard; equal splits of the shard dim are blocked."""
    x = node.args[0]
    p = placements[x]
    n_out = len(node.meta["val"])
    if isinstance(p, Partial):
        return Decision(tuple([P] * n_out))
    packet = _packet(node.target)
    nd = x.meta["val"].dim()
    default_dim = 0
    dim_index = 2 if packet in (aten.split, aten.split_with_sizes, aten.chunk) else 1
    raw_dim = node.args[dim_index] if len(node.args) > dim_index else node.kwargs.get("dim", default_dim)
    dim = _norm(raw_dim, nd)
    if packet is aten.unbind:
        if dim == p.dim:
            return None
        out = Shard(p.dim - 1 if p.dim > dim else p.dim)
        return Decision(tuple([out] * n_out))
    if dim != p.dim:
        return Decision(tuple([p] * n_out))
    sizes = [shape_of_val(v)[dim] for v in node.meta["val"]]
    if len(set(sizes)) != 1 or sizes[0] % tp:
        return None
    decision = Decision(tuple([p] * n_out), note=f"blocks={n_out}")
    if packet is aten.split:
        def rewrite(node, tp_=tp):
            node.args = (node.args[0], node.args[1] // tp_, *node.args[2:])
        decision.rewrite = rewrite
    elif packet is aten.split_with_sizes:
        def rewrite(node, tp_=tp):
            node.args = (node.args[0], [s // tp_ for s in node.args[1]], *node.args[2:])
        decision.rewrite = rewrite
    return decision


def shape_of_val(val) -> tuple[int, ...]:
    return tuple(hint_int(s) for s in val.shape)


def _join_rule(node, placements, tp, *, new_dim: bool):
    """cat (new_dim=False) / stack (new_dim=True): inputs share the shard; joining along it gathers."""
    parts = [n for n in node.args[0] if isinstance(n, torch.fx.Node)]
    out_nd = node.meta["val"].dim()
    dim = _norm(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), out_nd)
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


def cat_rule(node, placements, tp):
    return _join_rule(node, placements, tp, new_dim=False)


def stack_rule(node, placements, tp):
    return _join_rule(node, placements, tp, new_dim=True)


def reduction_rule(node, placements, tp):
    """sum/mean/amax over dims: a reduced shard dim gives Partial for sum, a gather otherwise."""
    x = node.args[0]
    p = placements[x]
    packet = _packet(node.target)
    nd = x.meta["val"].dim()
    raw = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = list(range(nd)) if raw is None or raw == [] else [
        _norm(d, nd) for d in (raw if isinstance(raw, (list, tuple)) else [raw])
    ]
    keepdim = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
    if isinstance(p, Partial):
        return Decision(P) if packet is aten.sum else None
    if p.dim in dims:
        # padding need not be zero after element-wise ops: a padded dim is gathered, then reduced
        return Decision(P) if packet is aten.sum and not padded_of(x) else None
    out = p.dim if keepdim else p.dim - sum(1 for d in dims if d < p.dim)
    return Decision(Shard(out), padded=padded_of(x))


def layer_norm_rule(node, placements, tp):
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


def rms_norm_rule(node, placements, tp):
    return layer_norm_rule(node, placements, tp)


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


def _padded_shard(node, placement) -> bool:
    return isinstance(placement, Shard) and padded_of(node) is not None


def matmul_rule(node, placements, tp):
    a, b = node.args[0], node.args[1]
    return _matmul_decision(a, b, placements[a], placements[b], node.meta["val"].dim())


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
        if isinstance(px, Partial):
            return Decision(P)
        if isinstance(px, Shard) and px.dim != last:
            return Decision(Shard(px.dim))
        return Decision(R, {x: R})
    return None


def expert_linear_rule(node, placements, tp):
    """expert_linear(x, W, offsets), W [experts, out, in]: column (W S(1)) or row (W S(2))."""
    x, w, offsets = node.args[:3]
    px, pw = placements[x], placements[w]
    keep_offsets = {offsets: R} if not isinstance(placements.get(offsets), Replicate) else {}
    if pw == Shard(1):
        return Decision(Shard(1), {**keep_offsets, **({x: R} if px != R else {})})
    if pw == Shard(2):
        return Decision(P, {**keep_offsets, **({x: Shard(1)} if px != Shard(1) else {})})
    if isinstance(pw, Replicate):
        return Decision(P, keep_offsets) if isinstance(px, Partial) else Decision(R, {**keep_offsets, x: R})
    return None


def baddbmm_rule(node, placements, tp):
    bias, a, b = node.args[0], node.args[1], node.args[2]
    d = _matmul_decision(a, b, placements[a], placements[b], node.meta["val"].dim())
    if d is None or isinstance(d.out, Partial):
        return None
    pb = placements[bias]
    if isinstance(d.out, Shard):
        if pb != d.out:
            d.needs[bias] = d.out
    return d


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


def embedding_rule(node, placements, tp):
    weight, ids = node.args[0], node.args[1]
    pw = placements[weight]
    needs = {ids: R} if not isinstance(placements[ids], Replicate) else {}
    if isinstance(pw, Shard) and pw.dim == 0:
        vocab = shape_of(weight)[0]

        def rewrite(node, tp_=tp):
            from nxd_autoshard.ir.ops import vocab_parallel_embedding

            padding_idx = node.args[2] if len(node.args) > 2 else -1
            node.target = vocab_parallel_embedding
            node.args = (node.args[0], node.args[1], padding_idx, vocab, "tp")
            node.kwargs = {}

        return Decision(P, needs, rewrite=rewrite)
    if padded_of(weight):
        return None
    if isinstance(pw, Shard) and pw.dim == 1:
        return Decision(Shard(node.meta["val"].dim() - 1), needs)
    return None


def cross_entropy_rule(node, placements, tp):
    logits, target = node.args[0], node.args[1]
    p = placements[logits]
    weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
    smoothing = node.args[5] if len(node.args) > 5 else node.kwargs.get("label_smoothing", 0.0)
    if not isinstance(p, Shard) or p.dim != 1 or logits.meta["val"].dim() != 2:
        return None
    if weight is not None or smoothing:
        return None
    vocab = shape_of(logits)[1]

    def rewrite(node, tp_=tp):
        from nxd_autoshard.ir.ops import vocab_parallel_cross_entropy

        reduction = node.args[3] if len(node.args) > 3 else node.kwargs.get("reduction", 1)
        ignore = node.args[4] if len(node.args) > 4 else node.kwargs.get("ignore_index", -100)
        node.target = vocab_parallel_cross_entropy
        node.args = (node.args[0], node.args[1], reduction, ignore, node.meta.get("nxd_vocab", vocab), "tp")
        node.kwargs = {}

    needs = {target: R} if not isinstance(placements[target], Replicate) else {}
    return Decision(R, needs, rewrite=rewrite)


def getitem_rule(node, placements, tp):
    src, index = node.args
    p = placements[src]
    if isinstance(p, tuple):
        return Decision(p[index])
    return Decision(p)


def fresh_rule(node, placements, tp):
    """new_zeros/new_ones/...: the result does not depend on the input's values."""
    return Decision(R)


RULES: dict[object, Callable] = {
    **{op: lambda node, placements, tp: pointwise_rule(node, placements) for op in POINTWISE},
    aten.view: view_rule,
    aten.reshape: view_rule,
    aten._unsafe_view: view_rule,
    aten.expand: expand_rule,
    aten.transpose: _dim_map_rule(_transpose_map),
    aten.t: _dim_map_rule(_t_map),
    aten.permute: _dim_map_rule(_permute_map),
    aten.unsqueeze: _dim_map_rule(_unsqueeze_map),
    aten.squeeze: _dim_map_rule(_squeeze_map),
    aten.select: _dim_map_rule(_select_map),
    aten.slice: lambda node, placements, tp: (
        slice_block_rule(node, placements, tp) or _dim_map_rule(_slice_map)(node, placements, tp)),
    aten.softmax: _dim_map_rule(_same_dim_unless(1), linear=False),
    aten._softmax: _dim_map_rule(_same_dim_unless(1), linear=False),
    aten.log_softmax: _dim_map_rule(_same_dim_unless(1), linear=False),
    aten._log_softmax: _dim_map_rule(_same_dim_unless(1), linear=False),
    aten.cumsum: _dim_map_rule(_same_dim_unless(1)),
    aten.pad: _dim_map_rule(_pad_map, linear=False),
    aten.constant_pad_nd: _dim_map_rule(_pad_map, linear=False),
    aten.index_select: _dim_map_rule(_index_select_map),
    aten.split: split_rule,
    aten.split_with_sizes: split_rule,
    aten.chunk: split_rule,
    aten.unbind: split_rule,
    aten.cat: cat_rule,
    aten.stack: stack_rule,
    aten.sum: reduction_rule,
    aten.mean: reduction_rule,
    aten.amax: reduction_rule,
    aten.amin: reduction_rule,
    aten.layer_norm: layer_norm_rule,
    aten.rms_norm: rms_norm_rule,
    aten.linear: linear_rule,
    expert_linear: expert_linear_rule,
    aten.matmul: matmul_rule,
    aten.bmm: matmul_rule,
    aten.mm: matmul_rule,
    aten.baddbmm: baddbmm_rule,
    aten.scaled_dot_product_attention: sdpa_rule,
    aten.embedding: embedding_rule,
    aten.cross_entropy_loss: cross_entropy_rule,
    operator.getitem: getitem_rule,
    aten.new_zeros: fresh_rule,
    aten.new_ones: fresh_rule,
    aten.new_empty: fresh_rule,
    aten.new_full: fresh_rule,
}


# ops whose rules read `padded_of` (see the module docstring); the rest never see a padded input
PADDING_AWARE = POINTWISE | {
    aten.view, aten.reshape, aten._unsafe_view, aten.transpose, aten.t, aten.permute,
    aten.unsqueeze, aten.squeeze, aten.select, aten.slice, aten.softmax, aten._softmax,
    aten.log_softmax, aten._log_softmax, aten.cumsum, aten.pad, aten.constant_pad_nd,
    aten.index_select, aten.sum, aten.mean, aten.amax, aten.amin, aten.linear, aten.matmul,
    aten.bmm, aten.mm, aten.embedding, aten.cross_entropy_loss,
}


def handles_padding(target) -> bool:
    """Whether the op's rule understands padded shards (vocab padding)."""
    return _packet(target) in PADDING_AWARE


def rule_for(target):
    """The rule of an op (by overload packet), or None; in-place ops (`add_`) follow their
    out-of-place op, whose result they equal."""
    packet = _packet(target)
    rule = RULES.get(packet)
    name = getattr(packet, "__name__", "")
    if rule is None and name.endswith("_") and not name.startswith("_"):
        rule = RULES.get(getattr(aten, name[:-1], None))
    return rule

