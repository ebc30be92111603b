"""Propagation pass: a placement for every value of the captured graph, from parameter seeds.

Parameter seeds come from the plan as styles (`column`, `row`, `vocab_parallel`,
`replicate`); in auto mode a linear without a style becomes `column` when its input is
replicated and `row` when its input is sharded on the feature dim. Values whose placement
no rule can derive are gathered to Replicate with a warning naming the node and module.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.fx

from .capture import CapturedProgram, module_path
from .placements import Partial, Placement, Replicate, Shard
from .rules import Decision, R, rule_for, shape_of, tensor_inputs

__all__ = ["PropagationResult", "propagate_placements", "LINEAR_OPS", "weight_role"]

aten = torch.ops.aten
LINEAR_OPS = {aten.linear, aten.addmm, aten.mm, aten.matmul}


@dataclass
class PropagationResult:
    """Decisions of one propagation run over a program's graph."""

    decisions: dict[torch.fx.Node, Decision]
    param_placements: dict[str, Placement]
    auto_styles: dict[str, str]  # module path -> style chosen by auto
    failed_columns: dict[str, str] = field(default_factory=dict)  # module -> reason
    fallbacks: list[str] = field(default_factory=list)
    blocks: dict[str, int] = field(default_factory=dict)  # param -> equal blocks of its shard dim
    column_inputs: dict[str, str] = field(default_factory=dict)  # column module -> its input node


def weight_role(node: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node | None, int, torch.fx.Node] | None:
    """For a linear-like node: (weight, bias, out-feature dim of the weight, activation)."""
    packet = getattr(node.target, "overloadpacket", None)
    split_off = node.meta.get("nxd_bias")  # set by split_bias
    if packet is aten.linear:
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return node.args[1], bias if bias is not None else split_off, 0, node.args[0]
    if packet is aten.addmm:
        return node.args[2], node.args[0], 1, node.args[1]
    if packet in (aten.mm, aten.matmul):
        return node.args[1], split_off, 1, node.args[0]
    return None


def _style_placements(style: str, out_dim: int) -> tuple[Placement, Placement]:
    """(weight placement, bias placement) of a linear style, given the weight's out-feature dim."""
    in_dim = 1 - out_dim
    if style == "column":
        return Shard(out_dim), Shard(0)
    if style == "row":
        return Shard(in_dim), R
    return R, R


def _is_param(node, program: CapturedProgram) -> str | None:
    if node.op != "placeholder":
        return None
    index = _placeholder_index(node)
    if index < program.num_state and program.state_kinds[index] == "parameter":
        return program.state_names[index]
    return None


def _placeholder_index(node) -> int:
    return node.meta["nxd_index"]


def _reads_user_input(node, program: CapturedProgram) -> bool:
    """An index tensor that is a user input (token ids), possibly through views."""
    while node.op == "call_function" and len(tensor_inputs(node)) == 1:
        node = tensor_inputs(node)[0]
    return node.op == "placeholder" and _placeholder_index(node) >= program.num_state


def propagate_placements(
    program: CapturedProgram,
    tp: int,
    *,
    styles: dict[str, str],
    fixed: dict[str, Placement] | None = None,
    auto: bool = True,
    veto: set[str] = frozenset(),
) -> PropagationResult:
    """Derive a placement for every node; styles map parameter names to plan styles."""
    gm = program.gm
    fixed = dict(fixed or {})
    placements: dict[torch.fx.Node, Placement | tuple | None] = {}
    decisions: dict[torch.fx.Node, Decision] = {}
    param_of: dict[torch.fx.Node, str] = {}
    origins: dict[torch.fx.Node, frozenset] = {}
    auto_styles: dict[str, str] = {}
    failed: dict[str, str] = {}
    fallbacks: list[str] = []
    blocks: dict[str, int] = {}
    chosen: dict[str, Placement] = dict(fixed)
    column_module: dict[str, str] = {}  # weight param -> module path of its column linear
    column_inputs: dict[str, str] = {}  # column module -> name of its input node

    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        node.meta["nxd_index"] = i

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            name = _is_param(node, program)
            if name is not None:
                param_of[node] = name
            placements[node] = chosen.get(name, R) if name else (R if _is_tensor(node) else None)
            continue
        if node.op == "output":
            continue
        if node.op != "call_function":
            placements[node] = R
            continue
        ins = tensor_inputs(node)
        # seed linear / embedding weights from styles (or auto) on first use
        _seed_weights(node, program, tp, styles, auto, veto, chosen, placements, param_of,
                      auto_styles, column_module, column_inputs)
        pls = {n: placements[n] for n in ins}
        if all(isinstance(p, Replicate) or p is None for p in pls.values()):
            decision = Decision(_replicated_like(node))
        else:
            rule = rule_for(node.target)
            decision = rule(node, pls, tp) if rule else None
            if decision is None:
                decision = Decision(_replicated_like(node), {n: R for n in ins},
                                    note="no sharding rule for these placements")
        # gathers break the column shards flowing in: remember which ones
        for n, need in decision.needs.items():
            have = pls.get(n)
            if isinstance(have, Shard) and not isinstance(need, Shard):
                for origin in origins.get(n, ()):
                    failed.setdefault(origin, decision.note or f"gathered at {_where(node)}")
            if isinstance(have, Shard) and isinstance(need, Shard) and need != have:
                for origin in origins.get(n, ()):
                    failed.setdefault(origin, f"resharded at {_where(node)}")
        if decision.note and decision.note.startswith("no sharding rule"):
            fallbacks.append(f"{_where(node)}: {node.target} on "
                             + ", ".join(f"{n.name}={pls[n]}" for n in ins))
        if decision.note and decision.note.startswith("blocks="):
            _mark_blocks(node, int(decision.note.split("=")[1]), param_of, blocks)
        decisions[node] = decision
        placements[node] = decision.out
        node.meta["nxd_placement"] = decision.out
        # provenance of sharded values: which auto/plan column produced them
        if not _all_replicate(decision.out):
            src = frozenset().union(*(origins.get(n, frozenset()) for n in ins))
            role = weight_role(node) if _packet(node) in LINEAR_OPS else None
            if role is not None and role[0] in param_of and param_of[role[0]] in column_module:
                src = src | {column_module[param_of[role[0]]]}
            if src:
                origins[node] = src

    for node, p in placements.items():
        node.meta["nxd_placement"] = p
    params = {param_of[n]: placements[n] for n in param_of}
    return PropagationResult(decisions, params, auto_styles, failed, fallbacks, blocks, column_inputs)


