"""Propagation pass: a placement for every value of the captured graph, from parameter seeds.

Parameter seeds come from the plan as styles (`column`, `row`, `vocab_parallel`,
`replicate`); in auto mode a linear without a style becomes `column` when its input is
replicated and `row` when its input is sharded on the feature dim. Values whose placement
no rule can derive are gathered to Replicate with a warning naming the node and module.

Vocab padding (as NxD's ParallelEmbedding / ColumnParallelLinear pad): a vocab-parallel
embedding, and a column linear whose outputs are the vocab (the LM head, tied or not), are
sharded even when tp does not divide the vocab, over a zero-padded size; `blocks`-like, the
padded size of each such parameter is recorded in `PropagationResult.padded`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.fx

from nxd_autoshard.ir.meta import (
    index_of,
    is_parameter,
    padded_of,
    set_index,
    set_padded,
    set_placement,
    split_bias_of,
)
from nxd_autoshard.ir.ops import expert_linear, expert_matmul, grouped_linear
from nxd_autoshard.ir.opsets import CASTS, op_name, parameter_source
from nxd_autoshard.ir.placements import Partial, Placement, Replicate, Shard, padded_size
from nxd_autoshard.ir.program import CapturedProgram, module_path
from nxd_autoshard.rules import (
    Decision,
    R,
    handles_padding,
    rule_for,
    shape_of,
    tensor_inputs,
)

__all__ = ["PropagationResult", "propagate_placements", "LINEAR_OPS", "weight_role"]


aten = torch.ops.aten


LINEAR_OPS = {
    aten.linear,
    aten.addmm,
    aten.mm,
    aten.matmul,
    aten.bmm,
    expert_linear,
    expert_matmul,
    grouped_linear,
}


@dataclass
class PropagationResult:
    """Decisions of one propagation run over a program's graph."""

    decisions: dict[torch.fx.Node, Decision]
    param_placements: dict[str, Placement]
    auto_styles: dict[str, str]  # module path -> style chosen by auto
    failed_columns: dict[str, str] = field(default_factory=dict)  # module -> reason
    fallbacks: list[str] = field(default_factory=list)
    blocks: dict[str, int | tuple[int, ...]] = field(default_factory=dict)  # param -> blocks
    column_inputs: dict[str, str] = field(default_factory=dict)  # column module -> its input node
    padded: dict[str, int] = field(default_factory=dict)  # param -> padded size of its shard dim
    # column modules whose shard reached a sum/mean over the sharded dim (a norm's statistic)
    stat_columns: set[str] = field(default_factory=set)
    placements: dict[torch.fx.Node, Placement | tuple | None] = field(default_factory=dict)
    node_padded: dict[torch.fx.Node, int | None] = field(default_factory=dict)

    def write_to_nodes(self) -> None:
        """Put this run's placements and paddings back on the nodes, where partition reads
        them: a later trial propagation (another veto, another tp) overwrote them."""
        for node, placement in self.placements.items():
            set_placement(node, placement)
        for node, size in self.node_padded.items():
            set_padded(node, size)


def weight_role(
    node: torch.fx.Node,
) -> tuple[torch.fx.Node, torch.fx.Node | None, int, torch.fx.Node] | None:
    """For a linear-like node: (weight, bias, out-feature dim of the weight, activation)."""
    packet = getattr(node.target, "overloadpacket", None)
    split_off = split_bias_of(node)  # set by split_bias
    if packet is aten.linear:
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return node.args[1], bias if bias is not None else split_off, 0, node.args[0]
    if packet is aten.addmm:
        return node.args[2], node.args[0], 1, node.args[1]
    if packet in (aten.mm, aten.matmul, aten.bmm):
        # x @ W: W [in, out], or batched [..., in, out] (Llama 4's experts, bmm over [E, in, out])
        weight = node.args[1]
        ndim = len(shape_of(weight)) if isinstance(weight, torch.fx.Node) else 2
        return weight, split_off, max(ndim - 1, 0), node.args[0]
    if node.target in (expert_linear, grouped_linear):  # weight [experts, out, in]
        return node.args[1], None, 1, node.args[0]
    if node.target is expert_matmul:  # weight [experts, in, out]
        return node.args[1], None, 2, node.args[0]
    return None


def _in_dim(out_dim: int, ndim: int) -> int:
    """The in-feature dim of a weight (2-D [out, in] or [in, out]; 3-D experts [E, out, in])."""
    return ndim - 1 if out_dim == ndim - 2 else ndim - 2


