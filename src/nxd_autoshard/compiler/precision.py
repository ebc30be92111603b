"""Mixed precision (`autoshard(..., precision="bf16")`): fp32 master weights, bf16 compute.

The model is captured as its bf16 copy would run (`model.to(bfloat16)`: the model's own
upcasts, such as RMSNorm's variance or the loss's `logits.float()`, stay in the program), and
this pass makes the program read the fp32 master weights: each floating state input is cast
to bf16 just before its first use. The cast's backward turns the bf16 gradient into fp32, so
`.grad` of every parameter is fp32 and accumulates in fp32 over microbatches and stages (NxD's
use_master_weights + use_fp32_grad_acc); the optimizer steps the fp32 weights themselves.
The cast sits with its first user (same module), so a recomputed region recasts its weights
instead of keeping a bf16 copy alive.

With reduce_dtype="fp32", `fp32_partials` runs the ops that make, reduce or read tp's partial
sums in fp32: a row-parallel matmul's addends, summed over ranks, round once, as the unsharded
matmul's fp32 accumulator does (in bf16 each addend rounds first). `reduce_terms_apart` first
undoes a residual stream kept Partial across blocks, which the unsharded model rounds at each add.
"""

from __future__ import annotations

import torch
import torch.fx

from nxd_autoshard.ir import ops
from nxd_autoshard.ir.meta import placement_of, set_placement
from nxd_autoshard.ir.placements import Placement

__all__ = ["DTYPES", "cast_state", "fp32_partials", "reduce_terms_apart"]

# precision name -> compute dtype (fp16 would need loss scaling, which is not here)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cast_state(gm: torch.fx.GraphModule, n_state: int, dtype: torch.dtype) -> torch.fx.GraphModule:
    """Make the first `n_state` placeholders (weights, buffers) fp32 inputs cast to `dtype` at use."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"][:n_state]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for ph in placeholders:
        val = ph.meta.get("val")
        if not isinstance(val, torch.Tensor) or not val.is_floating_point() or not ph.users:
            continue
        first = min(ph.users, key=order.__getitem__)
        with gm.graph.inserting_before(first):
            cast = gm.graph.call_function(torch.ops.aten._to_copy.default, (ph,), {"dtype": dtype})
        ph.replace_all_uses_with(cast, delete_user_cb=lambda user: user is not cast)
        cast.meta.update(
            {k: v for k, v in first.meta.items() if k in ("nn_module_stack", "stack_trace")}
        )
        cast.meta["val"] = val
        set_placement(cast, placement_of(ph))
        ph.meta["val"] = val.to(torch.float32)  # the fp32 master's metadata (fake stays fake)
    gm.graph.lint()
    gm.recompile()
    return gm


# Collectives that sum a Partial value over the axis in forward, and those whose backward sums a
# Partial gradient (the readers of their output produce it).
_SUMS_FORWARD = (ops.all_reduce, ops.reduce_scatter)
_SUMS_BACKWARD = (ops.grad_all_reduce, ops.all_gather_rs)


def _has_dtype(node: torch.fx.Node, dtype: torch.dtype) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dtype == dtype


def _partial_region(gm: torch.fx.GraphModule, dtype: torch.dtype) -> set[torch.fx.Node]:
    """Nodes that make or read a partial sum in `dtype`: Partial values (forward), the readers of
    a backward-summing collective's output (their input gradient is Partial) and the collectives."""
    region: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or not _has_dtype(node, dtype) or "dtype" in node.kwargs:
            continue
        if _is_partial(node) or node.target in _SUMS_FORWARD:
            region.add(node)
        elif node.target in _SUMS_BACKWARD:
            region.add(node)
            region.update(u for u in node.users if _has_dtype(u, dtype))
    return region


def fp32_partials(gm: torch.fx.GraphModule, dtype: torch.dtype) -> torch.fx.GraphModule:
    """Run the ops that make or read partial sums in fp32, so each rank's addend is rounded once."""
    region = _partial_region(gm, dtype)
    up: dict[torch.fx.Node, torch.fx.Node] = {}  # a `dtype` value -> its fp32 copy
    for node in [n for n in gm.graph.nodes if n in region]:

        def to_fp32(arg):
            if not isinstance(arg, torch.fx.Node) or arg in region:
                return arg
            if not _has_dtype(arg, dtype):
                return arg
            if arg not in up:
                with gm.graph.inserting_after(arg):
                    up[arg] = _cast(gm, arg, torch.float32)
            return up[arg]

        node.args = torch.fx.node.map_arg(node.args, to_fp32)
        node.kwargs = torch.fx.node.map_arg(node.kwargs, to_fp32)
    for node in [n for n in gm.graph.nodes if n in region]:
        node.meta["val"] = node.meta["val"].to(torch.float32)
        outside = [u for u in node.users if u not in region]
        if outside:  # back to the compute dtype where the region ends
            with gm.graph.inserting_after(node):
                down = _cast(gm, node, dtype)
            for user in outside:
                user.replace_input_with(node, down)
    gm.graph.lint()
    gm.recompile()
    return gm


def _cast(gm: torch.fx.GraphModule, node: torch.fx.Node, dtype: torch.dtype) -> torch.fx.Node:
    cast = gm.graph.call_function(torch.ops.aten._to_copy.default, (node,), {"dtype": dtype})
    cast.meta.update(
        {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")}
    )
    cast.meta["val"] = node.meta["val"].to(dtype)
    set_placement(cast, placement_of(node))
    return cast


def reduce_terms_apart(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """all_reduce(a + b) of a Partial `b` becomes all_reduce(a) + all_reduce(b), where `a` is
    all-reduced already (no new collective) or an embedding's output (one rank holds each row:
    reducing it alone is exact, one all-reduce more)."""
    reduced: dict[torch.fx.Node, torch.fx.Node] = {}  # a Partial value -> its all-reduced value
    sums = []  # the Partial sums rewritten, erased once no later sum reads them
    for reduce in [n for n in gm.graph.nodes if n.target is ops.all_reduce]:
        total, axis = reduce.args
        reduced.setdefault(total, reduce)
        if total.target is not torch.ops.aten.add.Tensor or len(total.args) != 2:
            continue
        a, b = total.args
        if b in reduced or _is_embedding(b):
            a, b = b, a
        if not _is_partial(b) or not (a in reduced or _is_embedding(a)):
            continue
        if a not in reduced:  # one rank holds each row: reducing it alone is exact (one more)
            with gm.graph.inserting_after(a):
                reduced[a] = gm.graph.call_function(ops.all_reduce, (a, axis))
            reduced[a].meta.update(reduce.meta)
        # the unsharded model rounds `a` before adding `b`; a summed partial would round once
        with gm.graph.inserting_before(reduce):
            rest = gm.graph.call_function(ops.all_reduce, (b, axis))
            added = gm.graph.call_function(torch.ops.aten.add.Tensor, (reduced[a], rest))
        for new in (rest, added):
            new.meta.update(reduce.meta)
        reduce.replace_all_uses_with(added)
        gm.graph.erase_node(reduce)
        reduced[total] = added
        sums.append(total)
    for total in reversed(sums):
        if not total.users:
            gm.graph.erase_node(total)
    gm.graph.lint()
    gm.recompile()
    return gm


def _is_partial(node) -> bool:
    place = placement_of(node) if isinstance(node, torch.fx.Node) else None
    return isinstance(place, Placement) and place.is_partial()


def _is_embedding(node) -> bool:
    return getattr(node, "target", None) is ops.vocab_parallel_embedding
