"""The plan report behind `sharded.explain()`: parameters, collectives, blocks, stages, totals.

All numbers are read from the rewritten program itself (its collective nodes, their
placements and per-rank shapes), not from the plan, so the report cannot disagree with
what runs. Bytes are per rank and per step at the sizes of the example inputs the program
was captured with (`sizes`, e.g. s0 = batch 2, s1 = sequence 16). A collective's bytes are
those of the tensor each rank contributes, the convention of `simulate.trace_collectives`
(all_reduce: the full activation; all_gather: the local shard).

Stages: `stages` is a list with one entry per pipeline stage. Until pipeline parallelism
lands there is exactly one stage holding every block; the fields are those a stage will
keep (blocks, parameters, memory, cost).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
import torch.fx
from torch.fx.experimental import symbolic_shapes as _symbolic

from nxd_autoshard.compiler.compiled import CompiledPlan
from nxd_autoshard.compiler.partition import requires_grad_nodes
from nxd_autoshard.compiler.plan import Plan
from nxd_autoshard.compiler.propagate import LINEAR_OPS, weight_role
from nxd_autoshard.ir import ops as C
from nxd_autoshard.ir.cost import node_flops
from nxd_autoshard.ir.meta import (
    is_parameter,
    placement_of,
    recompute_of,
    sequence_sharded,
    state_name_of,
)
from nxd_autoshard.ir.opsets import parameter_source
from nxd_autoshard.ir.placements import Partial, Placement, Replicate, Shard, placement_str
from nxd_autoshard.ir.printer import (
    display_module,
    dtype_str,
    local_shape,
    node_label,
    target_name,
    value_names,
)
from nxd_autoshard.ir.program import block_of, module_path

__all__ = [
    "COMMUNICATION",
    "BlockRow",
    "CollectiveRow",
    "CommEvent",
    "ParamRow",
    "Picture",
    "Report",
    "StageReport",
    "Stages",
    "build_report",
    "explain",
]


# what each inserted op sends: (forward kind, backward kind); which tensor: see _events
COMMUNICATION = {
    "all_reduce": ("all_reduce", None),
    "all_gather": ("all_gather", None),
    "reduce_scatter": ("reduce_scatter", "all_gather"),
    "shard": (None, "all_gather"),
    "grad_all_reduce": (None, "all_reduce"),
    "all_gather_rs": ("all_gather", "reduce_scatter"),
    "vocab_parallel_cross_entropy": ("all_reduce(max), all_reduce, all_reduce", None),
}


# what the report counts as communication (the embedding's Partial is reduced by a later all_reduce)
_COLLECTIVE_FNS = set(C.COLLECTIVES) | {C.vocab_parallel_cross_entropy}


# collectives that finish the op producing their input; the others prepare their consumers' input
_REDUCING = {"all_reduce", "all_gather", "reduce_scatter"}


_BLOCK = re.compile(r"^(.*?\.\d+)(?:\.|$)")


@dataclass
class ParamRow:
    """A parameter: placement, full and per-rank shape, bytes per rank, its block."""

    name: str
    placement: str
    full_shape: list[int]
    local_shape: list[int]
    dtype: str
    bytes_per_rank: int
    block: str | None
    tied_to: str | None = None


@dataclass
class CommEvent:
    """One communication of a step: kind, phase (forward/backward), per-rank shape and bytes."""

    kind: str
    phase: str
    shape: list[int]
    bytes: int


@dataclass
class CollectiveRow:
    """An inserted collective node and what it sends forward and backward."""

    node: str
    op: str
    axis: str
    call: str
    module: str
    block: str | None
    shape: str
    forward: list[CommEvent]
    backward: list[CommEvent]
    of_parameter: bool = False  # the gradient of a replicated parameter (a q/k norm's weight)

    def bytes(self, phase: str) -> int:
        return sum(e.bytes for e in (self.forward if phase == "forward" else self.backward))


@dataclass
class BlockRow:
    """A repeated block (a transformer layer): its parameters, collectives and the optimum."""

    name: str
    params: int
    param_bytes: int
    forward: dict[str, int]
    backward: dict[str, int]
    optimum_forward: int
    optimum_backward: int
    same_as: str | None = None
    matmuls: int = 0
    sharded_matmuls: int = 0

    @property
    def partly_replicated(self) -> bool:
        """Some matmuls of the block are sharded, others run whole on every rank."""
        return 0 < self.sharded_matmuls < self.matmuls

    @property
    def replicated(self) -> bool:
        """No matmul of the block is sharded: it runs whole on every rank (no saving, no traffic)."""
        return self.matmuls > 0 and self.sharded_matmuls == 0

    @property
    def extra(self) -> int:
        """Collectives beyond the optimum (Megatron: one per row-parallel output and column input)."""
        return (
            sum(self.forward.values())
            - self.optimum_forward
            + sum(self.backward.values())
            - self.optimum_backward
        )


@dataclass
class StageReport:
    """One pipeline stage (pp = 1: the whole program): blocks, parameters, memory and cost."""

    index: int
    blocks: list[str]
    params: int
    param_bytes: int
    comm_bytes_forward: int
    comm_bytes_backward: int
    matmul_flops: int
    units: list[str] = field(default_factory=list)
    received: list[str] = field(default_factory=list)
    cost_flops: int = 0

    def _repr_html_(self) -> str:
        from nxd_autoshard.inspect.render import _stage_html

        return _stage_html([self])


class Stages(list):
    """The report's stages; shows as one table in a notebook."""

    def _repr_html_(self) -> str:
        from nxd_autoshard.inspect.render import _stage_html

        return _stage_html(list(self))


