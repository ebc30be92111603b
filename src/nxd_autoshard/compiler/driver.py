"""The compiler's one driver: capture a call, then run the ordered pass list over the program,
recording each pass's name, time, op-count change and printed program in the history.

    sharded.history.diff("split_bias", "partition")
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from nxd_autoshard.compiler.capture import _default_kwargs, capture
from nxd_autoshard.compiler.normalize import (
    bias_after_view,
    decompose_variance,
    drop_assertions,
    expert_linear_from_grouped_mm,
    linear_from_matmul,
    repeat_kv_heads,
    retarget_device,
    split_bias,
)
from nxd_autoshard.compiler.partition import partition
from nxd_autoshard.compiler.plan import CompileSettings, Plan, decide_placements
from nxd_autoshard.compiler.precision import DTYPES, cast_state
from nxd_autoshard.compiler.propagate import PropagationResult
from nxd_autoshard.compiler.recompute import check_found, mark_recompute
from nxd_autoshard.compiler.sequence import sequence_parallel
from nxd_autoshard.compiler.split import split_stages
from nxd_autoshard.compiler.stamp import capture_stamped
from nxd_autoshard.ir import ops
from nxd_autoshard.ir.opsets import CASTS, COPIES, RESHAPES, SLICES, op_name
from nxd_autoshard.ir.printer import graph_text
from nxd_autoshard.ir.program import CapturedProgram, StageProgram

__all__ = [
    "PASSES",
    "LocalProgram",
    "Pass",
    "PassRecord",
    "compile_call",
    "count_ops",
    "on_pass",
    "pass_names",
]

_LISTENERS: list[Callable[[PassRecord], None]] = []


class _Snapshot:
    """What the printer reads of some graphs at one moment (each node's op, target, arguments
    and metadata), kept so the text is printed only when asked: passes change graphs in place,
    and printing every pass's program of a 70B model costs more than the passes."""

    __slots__ = ("graphs", "text")

    def __init__(self, gms: list[torch.fx.GraphModule]):
        self.graphs = [
            (
                dict(gm.meta),
                [(n, n.op, n.target, n.args, n.kwargs, dict(n.meta)) for n in gm.graph.nodes],
            )
            for gm in gms
        ]
        self.text: str | None = None

    def printed(self) -> str:
        if self.text is None:
            gms = [_rebuilt(meta, nodes) for meta, nodes in self.graphs]
            self.text = (
                graph_text(gms[0])
                if len(gms) == 1
                else "\n".join(f"# stage {i}\n{graph_text(g)}" for i, g in enumerate(gms))
            )
            self.graphs = []
        return self.text


class _Printable:
    """Enough of a GraphModule for the printer: a graph and the module's metadata."""

    def __init__(self, graph: torch.fx.Graph, meta: dict):
        self.graph, self.meta = graph, meta


