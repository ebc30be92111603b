"""Small graph-to-graph passes run around propagation: cleanup, bias splitting, device retargeting."""

from __future__ import annotations

import functools

import torch
import torch.fx

from nxd_autoshard.ir.meta import is_parameter, set_split_bias, split_bias_of
from nxd_autoshard.ir.ops import expert_linear, expert_matmul, grouped_linear

__all__ = [
    "decompose_variance",
    "drop_assertions",
    "linear_from_matmul",
    "expert_linear_from_grouped_mm",
    "split_bias",
    "bias_after_view",
    "repeat_kv_heads",
    "retarget_device",
]


aten = torch.ops.aten


def _finish(gm: torch.fx.GraphModule, changed: bool = True) -> torch.fx.GraphModule:
    """Drop what a pass left dead, check the graph and regenerate its code, if it changed: dead
    code elimination alone is ~50 ms on a 6,000-node (70B, 80-layer) program."""
    if changed:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return gm


def drop_assertions(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Remove export's metadata assertions (`_assert_tensor_metadata`): they only check dtype/device."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and getattr(node.target, "overloadpacket", None) in (
            aten._assert_tensor_metadata,
        ):
            gm.graph.erase_node(node)
    return _finish(gm)


_VARIANCE = {
    aten.var.correction: aten.var,
    aten.std.correction: aten.std,
    aten.var_mean.correction: aten.var_mean,
    aten.var.dim: aten.var,  # (self, dim, unbiased, keepdim)
    aten.std.dim: aten.std,
    aten.var_mean.dim: aten.var_mean,
}