def _packet(node):
    return getattr(node.target, "overloadpacket", node.target)


def _where(node) -> str:
    mod = module_path(node)
    return f"node '{node.name}'" + (f" in module '{mod}'" if mod else "")


def _is_tensor(node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def _replicated_like(node):
    val = node.meta.get("val")
    if isinstance(val, (list, tuple)):
        return tuple(R for _ in val)
    return R if isinstance(val, torch.Tensor) else None


def _all_replicate(p) -> bool:
    if isinstance(p, tuple):
        return all(_all_replicate(x) for x in p)
    return p is None or isinstance(p, Replicate)


def _seed_weights(node, program, tp, styles, auto, veto, chosen, placements, param_of,
                  auto_styles, column_module, column_inputs):
    """Give a linear's or embedding's parameters their placements the first time they are used."""
    packet = _packet(node)
    if packet is aten.embedding:
        weight = node.args[0]
        name = param_of.get(weight)
        if name is None or name in chosen:
            return
        mod = name.rsplit(".", 1)[0]
        style = styles.get(name)
        if style is None and auto and mod not in veto:
            vocab = shape_of(weight)[0]
            if _reads_user_input(node.args[1], program) and vocab % tp == 0:
                style = "vocab_parallel"
                auto_styles[mod] = style
        placement = {"vocab_parallel": Shard(0), "column": Shard(1)}.get(style, R)
        if isinstance(placement, Shard) and shape_of(weight)[placement.dim] % tp:
            warnings.warn(
                f"nxd-autoshard: '{name}' has {shape_of(weight)[placement.dim]} rows, which tp={tp} "
                "does not divide; it is replicated (vocab padding is not implemented yet)",
                stacklevel=4,
            )
            placement = R
        chosen[name] = placement
        placements[weight] = placement
        return
    if packet not in LINEAR_OPS:
        return
    role = weight_role(node)
    weight, bias, out_dim, x = role
    name = param_of.get(weight)
    if name is None or name in chosen:
        return
    if len(shape_of(weight)) != 2:
        return
    mod = name.rsplit(".", 1)[0]
    style = styles.get(name)
    if style is None and auto and mod not in veto:
        px = placements.get(x)
        in_features = shape_of(weight)[1 - out_dim]
        out_features = shape_of(weight)[out_dim]
        if isinstance(px, (Replicate, Partial)) and out_features % tp == 0:
            style = "column"
        elif isinstance(px, Shard) and px.dim == x.meta["val"].dim() - 1 and in_features % tp == 0:
            style = "row"
        if style:
            auto_styles[mod] = style
    if style is None:
        style = "replicate"
    if style == "vocab_parallel":
        style = "column"
    w_pl, b_pl = _style_placements(style, out_dim)
    if style == "column" and shape_of(weight)[out_dim] % tp:
        w_pl, b_pl = R, R
    chosen[name] = w_pl
    placements[weight] = w_pl
    if style == "column":
        column_module[name] = mod
        column_inputs[mod] = x.name
    if bias is not None and bias in param_of:
        bname = param_of[bias]
        if bname not in chosen:
            chosen[bname] = b_pl
            placements[bias] = b_pl


def _mark_blocks(split_node, count, param_of, blocks):
    """An equal split of a column-sharded dim: the weight must be sliced block by block."""
    node = split_node.args[0]
    while node.op == "call_function":
        role = weight_role(node) if _packet(node) in LINEAR_OPS else None
        if role is not None:
            weight, bias = role[0], role[1]
            for p in (weight, bias):
                if p is not None and p in param_of:
                    blocks[param_of[p]] = count
            return
        sharded = [n for n in tensor_inputs(node) if isinstance(n.meta.get("nxd_placement"), Shard)]
        if not sharded:
            return
        node = sharded[0]