def _rebuilt(meta: dict, nodes: list) -> _Printable:
    """A graph equal, for printing, to the one a snapshot was taken of."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node, op, target, args, kwargs, node_meta in nodes:
        args, kwargs = torch.fx.node.map_arg((args, kwargs), lambda a: env[a])
        env[node] = graph.create_node(op, target, args, kwargs, node.name)
        env[node].meta = node_meta
    return _Printable(graph, meta)


class PassRecord:
    """One pass: its name, op counts before and after, wall seconds, and the program after it
    (`text`, printed when first read)."""

    __slots__ = ("name", "ops_before", "ops_after", "seconds", "_text")

    def __init__(self, name: str, ops_before: int, ops_after: int, seconds: float, text):
        self.name, self.ops_before, self.ops_after, self.seconds = (
            name,
            ops_before,
            ops_after,
            seconds,
        )
        self._text = text

    @property
    def text(self) -> str:
        return self._text if isinstance(self._text, str) else self._text.printed()

    def __repr__(self) -> str:
        return (
            f"PassRecord(name={self.name!r}, ops_before={self.ops_before}, "
            f"ops_after={self.ops_after}, seconds={self.seconds:.4f})"
        )


@dataclass
class LocalProgram:
    """One captured and partitioned program (per call signature and train/eval mode)."""

    program: CapturedProgram
    result: PropagationResult
    kwarg_order: list[str]
    stages: list[StageProgram] | None = None
    runtime: Any = None  # the torch pipelining schedule of this rank, built at the first train_step


@dataclass
class CompileContext:
    """What the passes of one call read and write besides the program itself."""

    settings: CompileSettings
    plan: Plan
    model: torch.nn.Module  # the model's meta shadow (split reads its module tree)
    result: PropagationResult | None = None
    stages: list[StageProgram] | None = None


@dataclass(frozen=True)
class Pass:
    """A named step `run(program, ctx) -> program`; `applies(ctx)` says whether it runs."""

    name: str
    run: Callable[[CapturedProgram, CompileContext], CapturedProgram]
    applies: Callable[[CompileContext], bool] = lambda ctx: True


def _on_graph(fn: Callable[[torch.fx.GraphModule], torch.fx.GraphModule]) -> Pass:
    """A graph-to-graph pass (normalize.py) as a step over the program."""

    def run(program: CapturedProgram, ctx: CompileContext) -> CapturedProgram:
        program.gm = fn(program.gm)
        return program

    return Pass(fn.__name__, run)


def _propagate(program: CapturedProgram, ctx: CompileContext) -> CapturedProgram:
    """A placement for every value (the first capture also decides the plan)."""
    ctx.result = decide_placements(program, ctx.settings, ctx.plan)
    return program


def _sequence_parallel(program: CapturedProgram, ctx: CompileContext) -> CapturedProgram:
    """Replicated regions (norms, residual adds) on Shard(seq) (with sequence_parallel=)."""
    sequence_parallel(program, ctx.result, ctx.settings.tp)
    return program


def _partition(program: CapturedProgram, ctx: CompileContext) -> CapturedProgram:
    """The one local program every tp rank runs, with collectives."""
    program = partition(program, ctx.result, ctx.settings.tp)
    program.token_inputs = _token_inputs(program)
    return program


# ops that move or copy ids without changing them: a token input is found through them
_ID_PATH = RESHAPES | COPIES | CASTS | SLICES


def _token_inputs(program: CapturedProgram) -> list[tuple[int, int, int | None]]:
    """The user inputs that vocab-parallel ops read as token ids, with vocab and ignore index."""
    user = {
        n: i - program.num_state
        for i, n in enumerate(n for n in program.gm.graph.nodes if n.op == "placeholder")
    }
    found = []
    for node in program.gm.graph.nodes:
        if node.target is ops.vocab_parallel_embedding:
            ids, vocab, ignore = node.args[1], node.args[3], None
        elif node.target is ops.vocab_parallel_cross_entropy:
            ids, vocab, ignore = node.args[1], node.args[4], node.args[3]
        else:
            continue
        while op_name(ids) in _ID_PATH:
            ids = ids.args[0]
        if isinstance(ids, torch.fx.Node) and user.get(ids, -1) >= 0:
            found.append((user[ids], int(vocab), ignore))
    return found


def _retarget(program: CapturedProgram, ctx: CompileContext) -> CapturedProgram:
    """The run-time device in place of the capture's meta device."""
    program.gm = retarget_device(program.gm, ctx.settings.device)
    return program


def _split(program: CapturedProgram, ctx: CompileContext) -> CapturedProgram:
    """Pipeline stages (with pp > 1)."""
    ctx.stages = split_stages(program, ctx.model, ctx.settings, ctx.plan)
    return program


def _programs(
    program: CapturedProgram, ctx: CompileContext
) -> list[tuple[torch.fx.GraphModule, int]]:
    """Every graph a runtime runs, with its count of state inputs: the program and its stages."""
    return [(program.gm, program.num_state)] + [
        (st.gm, len(st.state_names)) for st in ctx.stages or []
    ]


def _precision(program: CapturedProgram, ctx: CompileContext) -> CapturedProgram:
    """fp32 master weights cast to the compute dtype where first used (with precision=)."""
    for gm, n_state in _programs(program, ctx):
        cast_state(gm, n_state, DTYPES[ctx.settings.precision])
    return program