@dataclass
class Report:
    """What `sharded.explain()` returns; prints as rich tables, shows as HTML in a notebook."""

    model: str
    tp: int
    pp: int
    sequence_parallel: bool
    program: int
    programs: int
    mode: str
    inputs: list[str]
    sizes: dict[str, int]
    parameters: list[ParamRow]
    collectives: list[CollectiveRow]
    blocks: list[BlockRow]
    stages: list[StageReport]
    totals: dict[str, Any] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    precision: str = "fp32"  # compute dtype; parameters and gradients stay fp32 masters
    reduce_dtype: str | None = None  # "fp32": tp partial sums made and reduced in fp32
    recomputed: list[str] = field(default_factory=list)  # activation-checkpointed regions
    # sequence parallelism: the modules whose ops run on Shard(seq), layer indices as `*`
    sequence_regions: list[str] = field(default_factory=list)
    sequence_ops: int = 0

    _svg = property(lambda self: _view(self, "svg"))
    _before_after = property(lambda self: _view(self, "before_after"))

    def to_dict(self) -> dict:
        """The report as plain data (what `explain(format="json")` returns)."""
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def events(self) -> list[CommEvent]:
        """Every communication of one step, forward then backward, in program order."""
        return [e for c in self.collectives for e in c.forward + c.backward]

    def to_text(self, *, width: int = 140, full: bool = False) -> str:
        from nxd_autoshard.inspect.render import render_text

        return render_text(self, width=width, full=full)

    def to_html(self, *, full: bool = False, graph: bool = True) -> str:
        from nxd_autoshard.inspect.render import render_html

        return render_html(self, full=full, graph=graph)

    def svg(self) -> Picture:
        """The rewritten program as an SVG picture (shows itself in a notebook)."""
        return Picture(getattr(self, "_svg", ""), "svg")

    def before_after(self) -> Picture:
        """The first block as captured and as rewritten, side by side (HTML)."""
        from nxd_autoshard.inspect.render import _STYLE

        body = getattr(self, "_before_after", "")
        return Picture(f"{_STYLE}<div class='nxd-report'>{body}</div>", "html")

    def __rich_console__(self, console, options):
        from nxd_autoshard.inspect.render import rich_renderables

        yield from rich_renderables(self, full=False)

    def __str__(self) -> str:
        return self.to_text()

    def __repr__(self) -> str:
        return self.to_text()

    def _repr_html_(self) -> str:
        return self.to_html()


class Picture:
    """An SVG or HTML view for notebooks (`_repr_svg_` / `_repr_html_`); `str()` is the markup."""

    def __init__(self, markup: str, kind: str):
        self.markup, self.kind = markup, kind

    def __str__(self) -> str:
        return self.markup

    def _repr_svg_(self) -> str | None:
        return self.markup if self.kind == "svg" else None

    def _repr_html_(self) -> str | None:
        return self.markup if self.kind == "html" else None


