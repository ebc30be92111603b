"""Partition pass: turn a propagated global graph into the one local program every TP rank runs."""

from __future__ import annotations

import torch
import torch.fx

from nxd_autoshard.compiler.propagate import PropagationResult
from nxd_autoshard.ir import ops as C
from nxd_autoshard.ir.meta import padded_of, placement_of, sequence_sharded, set_placement, set_tp
from nxd_autoshard.ir.opsets import COPIES, PERMUTES, RESHAPES, SLICES, op_name
from nxd_autoshard.ir.placements import Partial, Placement, Replicate, Shard
from nxd_autoshard.ir.program import CapturedProgram, module_path
from nxd_autoshard.rules import (
    FRESH,
    DivideSize,
    Lower,
    ScaleInput,
    SliceBlock,
    SplitSizes,
    tensor_inputs,
)

__all__ = ["partition", "redistribute_ops", "requires_grad_nodes"]


AXIS = "tp"


def redistribute_ops(
    src: Placement, dst: Placement, *, size: int | None = None, pad: list[int] | None = None
) -> list[tuple]:
    """Collective calls (function, extra args) that turn `src` into `dst`.

    Vocab padding, whose backward gives the padding a zero gradient: size, the real size of a
    padded source shard dim, whose gathered padding is sliced off; pad, the `constant_pad_nd`
    widths that zero-pad a replicated value before it is sharded over a padded dim.
    """
    if src == dst:
        return []
    if isinstance(src, Replicate) and isinstance(dst, Shard) and pad is not None:
        return [(torch.ops.aten.constant_pad_nd.default, (pad,)), (C.shard, (dst.dim, AXIS))]
    if isinstance(src, Partial):
        if isinstance(dst, Replicate):
            return [(C.all_reduce, (AXIS,))]
        if isinstance(dst, Shard):
            return [(C.reduce_scatter, (dst.dim, AXIS))]
    if isinstance(src, Shard):
        gather = [(C.all_gather, (src.dim, AXIS))]
        if size is not None:
            gather.append((torch.ops.aten.slice.Tensor, (src.dim, 0, size)))
        if isinstance(dst, Replicate):
            return gather
        if isinstance(dst, Shard):
            return gather + [(C.shard, (dst.dim, AXIS))]
    if isinstance(src, Replicate) and isinstance(dst, Shard):
        return [(C.shard, (dst.dim, AXIS))]
    raise ValueError(f"no redistribution from {src} to {dst}")


def requires_grad_nodes(gm: torch.fx.GraphModule, program: CapturedProgram) -> set[torch.fx.Node]:
    """Values that carry a gradient: parameters, floating user inputs and what they feed."""
    grad: set[torch.fx.Node] = set()
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or not val.dtype.is_floating_point:
            continue
        if i >= program.num_state or program.state_kinds[i] == "parameter":
            grad.add(node)
    for node in gm.graph.nodes:
        if node.op != "call_function" or getattr(node.target, "overloadpacket", None) in FRESH:
            continue
        val = node.meta.get("val")
        floating = isinstance(val, torch.Tensor) and val.dtype.is_floating_point
        floating = floating or isinstance(val, (list, tuple))
        if floating and any(n in grad for n in tensor_inputs(node)):
            grad.add(node)
    return grad


def _is_replicated(p) -> bool:
    if isinstance(p, tuple):
        return all(_is_replicated(x) for x in p)
    return p is None or isinstance(p, Replicate)