def _style_placements(style: str, out_dim: int, ndim: int = 2) -> tuple[Placement, Placement]:
    """(weight placement, bias placement) of a linear style, given the weight's out-feature dim."""
    in_dim = _in_dim(out_dim, ndim)
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
    return index_of(node)


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
    veto: dict[str, str] | None = None,
    padded: dict[str, int] | None = None,
) -> PropagationResult:
    """Derive a placement for every node; styles map parameter names to plan styles.

    fixed / padded: placements and vocab paddings of parameters decided by an earlier capture.
    veto: modules whose auto split was undone: "column" (split by rows instead, when the
    input allows it) or "all" (replicated).
    """
    gm = program.gm
    veto = veto or {}
    fixed = dict(fixed or {})
    placements: dict[torch.fx.Node, Placement | tuple | None] = {}
    decisions: dict[torch.fx.Node, Decision] = {}
    param_of: dict[torch.fx.Node, str] = {}
    origins: dict[torch.fx.Node, frozenset] = {}
    auto_styles: dict[str, str] = {}
    failed: dict[str, str] = {}
    fallbacks: list[str] = []
    stat_columns: set[str] = set()
    blocks: dict[str, int | tuple[int, ...]] = {}
    chosen: dict[str, Placement] = dict(fixed)
    column_module: dict[str, str] = {}  # weight param -> module path of its column linear
    column_inputs: dict[str, str] = {}  # column module -> name of its input node
    padded = dict(padded or {})

    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        set_index(node, i)
    vocab_sizes = _vocab_sizes(program)
    seeding = _Seeding(
        program, tp, styles, auto, veto, vocab_sizes,
        chosen, placements, param_of, auto_styles, column_module, column_inputs, padded,
    )  # fmt: skip

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            name = _is_param(node, program)
            if name is not None:
                param_of[node] = name
            placements[node] = chosen.get(name, R) if name else (R if _is_tensor(node) else None)
            set_padded(node, padded.get(name))
            continue
        if node.op == "output":
            continue
        if node.op != "call_function":
            placements[node] = R
            continue
        ins = tensor_inputs(node)
        # seed linear / embedding weights from styles (or auto) on first use
        _seed_weights(node, seeding)
        pls = {n: placements[n] for n in ins}
        decision = _decide_node(node, pls, tp)
        if decision.blocks and not _mark_blocks(
            node, decision.blocks, param_of, blocks, placements, decisions
        ):
            decision = _gather_all(node, pls)
        # gathers break the column shards flowing in: remember which ones
        for n, need in decision.needs.items():
            have = pls.get(n)
            if isinstance(have, Shard) and not isinstance(need, Shard):
                for origin in origins.get(n, ()):
                    failed.setdefault(origin, f"{decision.note or 'gathered'} at {_where(node)}")
            if isinstance(have, Shard) and isinstance(need, Shard) and need != have:
                for origin in origins.get(n, ()):
                    failed.setdefault(origin, f"resharded at {_where(node)}")
        if decision.note and decision.note.startswith("no sharding rule"):
            fallbacks.append(
                f"{_where(node)}: {node.target} on "
                + ", ".join(f"{n.name}={_placed_str(pls[n], n)}" for n in ins)
            )
        decisions[node] = decision
        placements[node] = decision.out
        set_placement(node, decision.out)
        set_padded(node, decision.padded)
        if _packet(node) in (aten.sum, aten.mean) and isinstance(decision.out, Partial):
            if isinstance(pls.get(node.args[0]), Shard):
                stat_columns.update(origins.get(node.args[0], ()))
        # provenance of sharded values: which auto/plan column produced them
        if not _all_replicate(decision.out):
            src = frozenset().union(*(origins.get(n, frozenset()) for n in ins))
            role = weight_role(node) if _packet(node) in LINEAR_OPS else None
            if role is not None and role[0] in param_of and param_of[role[0]] in column_module:
                src = src | {column_module[param_of[role[0]]]}
            if src:
                origins[node] = src

    _store_params_as_used(decisions, placements, param_of, fixed, styles)
    for node, p in placements.items():
        set_placement(node, p)
    params = {param_of[n]: placements[n] for n in param_of}
    padded = {name: size for name, size in padded.items() if isinstance(chosen.get(name), Shard)}
    return PropagationResult(
        decisions,
        params,
        auto_styles,
        failed,
        fallbacks,
        {name: b for name, b in blocks.items() if b != 1},  # 1: contiguous, as unmarked
        column_inputs,
        padded,
        stat_columns,
        dict(placements),
        {node: padded_of(node) for node in gm.graph.nodes},
    )