def explain(compiled: CompiledPlan, format: str | None = None, *, program: int = 0):
    """Report of a compiled plan (`sharded.compiled`): a Report, or its "text", "html" or
    "json" form."""
    report = build_report(compiled, program=program)
    if format is None:
        return report
    if format == "json":
        return report.to_dict()
    if format == "text":
        return report.to_text()
    if format == "html":
        return report.to_html(full=True)
    raise ValueError(f"explain(format={format!r}): use None (a Report), 'text', 'html' or 'json'")


def concrete(size) -> int:
    """An int for a size: itself, or a dynamic size's value at the example inputs. A
    data-dependent size (tokens routed to one expert, from `.tolist()`) has no example value:
    it counts as 0, and the report says so."""
    if isinstance(size, int):
        return size
    node = size.node
    hint = getattr(node, "hint", None)
    if hint is not None:
        return int(hint)
    if hasattr(_symbolic, "optimization_hint"):  # torch 2.13; size_hint is deprecated there
        return int(_symbolic.optimization_hint(size, fallback=0))
    hint = node.shape_env.size_hint(node.expr, allow_none=True)
    return 0 if hint is None else int(hint)


def _local(node: torch.fx.Node, tp: int) -> tuple[list, torch.dtype]:
    val = node.meta.get("val")
    return local_shape(val, placement_of(node), tp), val.dtype


def _event(kind: str, phase: str, shape: list, itemsize: int) -> CommEvent:
    ints = [concrete(s) for s in shape]
    return CommEvent(kind, phase, ints, math.prod(ints) * itemsize)


def _events(node: torch.fx.Node, tp: int, grad: set) -> tuple[list[CommEvent], list[CommEvent]]:
    """What a collective node sends, in the shapes the simulator's tracer records.

    A backward communication happens only when a gradient reaches the node: `grad` holds the
    values that carry one (partition's own analysis).
    """
    name = target_name(node.target)
    if name == "vocab_parallel_cross_entropy":
        target = node.args[1]
        shape, _ = _local(target, tp)
        # the three reductions (max, sum of exp, target logit) are fp32, one value per token
        kinds = ("all_reduce(max)", "all_reduce", "all_reduce")
        return [_event(k, "forward", shape, 4) for k in kinds], []
    if node.target in C.REDUCTIONS:
        return _reduction_events(node, tp, grad)
    source = node.args[0]
    in_shape, dtype = _local(source, tp)
    out_shape, _ = _local(node, tp)
    size = torch.empty((), dtype=dtype).element_size()
    fwd, bwd = COMMUNICATION[name]
    bwd = bwd if source in grad else None
    forward = [_event(fwd, "forward", in_shape, size)] if fwd else []
    # backward sends the gradient of the output: the local chunk for the gather kinds, the
    # whole gathered value's for a reduce-scatter (all_gather_rs)
    on_output = bwd in ("all_gather", "reduce_scatter")
    backward = [_event(bwd, "backward", out_shape if on_output else in_shape, size)] if bwd else []
    return forward, backward


def _reduction_events(node: torch.fx.Node, tp: int, grad: set):
    """A sharded reduction's all-reduces (`ops.REDUCTION_ALL_REDUCES`), each of the local result
    with the reduced dims kept; the backward ones where a gradient reaches the input."""
    source = node.args[0]
    shape, dtype = _local(source, tp)
    dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
    shape = [1 if d in dims else s for d, s in enumerate(shape)]
    forward, backward = [], []
    for reduce, phase, payload in C.reduction_all_reduces(node.target, node.args):
        if payload == "index":
            size = 8  # int64
        else:
            of = dtype if payload == "input" else node.meta["val"].dtype
            size = torch.empty((), dtype=of).element_size()
        kind = "all_reduce" if reduce == "sum" else f"all_reduce({reduce})"
        if phase == "forward":
            forward.append(_event(kind, phase, shape, size))
        elif source in grad:
            backward.append(_event(kind, phase, shape, size))
    return forward, backward