def _recompute(program: CapturedProgram, ctx: CompileContext) -> CapturedProgram:
    """Regions recomputed in backward, cut at communicating collectives (with activation_checkpointing=)."""
    mode = ctx.settings.recompute
    check_found(mark_recompute(program.gm, mode), mode, ctx.settings.model_name)
    for st in ctx.stages or []:
        mark_recompute(st.gm, mode)
    return program


# the passes after capture, in order: the only list (plan_meta's progress bar and the README read it)
PASSES: tuple[Pass, ...] = (
    _on_graph(drop_assertions),
    _on_graph(decompose_variance),
    _on_graph(linear_from_matmul),
    _on_graph(expert_linear_from_grouped_mm),
    _on_graph(split_bias),
    _on_graph(repeat_kv_heads),
    Pass(
        "bias_after_view",
        _on_graph(bias_after_view).run,
        lambda ctx: ctx.settings.sequence_parallel,
    ),
    Pass("propagate", _propagate),
    Pass("sequence_parallel", _sequence_parallel, lambda ctx: ctx.settings.sequence_parallel),
    Pass("partition", _partition),
    Pass("retarget_device", _retarget),
    Pass("split", _split, lambda ctx: ctx.settings.n_stages > 1),
    Pass("precision", _precision, lambda ctx: ctx.settings.precision != "fp32"),
    Pass("recompute", _recompute, lambda ctx: ctx.settings.recompute is not None),
)


def pass_names(n_stages: int = 1, **options) -> list[str]:
    """Names of the passes a call goes through, capture first (`options`: CompileSettings fields)."""
    settings = CompileSettings(1, {}, False, "", {}, n_stages=n_stages, **options)
    probe = CompileContext(settings, Plan(), None)
    return ["capture"] + [p.name for p in PASSES if p.applies(probe)]


def count_ops(gm: torch.fx.GraphModule) -> int:
    """Number of operations (call_function nodes) of a graph."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function")


def _record(
    history: list, name: str, gms: list[torch.fx.GraphModule], ops_before: int, started: float
) -> None:
    seconds = time.perf_counter() - started  # the pass itself, not the snapshot
    record = PassRecord(name, ops_before, sum(count_ops(g) for g in gms), seconds, _Snapshot(gms))
    history.append(record)
    for listener in _LISTENERS:
        listener(record)


@contextlib.contextmanager
def on_pass(callback: Callable[[PassRecord], None]) -> Iterator[None]:
    """Call `callback(record)` after every pass run inside the block (progress bars use it)."""
    _LISTENERS.append(callback)
    try:
        yield
    finally:
        _LISTENERS.remove(callback)


def compile_call(
    model: torch.nn.Module,
    args: tuple,
    kwargs: dict,
    *,
    training: bool,
    settings: CompileSettings,
    plan: Plan,
) -> LocalProgram:
    """Capture one call of `model` (its meta shadow) and run every pass; fills `plan` the first time."""
    started = time.perf_counter()
    # stage programs are static per microbatch shape: values crossing a cut must be tensors
    # identical blocks are traced once or twice and stamped out (compiler.stamp)
    program = capture_stamped(
        model,
        lambda m: capture(
            m,
            args,
            kwargs,
            training=training,
            device=settings.device,
            dynamic=settings.n_stages == 1,
        ),
    )
    _record(program.history, "capture", [program.gm], 0, started)
    ctx = CompileContext(settings, plan, model)
    for step in PASSES:
        if not step.applies(ctx):
            continue
        gms = [st.gm for st in ctx.stages] if ctx.stages else [program.gm]
        before, started = sum(count_ops(g) for g in gms), time.perf_counter()
        program = step.run(program, ctx)
        gms = [st.gm for st in ctx.stages] if ctx.stages else [program.gm]
        _record(program.history, step.name, gms, before, started)
    kwarg_order = list(_default_kwargs(model, dict(kwargs)).keys())
    return LocalProgram(program, ctx.result, kwarg_order, ctx.stages)
