"""Activation checkpointing of the local program: which nodes are recomputed in backward.

The pass only marks nodes (`ir.meta.set_recompute`, a region name such as
`model.layers.0[1]`); the runtime outlines each region into a call under
`torch.utils.checkpoint` (`runtime/recompute.py`), so the program the report and the
goldens read stays flat.

Regions are cut at every collective that communicates in its forward (all_reduce,
all_gather, reduce_scatter, the vocab-parallel loss): their outputs are kept instead of
recomputed, so the recompute issues no collective. Megatron's full recompute re-runs the
block's forward all-reduces instead; keeping them costs one more activation per cut.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx

from nxd_autoshard.ir import ops
from nxd_autoshard.ir.errors import PlanError
from nxd_autoshard.ir.meta import set_recompute
from nxd_autoshard.ir.program import _normalize_module_path, block_of, module_path

__all__ = ["MODES", "check_found", "checkpoint_mode", "mark_recompute", "recompute_regions"]

MODES = ("full", "selective")

# forward communication: the recompute must not issue these again
_COMMUNICATES = {
    ops.all_reduce,
    ops.all_gather,
    ops.all_gather_rs,
    ops.reduce_scatter,
    ops.vocab_parallel_cross_entropy,
    *ops.REDUCTIONS,
}

# ops whose backward keeps no activation: a region of only these saves nothing by being
# recomputed, and checkpointing it would keep its inputs alive instead (e.g. a lone residual add)
_FREE = {
    "view",
    "_unsafe_view",
    "reshape",
    "transpose",
    "permute",
    "expand",
    "slice",
    "select",
    "unsqueeze",
    "squeeze",
    "contiguous",
    "clone",
    "alias",
    "detach",
    "to",
    "_to_copy",
    "add",
    "sub",
    "neg",
    "cat",
    "split",
    "split_with_sizes",
    "chunk",
    "getitem",
    "sym_size",
    "grad_all_reduce",
    "shard",
}

_ATTENTION = ("scaled_dot_product_attention", "_scaled_dot_product")
_MATMUL = {"matmul", "bmm", "einsum", "baddbmm"}
_SOFTMAX = {"softmax", "_softmax", "_safe_softmax"}


def checkpoint_mode(spec) -> str | tuple[str, ...] | None:
    """Check `autoshard(activation_checkpointing=...)`: None/False, "full", "selective", or module
    classes (as their qualified names)."""
    if spec is None or spec is False:
        return None
    if isinstance(spec, str):
        if spec not in MODES:
            raise ValueError(
                f"activation_checkpointing={spec!r}: use 'full' (each repeated block), "
                "'selective' (the attention core) or a list of module classes"
            )
        return spec
    if isinstance(spec, type):
        spec = [spec]
    if isinstance(spec, Sequence) and spec and all(isinstance(c, type) for c in spec):
        return tuple(f"{c.__module__}.{c.__qualname__}" for c in spec)
    raise TypeError(
        "activation_checkpointing must be 'full', 'selective' or a list of nn.Module classes "
        f"(e.g. [LlamaDecoderLayer]); got {spec!r}"
    )


def _op_name(node: torch.fx.Node) -> str:
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    name = getattr(packet or target, "__name__", "") or ""
    return name


def _class_key(node: torch.fx.Node, classes: tuple[str, ...]) -> str | None:
    """The outermost module of one of `classes` that `node` ran in (nested matches merge)."""
    for path, kind in (node.meta.get("nn_module_stack") or {}).values():
        name = kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"
        if name in classes:
            return _normalize_module_path(path)
    return None


def _attention_keys(nodes: list[torch.fx.Node]) -> dict[torch.fx.Node, str]:
    """The attention core of every block: an sdpa call, or eager matmul -> softmax -> matmul."""
    index = {n: i for i, n in enumerate(nodes)}
    keys: dict[torch.fx.Node, str] = {}
    for node in nodes:
        name = _op_name(node)
        where = module_path(node)
        if name.startswith(_ATTENTION):
            keys[node] = f"{where}.attention"
            for user in node.users:  # the getitems of a tuple-returning sdpa overload
                if _op_name(user) == "getitem":
                    keys[user] = keys[node]
        elif name in _SOFTMAX:
            first = _walk(node, back=True)
            last = _walk(node, back=False)
            if first is None or last is None:
                continue
            for n in nodes[index[first] : index[last] + 1]:
                if n.target not in _COMMUNICATES:
                    keys[n] = f"{where}.attention"
    return keys


def _walk(node: torch.fx.Node, *, back: bool, limit: int = 8) -> torch.fx.Node | None:
    """The matmul feeding a softmax (scores) or reading it (probabilities x values)."""
    for _ in range(limit):
        if back:
            inputs = [a for a in node.args if isinstance(a, torch.fx.Node)]
            nxt = inputs[0] if inputs else None
        else:
            users = list(node.users)
            nxt = users[0] if len(users) == 1 else None
        if nxt is None or nxt.op != "call_function":
            return None
        if _op_name(nxt) in _MATMUL:
            return nxt
        node = nxt
    return None


def recompute_regions(gm: torch.fx.GraphModule, mode) -> dict[str, list[torch.fx.Node]]:
    """Region name -> its nodes (contiguous in graph order, no communicating collective inside)."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    if mode == "selective":
        key_of = _attention_keys(nodes)
    elif mode == "full":
        key_of = {n: block_of(module_path(n)) for n in nodes}
    else:
        key_of = {n: _class_key(n, mode) for n in nodes}
    regions: dict[str, list[torch.fx.Node]] = {}
    run: list[torch.fx.Node] = []
    run_key = None
    count: dict[str, int] = {}

    def close():
        nonlocal run
        if run and any(_op_name(n) not in _FREE for n in run):
            k = count.get(run_key, 0)
            count[run_key] = k + 1
            regions[f"{run_key}[{k}]"] = run
        run = []

    for node in nodes:
        key = key_of.get(node)
        if key is None or node.target in _COMMUNICATES or key != run_key:
            close()
        run_key = key
        if key is not None and node.target not in _COMMUNICATES:
            run.append(node)
    close()
    return regions


def mark_recompute(gm: torch.fx.GraphModule, mode) -> int:
    """Mark the nodes of each region with its name; returns how many regions were found."""
    for node in gm.graph.nodes:
        set_recompute(node, None)
    regions = recompute_regions(gm, mode)
    for name, nodes in regions.items():
        for node in nodes:
            set_recompute(node, name)
    return len(regions)


def check_found(found: int, mode, model_name: str) -> None:
    """A checkpointing request that matched nothing is an error, never a silent no-op."""
    if found:
        return
    if mode == "full":
        what = "no repeated blocks (children of a ModuleList of layers)"
        fix = "name the module classes to recompute: activation_checkpointing=[MyBlock]"
    elif mode == "selective":
        what = "no attention core (scaled_dot_product_attention, or matmul -> softmax -> matmul)"
        fix = "use activation_checkpointing='full' or a list of module classes"
    else:
        what = f"no module of the classes {', '.join(mode)}"
        fix = "pass classes of modules the model runs in its forward"
    raise PlanError(f"activation_checkpointing: {model_name} has {what}; {fix}")