def _serves(node: torch.fx.Node) -> str:
    """The module a collective works for: the producer it completes, or the consumers it feeds."""
    name = target_name(node.target)
    if name in _REDUCING:
        return display_module(node.args[0])
    if name == "vocab_parallel_cross_entropy":
        return display_module(node)
    users = sorted({display_module(u) for u in node.users})
    if not users:
        return display_module(node)
    prefix = users[0].split(".")
    for other in users[1:]:
        parts = other.split(".")
        n = 0
        while n < min(len(prefix), len(parts)) and prefix[n] == parts[n]:
            n += 1
        prefix = prefix[:n]
    return ".".join(prefix) if len(users) == 1 or prefix else ", ".join(users)


def collective_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The nodes of a program that communicate (the collectives partition inserted)."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _COLLECTIVE_FNS]


def _collective_rows(gm, tp: int, names, grad: set) -> list[CollectiveRow]:
    rows = []
    for node in collective_nodes(gm):
        forward, backward = _events(node, tp, grad)
        module = _serves(node)
        source = node.args[0]
        shape, _ = _local(source, tp)
        rows.append(
            CollectiveRow(
                node=names.value(node),
                op=target_name(node.target),
                axis=str(node.args[-1]),
                call=node_label(node, names),
                module=module,
                block=block_of(module),
                shape="["
                + ", ".join(
                    names.sym(s.node.expr) if isinstance(s, torch.SymInt) else str(s) for s in shape
                )
                + "]",
                forward=forward,
                backward=backward,
                of_parameter=parameter_source(source)[0] is not None,
            )
        )
    return rows


def _param_rows(compiled: CompiledPlan) -> list[ParamRow]:
    rows = []
    for name, info in compiled.parameters.items():
        local = list(compiled.local_shape(name))
        rows.append(
            ParamRow(
                name=name,
                placement=placement_str(compiled.placements.get(name)),
                full_shape=list(info.shape),
                local_shape=local,
                dtype=dtype_str(info.dtype),
                bytes_per_rank=math.prod(local) * info.dtype.itemsize,
                block=block_of(name),
                tied_to=info.tied_to,
            )
        )
    return rows


class _Matmul(NamedTuple):
    """A matmul with a parameter: the weight's placement, its out dim, the activation it
    multiplies, and the module the weight belongs to."""

    placement: Placement
    out_dim: int
    activation: torch.fx.Node
    module: str | None


def _weight_and_activation(node: torch.fx.Node) -> _Matmul | None:
    """The matmul's weight and activation if it multiplies by a parameter; None for one between
    activations (attention's q @ k.T), which no plan splits by rows or columns."""
    if getattr(node.target, "overloadpacket", node.target) not in LINEAR_OPS:
        return None
    role = weight_role(node)
    if role is None or not isinstance(role[0], torch.fx.Node):
        return None
    weight, _, out_dim, act = role
    source, _ = parameter_source(weight)
    if source is None:
        return None
    while isinstance(act, torch.fx.Node) and act.target in _COLLECTIVE_FNS:
        act = act.args[0]
    name = state_name_of(source)
    return _Matmul(placement_of(weight), out_dim, act, name.rsplit(".", 1)[0] if name else None)


def _reduces_a_sharded_dim(node: torch.fx.Node) -> bool:
    """A sum or mean whose sharded input gives a Partial result (its statistic is all-reduced)."""
    packet = getattr(node.target, "overloadpacket", None)
    if packet not in (torch.ops.aten.sum, torch.ops.aten.mean) or not node.args:
        return False
    source = node.args[0]
    return isinstance(placement_of(node), Partial) and isinstance(placement_of(source), Shard)