def _decide_node(node, pls: dict, tp: int) -> Decision:
    """The rule's decision; inputs it cannot take (no rule, or padding it does not know) are gathered."""
    unpadded = (
        {}
        if handles_padding(node.target)
        else {n: R for n, p in pls.items() if isinstance(p, Shard) and padded_of(n)}
    )
    seen = {**pls, **unpadded}
    if all(isinstance(p, Replicate) or p is None for p in seen.values()):
        decision = Decision(_replicated_like(node))
    else:
        rule = rule_for(node.target)
        decision = rule(node, seen, tp) if rule else None
        partials = [n for n, p in seen.items() if isinstance(p, Partial)]
        if decision is None and rule and partials:
            # reduce the Partial inputs (the all-reduce they need anyway) and keep the shards
            reduced = {**seen, **{n: R for n in partials}}
            if all(isinstance(p, Replicate) or p is None for p in reduced.values()):
                # nothing is sharded: reducing the Partials is all it needs (no gather)
                decision = Decision(_replicated_like(node), {n: R for n in partials})
            else:
                decision = rule(node, reduced, tp)
                if decision is not None:
                    decision.needs = {**{n: R for n in partials}, **decision.needs}
        if decision is None:
            return _gather_all(node, pls)
    if unpadded:
        decision.needs = {**unpadded, **decision.needs}
        decision.note = "no sharding rule for a padded vocab dim"
    return decision


def _store_params_as_used(decisions, placements, param_of, fixed, styles) -> None:
    """A replicated parameter that every user needs as the same Shard is stored sharded, so
    forward slices nothing and backward gathers no gradient (a q/k norm weight over a sharded
    projection): each rank's slice only ever meets its own piece of the activation."""
    for node, name in param_of.items():
        if not isinstance(placements[node], Replicate) or name in fixed or name in styles:
            continue
        users = [decisions.get(u) for u in node.users]
        needs = {d.needs.get(node) for d in users if d is not None}
        if not users or None in users or len(needs) != 1:
            continue
        need = needs.pop()
        if not isinstance(need, Shard) or any(d.padded for d in users):
            continue
        placements[node] = need
        for d in users:
            del d.needs[node]


def _vocab_sizes(program: CapturedProgram) -> set[int]:
    """Row counts of embedding tables read by user token ids: the dims that may be padded."""
    sizes = set()
    for node in program.gm.graph.nodes:
        if (
            _packet(node) is aten.embedding
            and _is_param(node.args[0], program)
            and _reads_user_input(node.args[1], program)
        ):
            sizes.add(shape_of(node.args[0])[0])
    return sizes


def _packet(node):
    return getattr(node.target, "overloadpacket", node.target)


def _placed_str(placement, node) -> str:
    padded = padded_of(node) if isinstance(placement, Shard) else None
    return f"{placement}" + (f" padded to {padded}" if padded else "")


def _where(node) -> str:
    mod = module_path(node)
    return f"node '{node.name}'" + (f" in module '{mod}'" if mod else "")