def partition(program: CapturedProgram, result: PropagationResult, tp: int) -> CapturedProgram:
    """Insert collectives where a consumer needs another placement and localise shape constants."""
    gm = program.gm
    graph = gm.graph
    grad = requires_grad_nodes(gm, program)
    cache: dict[tuple, torch.fx.Node] = {}

    def convert(
        value: torch.fx.Node,
        src: Placement,
        dst: Placement,
        padded: int | None = None,
        sequence: bool = False,
    ):
        key = (value, dst, str(padded), sequence)  # str: a dynamic padded size is a SymInt
        if key in cache:
            return cache[key]
        current = anchor = value if value.op != "placeholder" else _last_placeholder(graph)
        current = value
        size = _size_arg(graph, _real_size_if_padded(value, src))
        if sequence and padded is not None:
            steps = _into_padded_sequence(src, dst, size, tp)
        elif size is not None and sequence_sharded(value):  # out of padded sequence shards
            steps = redistribute_ops(src, Replicate()) + [(C.unpad_sequence, (src.dim, size))]
            steps += redistribute_ops(Replicate(), dst)
        else:
            steps = redistribute_ops(src, dst, size=size, pad=_pad_widths(value, dst, padded))
        for fn, extra in steps:
            with graph.inserting_after(anchor):
                current = graph.call_function(fn, (current, *extra))
            set_placement(current, dst)
            current.meta["nn_module_stack"] = value.meta.get("nn_module_stack", {})
            current.meta["val"] = value.meta.get("val")
            anchor = current
        if value in grad:
            grad.add(current)
        cache[key] = current
        return current

    def grad_reduce(value: torch.fx.Node) -> torch.fx.Node:
        key = (value, "grad")
        if key not in cache:
            anchor = value if value.op != "placeholder" else _last_placeholder(graph)
            with graph.inserting_after(anchor):
                node = graph.call_function(C.grad_all_reduce, (value, AXIS))
            node.meta.update(
                nxd_placement=Replicate(),
                val=value.meta.get("val"),
                nn_module_stack=value.meta.get("nn_module_stack", {}),
            )
            cache[key] = node
        return cache[key]

    for node in list(graph.nodes):
        if node.op == "output":
            _localise_outputs(node, convert)
            continue
        decision = result.decisions.get(node)
        if decision is None:
            continue
        _check_size_queries(node)
        replace: dict[torch.fx.Node, torch.fx.Node] = {}
        for value, need in decision.needs.items():
            have = placement_of(value)
            if have != need:
                padded = decision.padded if isinstance(need, Shard) else None
                replace[value] = convert(value, have, need, padded, sequence_sharded(node))
        if not _is_replicated(decision.out):
            for value in tensor_inputs(node):
                src = replace.get(value, value)
                placed = placement_of(src)
                if isinstance(placed, Replicate) and src in grad:
                    replace[value] = grad_reduce(src)
        if replace:
            node.args = torch.fx.node.map_arg(node.args, lambda a: replace.get(a, a))
            node.kwargs = torch.fx.node.map_arg(node.kwargs, lambda a: replace.get(a, a))
        for step in decision.localise:
            LOCALISE[type(step)](node, step, tp)
    _gather_partial_grads(graph)
    set_tp(gm, tp)  # the graph is now one rank's: printers divide sharded dims by tp
    graph.lint()
    gm.recompile()
    return program


# ops a gradient all-reduce commutes with: they move, copy, drop or pad elements in the same
# dtype, so their backward only moves them back, takes a part or fills zeros, no arithmetic:
# summing the ranks' gradients before it or after it is the same, bit for bit. A slice of any
# dim, the gathered one too (HF's hidden_states[:, -k:] before the LM head): the forward
# gather is the same, and the reduce-scatter of the zero-filled gradient sums what the
# all-reduce would. Not expand, whose backward sums; not detach, which ends the gradient.
_MOVES = (RESHAPES - {"expand"}) | (COPIES - {"detach"}) | PERMUTES | SLICES


def _gather_partial_grads(graph: torch.fx.Graph) -> None:
    """An all-gather read only (through views) by a gradient all-reduce gets a Partial gradient
    back: one all_gather_rs (reduce-scatter backward) sends half the bytes of all-reduce + chunk."""
    for node in list(graph.nodes):
        if node.target is not C.grad_all_reduce:
            continue
        source = node.args[0]
        chain = []
        while (
            source.op == "call_function"
            and (op_name(source) in _MOVES or source.target is C.unpad_sequence)  # a slice too
            and len(source.users) == 1
        ):
            chain.append(source)
            source = source.args[0]
        if source.target is not C.all_gather or len(source.users) != 1:
            continue
        source.target = C.all_gather_rs
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)


def _divide_size(node: torch.fx.Node, step: DivideSize, tp: int) -> None:
    """The size literal at args[arg][position] becomes its local value: size/tp, or padded/tp."""
    sizes = list(node.args[step.arg])
    value = sizes[step.position]
    if isinstance(value, int) and value != -1:
        sizes[step.position] = (step.padded or value) // tp
        node.args = (*node.args[: step.arg], sizes, *node.args[step.arg + 1 :])
    elif isinstance(value, torch.fx.Node):
        raise NotImplementedError(
            f"node '{node.name}' sets a sharded dim from a symbolic size; cannot localise it"
        )