def decompose_variance(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Write var / std / var_mean over static dims as mean, subtract, square, sum and divide.

    Those ops have rules: a variance over a sharded dim (a LayerNorm written by hand over a
    column's width) then reduces each rank's piece and all-reduces the small reduced value, as
    sum and mean do, instead of gathering the activation. Autograd through the same formula gives
    the same gradient. Only float32/float64: torch accumulates a bf16 variance in float32.
    """
    graph, changed = gm.graph, False
    for node in list(graph.nodes):
        if node.target not in _VARIANCE:
            continue
        x = node.args[0]
        val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        if not isinstance(val, torch.Tensor) or val.dtype not in (torch.float32, torch.float64):
            continue
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = list(range(val.dim())) if not dims else [d % val.dim() for d in dims]
        sizes = [val.shape[d] for d in dims]
        if not all(isinstance(size, int) for size in sizes):
            continue  # a dynamic (batch or sequence) dim: its count is not a constant
        count = 1
        for size in sizes:
            count *= size
        if node.target._overloadname == "dim":
            unbiased = node.args[2] if len(node.args) > 2 else node.kwargs.get("unbiased", True)
            correction = 1 if unbiased else 0
            keepdim = node.args[3] if len(node.args) > 3 else node.kwargs.get("keepdim", False)
        else:
            correction = node.kwargs.get("correction")
            correction = 1 if correction is None else correction
            keepdim = node.kwargs.get("keepdim", False)
        kind = _VARIANCE[node.target]
        add = functools.partial(_insert_before, node)
        mean = add(aten.mean.dim, x, dims, True)
        centred = add(aten.sub.Tensor, x, mean)
        squares = add(aten.mul.Tensor, centred, centred)
        total = add(aten.sum.dim_IntList, squares, dims, keepdim)
        # count <= correction: 0/0, a NaN, as torch gives
        var = add(aten.div.Tensor, total, float(max(count - correction, 0)))
        if kind is aten.var:
            node.replace_all_uses_with(var)
        elif kind is aten.std:
            node.replace_all_uses_with(add(aten.sqrt.default, var))
        else:  # var_mean: (var, mean), read through getitem
            outs = (var, mean if keepdim else add(aten.mean.dim, x, dims, False))
            for user in list(node.users):
                user.replace_all_uses_with(outs[user.args[1]])
                graph.erase_node(user)
        graph.erase_node(node)
        changed = True
    return _finish(gm, changed)


def _insert_before(anchor: torch.fx.Node, target, *args) -> torch.fx.Node:
    """A new node `target(*args)` before `anchor`, in its module, with its value computed."""
    with anchor.graph.inserting_before(anchor):
        new = anchor.graph.call_function(target, args)
    new.meta.update(
        {k: v for k, v in anchor.meta.items() if k in ("nn_module_stack", "stack_trace")}
    )
    new.meta["val"] = target(*torch.fx.node.map_arg(args, lambda n: n.meta["val"]))
    return new


def _is_param(node, ndim: int) -> bool:
    """An `ndim`-D parameter."""
    return (
        isinstance(node, torch.fx.Node)
        and is_parameter(node)
        and isinstance(node.meta.get("val"), torch.Tensor)
        and node.meta["val"].dim() == ndim
    )


def _transposed_param(node, ndim: int) -> torch.fx.Node | None:
    """W when `node` swaps the last two dims of an `ndim`-D parameter W (W.T, W.transpose(-2, -1))."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function" or not node.args:
        return None
    w = node.args[0]
    if not _is_param(w, ndim):
        return None
    packet = getattr(node.target, "overloadpacket", None)
    last_two = [ndim - 2, ndim - 1]
    if packet in (aten.t, aten.numpy_T) and ndim == 2:
        return w
    if packet is aten.transpose and sorted(a % ndim for a in node.args[1:3]) == last_two:
        return w
    if packet is aten.permute and [a % ndim for a in node.args[1]] == [
        *range(ndim - 2),
        *last_two[::-1],
    ]:
        return w
    return None


def linear_from_matmul(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Rewrite `x @ W.T` (matmul/mm with a transposed 2-D parameter) as `linear(x, W)`.

    Models that skip nn.Linear (Falcon's `hidden @ self.weight.T`) then get the same
    column/row choices as any linear layer.
    """
    changed = False
    for node in list(gm.graph.nodes):
        packet = getattr(node.target, "overloadpacket", None)
        if packet not in (aten.matmul, aten.mm) or len(node.args) != 2 or node.kwargs:
            continue
        weight = _transposed_param(node.args[1], 2)
        if weight is not None:
            node.target = aten.linear.default
            node.args = (node.args[0], weight)
            changed = True
    return _finish(gm, changed)


def expert_linear_from_grouped_mm(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Rewrite grouped expert products with the weight as an argument, so the experts get
    column/row choices like any linear layer: HF's `grouped_mm_fallback(x, W.transpose(-2, -1),
    offsets)` (Mixtral, Qwen-MoE: W [experts, out, in]) as `expert_linear(x, W, offsets)`,
    `grouped_mm_fallback(x, W, offsets)` (GPT-OSS: W [experts, in, out]) as `expert_matmul`, and
    `torch._grouped_mm(x, W.to(dtype).transpose(-2, -1), offs=offsets)` (torchtitan) as
    `grouped_linear(x, W, offsets, dtype)`."""

    changed = False
    for node in list(gm.graph.nodes):
        packet = getattr(node.target, "overloadpacket", None)
        name = getattr(packet, "__name__", "")
        if name == "grouped_mm_fallback" and len(node.args) == 3:
            weight = _transposed_param(node.args[1], 3)
            if weight is not None:
                node.target = expert_linear
                node.args = (node.args[0], weight, node.args[2])
                changed = True
            elif _is_param(node.args[1], 3):  # the weight stored [E, in, out]
                node.target = expert_matmul
                changed = True
        elif packet is aten._grouped_mm and (
            len(node.args) == 3 or len(node.args) == 2 and set(node.kwargs) == {"offs"}
        ):
            offsets = node.args[2] if len(node.args) == 3 else node.kwargs["offs"]
            source, dtype = node.args[1], None
            transposed = (
                source.args[0] if isinstance(source, torch.fx.Node) and source.args else None
            )
            if _is_cast(transposed):  # W.bfloat16().transpose(-2, -1): the cast moves inside
                dtype = transposed.kwargs.get("dtype", transposed.args[-1])
                inner = transposed.args[0]
                with gm.graph.inserting_before(source):
                    source = gm.graph.call_function(source.target, (inner, *source.args[1:]))
                source.meta["val"] = inner.meta["val"].transpose(-2, -1)
                changed = True
            weight = _transposed_param(source, 3)
            if weight is not None:
                node.target = grouped_linear
                node.args = (node.args[0], weight, offsets, dtype)
                node.kwargs = {}
                changed = True
    return _finish(gm, changed)


def _is_cast(node) -> bool:
    """A dtype-only copy (`W.bfloat16()`), the one op allowed between an expert weight and its
    transpose."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return False
    if node.target is aten._to_copy.default:  # _to_copy(W, dtype=...)
        return set(node.kwargs) == {"dtype"} and len(node.args) == 1
    # to(W, dtype)
    return node.target is aten.to.dtype and len(node.args) == 2 and not node.kwargs


def split_bias(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Rewrite `linear(x, W, b)` and `addmm(b, x, W)` as a bias-free product plus `add(., b)`.

    A row-parallel product is a Partial sum; its bias must be added once, after the reduction,
    which a separate add node gets for free from the placement rules.
    """
    graph, changed = gm.graph, False
    for node in list(graph.nodes):
        packet = getattr(node.target, "overloadpacket", None)
        if packet is aten.linear and len(node.args) > 2 and node.args[2] is not None:
            bias = node.args[2]
            node.args = node.args[:2]
        elif packet is aten.addmm and not node.kwargs:
            bias = node.args[0]
            node.target = aten.mm.default
            node.args = (node.args[1], node.args[2])
        else:
            continue
        with graph.inserting_after(node):
            add = graph.call_function(aten.add.Tensor, (node, bias))
        node.replace_all_uses_with(add, delete_user_cb=lambda user: user is not add)
        add.meta = {
            k: v for k, v in node.meta.items() if k in ("val", "nn_module_stack", "stack_trace")
        }
        set_split_bias(node, bias)
        changed = True
    return _finish(gm, changed)


_VIEWS = {aten.view, aten._unsafe_view, aten.reshape}


def bias_after_view(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Rewrite `view(add(x @ W, b), [batch, seq, out])` (GPT-2's Conv1D on flattened tokens) as
    `add(view(x @ W, ...), b)`: the same values, and a row-parallel product is then reduced
    where it has its sequence dim, so sequence parallelism can reduce-scatter it."""
    graph, changed = gm.graph, False
    for add in list(graph.nodes):
        if add.target is not aten.add.Tensor or len(add.users) != 1:
            continue
        product, bias = add.args[0], add.args[1]
        if not isinstance(product, torch.fx.Node) or split_bias_of(product) is not bias:
            continue
        view = next(iter(add.users))
        if getattr(view.target, "overloadpacket", None) not in _VIEWS or view.args[0] is not add:
            continue
        shape, out = add.meta.get("val"), view.meta.get("val")
        if shape is None or out is None or out.dim() < 1 or shape.shape[-1] != out.shape[-1]:
            continue  # the bias broadcasts over the last dim only where it stays whole
        with graph.inserting_before(view):
            moved = graph.call_function(view.target, (product, *view.args[1:]), view.kwargs)
            added = graph.call_function(aten.add.Tensor, (moved, bias))
        moved.meta = dict(view.meta)
        added.meta = dict(view.meta)
        view.replace_all_uses_with(added)
        graph.erase_node(view)
        graph.erase_node(add)
        changed = True
    return _finish(gm, changed)


def repeat_kv_heads(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Rewrite `sdpa(q, k, v, enable_gqa=True)` (torchtitan's GQA) as sdpa over k and v with each
    KV head repeated for its query heads, as HF's `repeat_kv`: the query heads then split across
    tp whether or not the KV heads do (replicated KV heads are sliced per rank)."""
    graph, changed = gm.graph, False
    for node in list(graph.nodes):
        if node.target is not aten.scaled_dot_product_attention.default:
            continue
        if not node.kwargs.get("enable_gqa"):
            continue
        changed = True
        q, k, v = node.args[:3]
        groups = q.meta["val"].shape[-3] // k.meta["val"].shape[-3]
        args = list(node.args)
        if groups != 1:
            for i in (1, 2):
                with graph.inserting_before(node):
                    repeated = graph.call_function(
                        aten.repeat_interleave.self_int, (args[i], groups, -3)
                    )
                repeated.meta["val"] = aten.repeat_interleave.self_int(
                    args[i].meta["val"], groups, -3
                )
                repeated.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
                args[i] = repeated
        node.args = tuple(args)
        node.kwargs = {k: v for k, v in node.kwargs.items() if k != "enable_gqa"}
    return _finish(gm, changed)


def retarget_device(gm: torch.fx.GraphModule, device: torch.device) -> torch.fx.GraphModule:
    """Replace the meta device baked in at capture (arange(..., device=meta)) by the run-time device."""
    meta = torch.device("meta")
    device = torch.device(device)
    if device == meta:
        return gm  # planned on meta (`nxd-autoshard plan`): nothing to swap

    def swap(value):
        if isinstance(value, torch.device) and value == meta:
            return device
        if isinstance(value, (list, tuple)):
            return type(value)(swap(v) for v in value)
        return value

    for node in gm.graph.nodes:
        node.args = swap(node.args)
        node.kwargs = {k: swap(v) for k, v in node.kwargs.items()}
    gm.recompile()
    return gm