def _is_tensor(node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def _gather_all(node, pls: dict) -> Decision:
    """The fallback: every input gathered to Replicate, the op run whole on every rank."""
    return Decision(
        _replicated_like(node), {n: R for n in pls}, note="no sharding rule for these placements"
    )


def _replicated_like(node):
    val = node.meta.get("val")
    if isinstance(val, (list, tuple)):
        return tuple(R for _ in val)
    return R if isinstance(val, torch.Tensor) else None


def _all_replicate(p) -> bool:
    if isinstance(p, tuple):
        return all(_all_replicate(x) for x in p)
    return p is None or isinstance(p, Replicate)


@dataclass
class _Seeding:
    """What seeding linear and embedding weights reads (the first six) and writes (the rest)."""

    program: CapturedProgram
    tp: int
    styles: dict[str, str]  # parameter name -> plan style
    auto: bool
    veto: dict[str, str]  # module -> "column" or "all"
    vocab_sizes: set[int]
    chosen: dict[str, Placement]  # parameter name -> placement
    placements: dict  # node -> placement
    param_of: dict  # placeholder node -> parameter name
    auto_styles: dict[str, str]  # module -> style auto chose
    column_module: dict[str, str]  # weight -> module of its column linear
    column_inputs: dict[str, str]  # column module -> name of its input node
    padded: dict[str, int]  # parameter name -> padded size of its shard dim


# the weights a matmul-like op takes: [out, in] or [in, out]; experts [E, out, in] (our expert
# ops) or [E, in, out] (a batched product by a 3-D parameter)
_WEIGHT_NDIMS = {
    expert_linear: (3,),
    expert_matmul: (3,),
    grouped_linear: (3,),
    aten.bmm: (3,),
    aten.matmul: (2, 3),
}


def _seed_weights(node: torch.fx.Node, s: _Seeding) -> None:
    """Give a linear's or embedding's parameters their placements the first time they are used."""
    packet = _packet(node)
    if packet is aten.embedding:
        _seed_embedding(node, s)
        return
    if packet not in LINEAR_OPS:
        return
    role = weight_role(node)
    weight, bias, out_dim, x = role
    name = s.param_of.get(weight)
    if name is None or name in s.chosen:
        return
    ndim = len(shape_of(weight))
    if ndim not in _WEIGHT_NDIMS.get(node.target, _WEIGHT_NDIMS.get(packet, (2,))):
        return
    mod = name.rsplit(".", 1)[0]
    style = s.styles.get(name)
    refused = s.veto.get(mod)
    if style is None and s.auto and refused != "all":
        px = s.placements.get(x)
        in_features = shape_of(weight)[_in_dim(out_dim, ndim)]
        out_features = shape_of(weight)[out_dim]
        vocab_head = out_features in s.vocab_sizes  # padded when tp does not divide it
        whole = isinstance(px, (Replicate, Partial))
        # a projection back into a replicated residual stream splits by rows, as Megatron's
        # output projections: split by columns, the stream itself would end up sharded
        residual = whole and in_features % s.tp == 0 and _feeds_residual(node, s.placements)
        if whole and refused is None and not residual and (out_features % s.tp == 0 or vocab_head):
            style = "column"
        elif in_features % s.tp == 0 and (
            (isinstance(px, Shard) and px.dim == x.meta["val"].dim() - 1)
            # its column split was undone: rows, the input sliced (replicated) or reduce-
            # scattered (partial), as Megatron's RowParallelLinear(input_is_parallel=False)
            or (whole and (refused == "column" or residual))
        ):
            style = "row"
        if style:
            s.auto_styles[mod] = style
    if style is None:
        style = "replicate"
    out_features = shape_of(weight)[out_dim]
    vocab_head = style == "vocab_parallel" or out_features in s.vocab_sizes
    if style == "vocab_parallel":
        style = "column"
    w_pl, b_pl = _style_placements(style, out_dim, ndim)
    pad = None
    if style == "column" and out_features % s.tp:
        if vocab_head:  # the LM head: padded like NxD's ColumnParallelLinear(pad=True)
            pad = padded_size(out_features, s.tp)
        else:
            w_pl, b_pl = R, R
    s.chosen[name] = w_pl
    s.placements[weight] = w_pl
    _mark_padded(weight, name, pad, s.padded)
    if style == "column":
        s.column_module[name] = mod
        s.column_inputs[mod] = x.name
    if bias is not None and bias in s.param_of:
        bname = s.param_of[bias]
        if bname not in s.chosen:
            s.chosen[bname] = b_pl
            s.placements[bias] = b_pl
            _mark_padded(bias, bname, pad, s.padded)


# ops between a projection and the residual add that change no layout (dropout, casts, a scale)
_PASS_THROUGH = CASTS | {"dropout", "clone", "alias"}


def _parameter_read(node) -> bool:
    """A parameter, read as it is, through views, or by rows (`bias[expert_ids]`: GPT-OSS's
    per-expert biases, gathered for each token's expert)."""
    if not isinstance(node, torch.fx.Node):
        return False
    if _packet(node) in (aten.index, aten.index_select):
        node = node.args[0]
    return parameter_source(node)[0] is not None or is_parameter(node)


def _feeds_residual(node: torch.fx.Node, placements: dict) -> bool:
    """The linear's output only reaches an add with a replicated value of its own shape."""
    current = node
    for _ in range(4):
        users = list(current.users)
        if len(users) != 1:
            return False
        user = users[0]
        if _packet(user) is aten.add and any(
            a is not current and _parameter_read(a) for a in user.args[:2]
        ):
            current = user  # the projection's own bias (split off by split_bias, or per expert)
            continue
        if _packet(user) is aten.add:
            other = [a for a in user.args[:2] if a is not current]
            return (
                len(other) == 1
                and isinstance(other[0], torch.fx.Node)
                and isinstance(placements.get(other[0]), Replicate)
                and shape_of(other[0]) == shape_of(node)
            )
        scaled = _packet(user) is aten.mul and any(isinstance(a, (int, float)) for a in user.args)
        if op_name(user) not in _PASS_THROUGH and not scaled:
            return False
        current = user
    return False


def _seed_embedding(node: torch.fx.Node, s: _Seeding) -> None:
    """An embedding table read by token ids is vocab-parallel; a vocab tp does not divide is padded."""
    weight = node.args[0]
    name = s.param_of.get(weight)
    if name is None or name in s.chosen:
        return
    mod = name.rsplit(".", 1)[0]
    style = s.styles.get(name)
    if (
        style is None
        and s.auto
        and mod not in s.veto
        and _reads_user_input(node.args[1], s.program)
    ):
        style = "vocab_parallel"
        s.auto_styles[mod] = style
    rows, width = shape_of(weight)
    placement, pad = R, None
    if style == "vocab_parallel":
        placement = Shard(0)
        pad = padded_size(rows, s.tp) if rows % s.tp else None
    elif style == "column" and width % s.tp:
        warnings.warn(
            f"nxd-autoshard: embedding '{name}' has {width} columns, which tp={s.tp} does not divide; "
            "it is replicated (only a vocab dim is padded: use 'vocab_parallel' to shard its rows)",
            stacklevel=5,
        )
    elif style == "column":
        placement = Shard(1)
    s.chosen[name] = placement
    s.placements[weight] = placement
    _mark_padded(weight, name, pad, s.padded)


def _mark_padded(param: torch.fx.Node, name: str, pad: int | None, padded: dict[str, int]) -> None:
    """Record a parameter's padded shard size (or that it has none) for the rules and the module."""
    if pad is None:
        padded.pop(name, None)
    else:
        padded[name] = pad
    set_padded(param, pad)


def _mark_blocks(split_node, count, param_of, blocks, placements, decisions) -> bool:
    """A split of a sharded dim into blocks (q|k|v: a count of equal ones, or their sizes):
    every parameter the split value's layout comes from (the weight and bias of a column
    linear, or a sharded parameter itself) must be sliced block by block. False when some of
    the layout comes from elsewhere (a user input, a replicated value sharded to fit an op, a
    batch shard through a replicated weight), which is contiguous, or when the value is also
    read in its fused layout (a gather there would see the blocks out of order).

    count 1 (a strided slice) asks the opposite: a contiguous layout. Every parameter it comes
    from is marked 1, so a split elsewhere that would block one of them refuses (and this one
    refuses if one is blocked already); contiguous sources are what it needs."""
    contiguous = count == 1
    x = split_node.args[0]
    if not contiguous and any(
        u is not split_node and _packet(u) is not _packet(split_node) for u in x.users
    ):
        return False
    marks: dict[str, object] = {}
    todo, seen = [x], set()
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in param_of:
            marks[param_of[node]] = count
            continue
        if node.op != "call_function" or (
            not contiguous and node is not x and len(node.users) != 1
        ):
            if contiguous:
                continue  # a user input: contiguous
            return False
        role = weight_role(node) if _packet(node) in LINEAR_OPS else None
        if role is not None and role[0] in param_of and isinstance(placements.get(role[0]), Shard):
            if placements[role[0]].dim != role[2]:
                if contiguous:
                    continue
                return False  # row-parallel: the output is Partial, not split by features
            for p in role[:2]:
                if p is not None and p in param_of:
                    marks[param_of[p]] = count
            continue
        decision = decisions.get(node)
        resharded = {
            n
            for n, need in (decision.needs.items() if decision is not None else ())
            if isinstance(need, Shard) and need != placements.get(n)
        }
        if not contiguous and (decision is None or resharded):
            return False  # an input resharded to fit is split contiguously
        sharded = [
            n
            for n in tensor_inputs(node)
            if isinstance(placements.get(n), Shard) and n not in resharded
        ]
        if not sharded and not contiguous:
            return False
        todo += sharded
    if any(blocks.get(name, count) != count for name in marks):
        return False  # already read in other blocks
    blocks.update(marks)
    return True