def _split_sizes(node: torch.fx.Node, step: SplitSizes, tp: int) -> None:
    """split's size (an int) or split_with_sizes' sizes (a list) become their local values."""
    sizes = node.args[1]
    local = [s // tp for s in sizes] if isinstance(sizes, (list, tuple)) else sizes // tp
    node.args = (node.args[0], local, *node.args[2:])


def _slice_block(node: torch.fx.Node, step: SliceBlock, tp: int) -> None:
    """A slice of one block of a blocked shard dim reads this rank's piece of that block."""
    start = step.start // tp
    node.args = (node.args[0], step.dim, start, start + step.width // tp, *node.args[4:])


def _scale_input(node: torch.fx.Node, step: ScaleInput, tp: int) -> None:
    """The first input divided by tp, in a node of its own (the node's users keep reading it)."""
    x = node.args[0]
    with node.graph.inserting_before(node):
        scaled = node.graph.call_function(torch.ops.aten.div.Tensor, (x, tp))
    if "val" in x.meta:
        scaled.meta["val"] = x.meta["val"]
    set_placement(scaled, placement_of(x))
    scaled.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
    node.args = (scaled, *node.args[1:])


def _lower(node: torch.fx.Node, step: Lower, tp: int) -> None:
    """Retarget a node to a runtime op (vocab-parallel embedding, a sharded reduction, ...)."""
    node.target = step.op
    extra = tuple(_size_arg(node.graph, a) for a in step.extra_args)  # a dynamic length: a node
    node.args = (*node.args[: step.keep], *extra)
    node.kwargs = {}


# how each kind of localisation a rule returns changes the node in the local program
LOCALISE = {
    DivideSize: _divide_size,
    SplitSizes: _split_sizes,
    SliceBlock: _slice_block,
    ScaleInput: _scale_input,
    Lower: _lower,
}


def _into_padded_sequence(src: Placement, dst: Shard, size: int | None, tp: int) -> list[tuple]:
    """Into sequence shards of a length tp does not divide: padded with copies of the last row
    (`pad_sequence`; a Partial value's copies sum to the real row's copy), then split."""
    pad = (C.pad_sequence, (dst.dim, tp))
    if isinstance(src, Shard):  # shards of another dim: gathered whole first
        gathered = redistribute_ops(src, Replicate(), size=size)
        return gathered + [pad, (C.shard, (dst.dim, AXIS))]
    return [pad] + redistribute_ops(src, dst)


def _size_arg(graph: torch.fx.Graph, size):
    """`size` as a graph argument: an int, or the node giving a dynamic size (a SymInt)."""
    if not isinstance(size, torch.SymInt):
        return size
    for node in graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.SymInt) and val.node.expr == size.node.expr:
            return node
    for node in graph.nodes:  # read off an input of that size
        val = node.meta.get("val")
        if node.op != "placeholder" or not isinstance(val, torch.Tensor):
            continue
        for dim, d in enumerate(val.shape):
            if isinstance(d, torch.SymInt) and d.node.expr == size.node.expr:
                with graph.inserting_after(_last_placeholder(graph)):
                    found = graph.call_function(torch.ops.aten.sym_size.int, (node, dim))
                found.meta["val"] = d
                return found
    raise NotImplementedError(f"no input gives the dynamic size {size}; capture with static shapes")


def _real_size_if_padded(value: torch.fx.Node, placed: Placement) -> int | None:
    """The unpadded size of a value's shard dim when propagation marked it padded, else None."""
    if not isinstance(placed, Shard) or padded_of(value) is None:
        return None
    return value.meta["val"].shape[placed.dim]


def _pad_widths(value: torch.fx.Node, dst: Placement, padded: int | None) -> list[int] | None:
    """`constant_pad_nd` widths that zero-pad a value's `dst` shard dim up to `padded`, or None."""
    if padded is None or not isinstance(dst, Shard):
        return None
    shape = value.meta["val"].shape
    return [0, 0] * (len(shape) - 1 - dst.dim) + [0, padded - int(shape[dst.dim])]


def _last_placeholder(graph: torch.fx.Graph) -> torch.fx.Node:
    return [n for n in graph.nodes if n.op == "placeholder"][-1]


def _check_size_queries(node: torch.fx.Node) -> None:
    if getattr(node.target, "overloadpacket", None) is not torch.ops.aten.sym_size:
        return
    placed = placement_of(node.args[0])
    if isinstance(placed, Shard) and placed.dim == node.args[1]:
        mod = module_path(node)
        raise NotImplementedError(
            f"node '{node.name}'{f' in module {mod!r}' if mod else ''} reads the size of a "
            f"dimension sharded across tp; mark that module 'replicate' in the plan"
        )


def _localise_outputs(node: torch.fx.Node, convert) -> None:
    def fix(arg):
        if isinstance(arg, torch.fx.Node) and isinstance(arg.meta.get("val"), torch.Tensor):
            have = placement_of(arg)
            if have is not None and not isinstance(have, Replicate):
                return convert(arg, have, Replicate())
        return arg

    node.args = torch.fx.node.map_arg(node.args, fix)