def _optimum(
    nodes: list[torch.fx.Node],
    sequence_parallel: bool = False,
    row_fallbacks: frozenset[str] = frozenset(),
) -> tuple[int, int, int, int]:
    """Megatron's count for a block: an all-reduce per row-parallel output forward and per
    distinct column-parallel input backward (2 + 2 for attention + MLP), plus one each way per
    reduction over a sharded dim (a q/k RMSNorm over the whole projection width all-reduces its
    statistic, a [batch, seq, 1] tensor), plus one gradient gather backward per slice of a
    replicated KV projection; then the block's matmuls with a weight, and how many of them are
    sharded. With sequence parallelism each all-reduce is a reduce-scatter plus an all-gather,
    the same bytes: a reduce-scatter per row-parallel output and an all-gather per
    column-parallel input forward, and their conjugates backward (4 + 4). A module split by
    rows only because its column split was undone (`row_fallbacks`) counts as the column
    Megatron makes it: the optimum is Megatron's, not this plan's."""
    rows, column_inputs, matmuls, sharded = 0, set(), 0, 0
    for node in nodes:
        if _reduces_a_sharded_dim(node):
            rows += 1
            column_inputs.add(node)
        found = _weight_and_activation(node)
        if found is None:
            continue
        placement = found.placement
        matmuls += 1
        sharded += isinstance(placement, Shard)
        if isinstance(placement, Shard) and (
            placement.dim == found.out_dim or found.module in row_fallbacks
        ):
            column_inputs.add(found.activation)
        elif isinstance(placement, Shard):
            rows += 1
    slices = sum(1 for node in nodes if node.target is C.shard and _replicated_projection(node))
    if sequence_parallel:
        both = rows + len(column_inputs)
        return both, both + slices, matmuls, sharded
    return rows, len(column_inputs) + slices, matmuls, sharded


def _replicated_projection(shard: torch.fx.Node) -> bool:
    """A slice of a replicated projection's output within the block (KV heads fewer than tp:
    the KV projection is replicated and each rank slices its heads, whose gradient is gathered
    backward, as NxD's KV replication does)."""
    block = block_of(module_path(shard))
    todo, seen = [shard.args[0]], set()
    while todo:
        node = todo.pop()
        if node in seen or not isinstance(node, torch.fx.Node) or node.op != "call_function":
            continue
        seen.add(node)
        if node.target in _COLLECTIVE_FNS or block_of(module_path(node)) != block:
            continue
        found = _weight_and_activation(node)
        if found is not None:
            if isinstance(found.placement, Replicate):
                return True
            continue
        todo.extend(a for a in node.all_input_nodes if not is_parameter(a))
    return False


def _signature(block: str, nodes: list[torch.fx.Node], tp: int) -> tuple:
    """What makes two blocks identical: ops, placements, shapes, and where their inputs come from."""
    # collectives are compared through the rows of the block they serve (see _block_rows):
    # a grad all-reduce for layer 1 sits after layer 0's last op in the graph
    nodes = [n for n in nodes if n.target not in _COLLECTIVE_FNS]
    index = {n: i for i, n in enumerate(nodes)}
    out = []
    for node in nodes:
        refs = []
        for arg in node.all_input_nodes:
            if arg in index:
                refs.append(index[arg])
            elif arg.op == "placeholder":
                refs.append(
                    str((state_name_of(arg) or arg.name)).replace(block + ".", "<block>.", 1)
                )
            else:
                refs.append("outside")
        val = node.meta.get("val")
        shape = (
            str(local_shape(val, placement_of(node), tp)) if isinstance(val, torch.Tensor) else ""
        )
        out.append(
            (
                target_name(node.target),
                placement_str(placement_of(node)),
                shape,
                tuple(refs),
                display_module(node).replace(block, "<block>", 1),
            )
        )
    return tuple(out)


def _flops(node: torch.fx.Node, tp: int) -> int:
    """Matmul FLOPs of a node on one rank (the FLOP model of `ir.cost` on local shapes)."""

    def local(n: torch.fx.Node) -> list[int]:
        if not isinstance(n.meta.get("val"), torch.Tensor):
            return []
        return [concrete(s) for s in _local(n, tp)[0]]

    return node_flops(node, local, matmuls_only=True)


def build_report(compiled: CompiledPlan, *, program: int = 0) -> Report:
    """Read the plan report off one captured program of a compiled plan."""
    entry = compiled.program(program, "explain()")
    prog = entry.program
    gm, tp = prog.gm, compiled.tp
    names = value_names(gm)
    sizes = _sizes(gm, names)  # first: it numbers the dynamic sizes in graph order, as goldens do
    params = _param_rows(compiled)
    collectives = _collective_rows(gm, tp, names, requires_grad_nodes(gm, prog))

    by_block: dict[str, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function":
            block = block_of(display_module(node))
            if block is not None:
                by_block.setdefault(block, []).append(node)
    sp = compiled.settings.sequence_parallel
    blocks = _block_rows(
        by_block, params, collectives, tp, sp, frozenset(compiled.plan.row_fallbacks)
    )
    if entry.stages:
        stages = _stage_rows(compiled.plan, gm, entry.stages, params, collectives, tp)
    else:
        stages = [
            StageReport(
                index=0,
                blocks=[b.name for b in blocks],
                params=sum(1 for p in params if p.tied_to is None),
                param_bytes=sum(p.bytes_per_rank for p in params if p.tied_to is None),
                comm_bytes_forward=sum(c.bytes("forward") for c in collectives),
                comm_bytes_backward=sum(c.bytes("backward") for c in collectives),
                matmul_flops=sum(_flops(n, tp) for n in gm.graph.nodes if n.op == "call_function"),
            )
        ]
    report = Report(
        model=compiled.model_name,
        tp=tp,
        pp=compiled.pp,
        sequence_parallel=sp,
        sequence_regions=_sequence_regions(gm),
        sequence_ops=sum(1 for n in gm.graph.nodes if sequence_sharded(n)),
        precision=compiled.settings.precision,
        reduce_dtype=compiled.settings.reduce_dtype,
        recomputed=sorted({recompute_of(n) for n in gm.graph.nodes if recompute_of(n)}),
        program=program,
        programs=len(compiled.programs),
        mode="train" if prog.training else "eval",
        inputs=list(prog.user_input_names),
        sizes=sizes,
        parameters=params,
        collectives=collectives,
        blocks=blocks,
        stages=Stages(stages),
        history=[{k: v for k, v in r.items()} for r in _history_rows(prog)],
    )
    report.totals = _totals(report)
    _attach_views(report, prog)
    return report


def _stage_rows(
    plan: Plan,
    gm,
    stage_programs,
    params: list[ParamRow],
    collectives: list[CollectiveRow],
    tp: int,
) -> list[StageReport]:
    """One row per pipeline stage: what it holds, receives, sends over tp, and costs."""
    fx_name = {row.node: node.name for row, node in zip(collectives, collective_nodes(gm))}
    by_name = {p.name: p for p in params}
    cost = {}
    for c, st in zip(plan.unit_costs, plan.stage_of_unit or []):
        cost[st] = cost.get(st, 0) + c.flops
    rows = []
    for stage in stage_programs:
        here = {n.name for n in stage.gm.graph.nodes}
        mine = [c for c in collectives if fx_name[c.node] in here]
        held = [by_name[n] for n in stage.state_names if n in by_name]
        rows.append(
            StageReport(
                index=stage.index,
                blocks=list(stage.blocks),
                params=len(held),
                param_bytes=sum(p.bytes_per_rank for p in held),
                comm_bytes_forward=sum(c.bytes("forward") for c in mine),
                comm_bytes_backward=sum(c.bytes("backward") for c in mine),
                matmul_flops=sum(
                    _flops(n, tp) for n in stage.gm.graph.nodes if n.op == "call_function"
                ),
                units=list(stage.units),
                received=list(stage.inputs),
                cost_flops=cost.get(stage.index, 0),
            )
        )
    return rows


def _attach_views(report: Report, prog) -> None:
    """The program the HTML views (SVG picture, first block before/after) are drawn from:
    drawn when first shown, not with the data (they print the program twice)."""
    report._views_of = prog
    report._views = {}


def _view(report: Report, key: str) -> str:
    """One HTML view of the report, drawn once."""
    from nxd_autoshard.inspect.graph_view import before_after_html, graph_svg
    from nxd_autoshard.inspect.history import History

    views = report.__dict__.setdefault("_views", {})
    prog = report.__dict__.get("_views_of")
    if key in views or prog is None:
        return views.get(key, "")
    if key == "svg":
        views[key] = graph_svg(report, prog.gm)
    else:
        history = History(prog.history)
        first = report.blocks[0].name if report.blocks else None
        names = {r.name for r in history}
        views[key] = (
            before_after_html(history, first)
            if first and "partition" in names and names & {"split_bias", "propagate"}
            else ""
        )
    return views[key]


def _sizes(gm, names) -> dict[str, int]:
    """{s0: 2, s1: 16}: each dynamic size the printer names, at the example inputs."""
    out = {}
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        vals = val if isinstance(val, (list, tuple)) else [val]
        for v in vals:
            dims = (
                list(v.shape)
                if isinstance(v, torch.Tensor)
                else [v]
                if isinstance(v, torch.SymInt)
                else []
            )
            for d in dims:
                if (
                    isinstance(d, torch.SymInt)
                    and len(d.node.expr.free_symbols) == 1
                    and d.node.expr.is_Symbol
                ):
                    alias = names.sym(d.node.expr)
                    out.setdefault(alias, concrete(d))
    return dict(sorted(out.items(), key=lambda kv: int(kv[0][1:])))


def _history_rows(prog) -> list[dict]:
    from nxd_autoshard.inspect.history import History

    return History(prog.history).rows()


def _sequence_regions(gm: torch.fx.GraphModule) -> list[str]:
    """The modules whose ops run on a sequence shard, identical blocks as one `*` pattern."""
    found = {}
    for node in gm.graph.nodes:
        if sequence_sharded(node):
            found.setdefault(re.sub(r"\.\d+(?=\.|$)", ".*", display_module(node)), None)
    return list(found)


def _block_rows(
    by_block, params, collectives, tp, sequence_parallel=False, row_fallbacks=frozenset()
) -> list[BlockRow]:
    rows = []
    seen: dict[tuple, str] = {}
    for name, nodes in by_block.items():
        mine = [p for p in params if p.block == name and p.tied_to is None]
        fwd, bwd = Counter(), Counter()
        for c in collectives:
            if c.block == name:
                fwd.update(e.kind for e in c.forward)
                bwd.update(e.kind for e in c.backward)
        opt_f, opt_b, matmuls, sharded = _optimum(nodes, sequence_parallel, row_fallbacks)
        # a replicated parameter read by every rank's own heads (a per-head q/k norm's weight)
        # needs its gradient summed over tp: Megatron all-reduces those too
        opt_b += sum(1 for c in collectives if c.block == name and c.of_parameter)
        served = tuple(
            (
                c.op,
                c.module.replace(name, "<block>", 1),
                c.shape,
                tuple((e.kind, e.phase, tuple(e.shape)) for e in c.forward + c.backward),
            )
            for c in collectives
            if c.block == name
        )
        sig = (_signature(name, nodes, tp), served)
        rows.append(
            BlockRow(
                name,
                len(mine),
                sum(p.bytes_per_rank for p in mine),
                dict(fwd),
                dict(bwd),
                opt_f,
                opt_b,
                seen.get(sig),
                matmuls,
                sharded,
            )
        )
        seen.setdefault(sig, name)
    return rows


def _totals(report: Report) -> dict:
    fwd = Counter(e.kind for e in report.events() if e.phase == "forward")
    bwd = Counter(e.kind for e in report.events() if e.phase == "backward")
    unique = [p for p in report.parameters if p.tied_to is None]
    per_block = [(sum(b.forward.values()), sum(b.backward.values())) for b in report.blocks]
    outside = [c for c in report.collectives if c.block is None]
    return {
        "parameters": len(unique),
        "param_bytes_per_rank": sum(p.bytes_per_rank for p in unique),
        "param_bytes_full": sum(
            math.prod(p.full_shape) * (p.bytes_per_rank // max(1, math.prod(p.local_shape)))
            for p in unique
        ),
        "collective_nodes": len(report.collectives),
        "forward": dict(fwd),
        "backward": dict(bwd),
        "bytes_forward": sum(c.bytes("forward") for c in report.collectives),
        "bytes_backward": sum(c.bytes("backward") for c in report.collectives),
        "blocks": len(report.blocks),
        "block_collectives": [list(x) for x in sorted(set(per_block))],
        "block_optimum": [
            list(x)
            for x in sorted({(b.optimum_forward, b.optimum_backward) for b in report.blocks})
        ],
        "extra_over_optimum": sum(b.extra for b in report.blocks),
        "replicated_blocks": sum(b.replicated for b in report.blocks),
        "partly_replicated_blocks": sum(b.partly_replicated for b in report.blocks),
        "replicated_block_matmuls": sum(b.matmuls - b.sharded_matmuls for b in report.blocks),
        "outside_blocks": len(outside),
        "stage_imbalance": _imbalance([s.cost_flops or s.matmul_flops for s in report.stages]),
    }


def _imbalance(costs: list[int]) -> float:
    """Largest stage cost over the mean (1.0: perfectly balanced)."""
    return max(costs) / (sum(costs) / len(costs)) if costs and sum(costs) else 1.0
