"""Run pipeline stages: on `torch.distributed.pipelining` schedules, or all in one process (simulator)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from nxd_autoshard.ir.errors import PlanError
from nxd_autoshard.ir.program import StageProgram, split_written
from nxd_autoshard.runtime.base import read_state, store_written
from nxd_autoshard.runtime.collectives import axis_groups
from nxd_autoshard.runtime.simulator import simulate_graph

__all__ = [
    "PipelineConfig",
    "SCHEDULES",
    "check_schedule",
    "StageModule",
    "build_schedule",
    "chunk_batch",
    "merge_chunk_outputs",
    "simulate_stages",
    "stage_ranks",
    "unpack_last_outputs",
]


@dataclass
class PipelineConfig:
    """Pipeline settings: stages = pp x virtual, microbatches per step, torch schedule name, cuts."""

    pp: int = 1
    dp: int = 1
    microbatches: int = 1
    schedule: str = "1f1b"
    virtual: int = 1
    cuts: list[str] | None = None
    balance: str = "flops"

    @property
    def n_stages(self) -> int:
        return self.pp * self.virtual


# name -> (torch schedule class, stages per pp rank)
SCHEDULES = {
    "gpipe": ("ScheduleGPipe", 1),
    "1f1b": ("Schedule1F1B", 1),
    "interleaved": ("ScheduleInterleaved1F1B", 2),
    "looped_bfs": ("ScheduleLoopedBFS", 2),
    "zero_bubble": ("ScheduleInterleavedZeroBubble", 2),
    "zbv": ("ScheduleZBVZeroBubble", 2),
}


V_SHAPED = {"zbv"}  # stage s and 2·pp-1-s share a rank


def check_schedule(schedule: str, pp: int, microbatches: int) -> int:
    """Stages per pp rank for `schedule`; a clear error (before any communication) when it cannot run."""
    if schedule not in SCHEDULES:
        raise ValueError(
            f"unknown pipeline schedule '{schedule}': use one of {', '.join(SCHEDULES)}"
        )
    if not isinstance(microbatches, int) or microbatches < 1:
        raise ValueError(f"microbatches must be a positive integer, got {microbatches!r}")
    if schedule == "1f1b" and microbatches < pp:
        raise ValueError(
            f"schedule '1f1b' needs at least as many microbatches as stages: "
            f"microbatches={microbatches} < pp={pp}; use microbatches >= {pp} or 'gpipe'"
        )
    if schedule in ("interleaved", "looped_bfs", "zero_bubble"):
        rounds = max(1, microbatches // pp)
        if microbatches % rounds:
            raise ValueError(
                f"schedule '{schedule}' with pp={pp} needs microbatches that are a multiple "
                f"of {rounds} (microbatches // pp); got {microbatches}, use "
                f"{rounds * (microbatches // rounds)} or {pp * rounds}"
            )
    return SCHEDULES[schedule][1]


def stage_ranks(pp: int, virtual: int, schedule: str = "1f1b") -> list[int]:
    """The pp rank of each stage: s % pp (loop placement), or a V (0..pp-1, pp-1..0) for V schedules."""
    if schedule in V_SHAPED:
        return [s if s < pp else 2 * pp - 1 - s for s in range(pp * virtual)]
    return [s % pp for s in range(pp * virtual)]


def stage_io_must_be_float() -> bool:
    """Whether torch's `PipelineStage` makes every received value require grad and get a gradient.

    torch 2.9 does (ids, labels and masks between stages fail); later torch sends each value's
    dtype and requires_grad with it, which shows as `tensor_meta` on its receive descriptor.
    """
    from torch.distributed.pipelining import stage as torch_stage

    recv_info = getattr(torch_stage, "_RecvInfo", None)
    if recv_info is None:
        return True  # unknown torch: the float transport works everywhere
    return "tensor_meta" not in inspect.signature(recv_info.__init__).parameters


def _needs_float_transport(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex)


def _zero_tie(inputs) -> torch.Tensor | None:
    """An exact 0 that depends on every received input, so each gets a (zero) gradient."""
    # an empty slice's sum is 0 whatever the values (a -inf mask times 0 would be nan)
    ties = [
        x.reshape(-1)[:0].sum() for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad
    ]
    return sum(ties[1:], ties[0]) if ties else None


def _attach(
    root: torch.nn.Module,
    fqn: str,
    value: torch.Tensor,
    *,
    parameter: bool,
    persistent: bool = True,
):
    *path, leaf = fqn.split(".")
    mod = root
    for part in path:
        child = mod._modules.get(part)
        if child is None and hasattr(mod, part):
            raise ValueError(
                f"the model's '{fqn}' cannot keep its name: '{part}' is already an attribute of "
                f"{type(mod).__name__}; rename that submodule of the model (or report it to us)"
            )
        if child is None:
            child = torch.nn.Module()
            mod.add_module(part, child)
        mod = child
    if parameter:
        mod.register_parameter(leaf, value)
    else:
        mod.register_buffer(leaf, value, persistent=persistent)


class StageModule(torch.nn.Module):
    """One stage's program with the parameters it reads, as `PipelineStage` expects a module.

    `float_io` (default: what this torch needs): integer and bool values travel between stages
    as float64 (exact below 2**53) and every received value feeds the outputs through an exact
    zero, because torch 2.9's stage wants a gradient for each received value. `run` runs the
    stage's graph instead of the graph itself (its compiled form, under autoshard's compile=).
    """

    def __init__(
        self,
        stage: StageProgram,
        state: dict[str, torch.Tensor],
        params: set[str],
        tp_group,
        *,
        float_io: bool | None = None,
        run: Callable | None = None,
    ):
        super().__init__()
        self.stage = stage
        self.tp_group = tp_group
        self._run = run  # a plain callable (a GraphModule here would become a submodule)
        for name in stage.state_names:
            _attach(self, name, state[name], parameter=name in params)
        self._params = params
        self.float_io = stage_io_must_be_float() if float_io is None else float_io
        placeholders = [n for n in stage.gm.graph.nodes if n.op == "placeholder"]
        self._input_vals = [n.meta.get("val") for n in placeholders[len(stage.state_names) :]]
        self.dry_run = False  # set while torch's PipelineStage infers shapes (see build_schedule)

    def _store(self, out) -> tuple:
        return tuple(store_written(self.get_buffer, self.stage.mutated, out))

    def forward(self, *inputs):
        state = [
            self.get_parameter(n)
            if n in self._params
            else read_state(n, self.get_buffer(n), self.stage.mutated)
            for n in self.stage.state_names
        ]
        tie = None
        if self.float_io and self.stage.index > 0:
            tie = _zero_tie(inputs)
            inputs = tuple(
                x.to(v.dtype)
                if isinstance(v, torch.Tensor) and _needs_float_transport(v.dtype)
                else x
                for x, v in zip(inputs, self._input_vals)
            )
        with axis_groups({"tp": self.tp_group}):
            out = (self._run or self.stage.gm)(*state, *inputs)
        # the stage that holds a buffer writes it; a metadata run of the schedule (its inputs
        # are uninitialised) writes nothing
        out = split_written(self.stage.mutated, out)[1] if self.dry_run else self._store(out)
        # the schedule concatenates microbatch outputs on dim 0: a scalar loss travels as shape (1,)
        out = tuple(
            o.unsqueeze(0) if isinstance(o, torch.Tensor) and o.dim() == 0 else o for o in out
        )
        return self._to_float_transport(out, tie) if self.float_io else out

    def _to_float_transport(self, out: tuple, tie: torch.Tensor | None) -> tuple:
        """Outputs as torch 2.9's stage can send them: floats, each tied to every received input."""
        encoded = []
        for o in out:
            if (
                isinstance(o, torch.Tensor)
                and _needs_float_transport(o.dtype)
                and not self.stage.is_last
            ):
                o = o.to(torch.float64)
            if isinstance(o, torch.Tensor) and o.dtype.is_floating_point and tie is not None:
                o = o + tie
            encoded.append(o)
        return tuple(encoded)


def unpack_last_outputs(outputs: tuple, stage: StageProgram) -> list:
    """Undo StageModule's (1,)-shaped scalars for the loss function."""
    results = stage.gm.graph.output_node().args[0]
    vals = (
        [n.meta.get("val") for n in split_written(stage.mutated, results)[1]]
        if isinstance(results, (list, tuple))
        else []
    )
    return (
        [
            o.squeeze(0) if isinstance(v, torch.Tensor) and v.dim() == 0 else o
            for o, v in zip(outputs, vals)
        ]
        if vals
        else list(outputs)
    )


def build_schedule(
    modules: list[StageModule],
    stage_indices: list[int],
    n_stages: int,
    pp_group,
    device: torch.device,
    microbatches: int,
    schedule: str,
    loss_fn: Callable,
):
    """A `torch.distributed.pipelining` schedule over this rank's stages (gradients unscaled)."""
    import torch.distributed.pipelining as pipelining

    stages = [
        _dry_metadata_runs(
            _gloo_safe_warmup(pipelining.PipelineStage(m, i, n_stages, device, group=pp_group)), m
        )
        for m, i in zip(modules, stage_indices)
    ]
    cls = getattr(pipelining, SCHEDULES[schedule][0])
    # the loss is divided by the microbatch count in loss_fn, so grads are scaled exactly once
    # even when one parameter sits in two local stages (tied embeddings under interleaving)
    if SCHEDULES[schedule][1] == 1:
        return cls(stages[0], microbatches, loss_fn=loss_fn, scale_grads=False)
    built = cls(stages, microbatches, loss_fn=loss_fn, scale_grads=False)
    return (
        _with_local_handoff(built, stages, microbatches, loss_fn) if schedule in V_SHAPED else built
    )


def _with_local_handoff(built, stages: list, microbatches: int, loss_fn: Callable):
    """A V-shaped schedule run by torch's action runtime, which hands values between stages on one rank.

    torch 2.9's ZB-V sends them over the process group to the rank itself, which gloo cannot
    do; later torch runs it on the runtime already and gets it back unchanged.
    """
    from torch.distributed.pipelining import schedules

    runtime = getattr(schedules, "_PipelineScheduleRuntime", None)
    if runtime is not None and isinstance(built, runtime):
        return built
    if runtime is None or not hasattr(runtime, "_prepare_schedule_with_comms"):
        raise PlanError(
            f"schedule '{type(built).__name__}' puts two stages on one rank, and torch "
            f"{torch.__version__} cannot pass values between them on gloo; use torch >= 2.13 "
            "or another schedule ('zero_bubble', 'interleaved')"
        )
    lowered = runtime(stages, microbatches, loss_fn=loss_fn, scale_grads=False)
    lowered._prepare_schedule_with_comms(built.pipeline_order)
    return lowered


def _dry_metadata_runs(stage, module: StageModule):
    """Mark the forwards torch's PipelineStage runs only to learn shapes (torch 2.13 runs the
    first microbatch an extra time, later stages on uninitialised inputs): the buffers the
    stage writes must not take the values of that run."""
    for name in ("_forward_metadata_inference", "_shape_inference"):
        infer = getattr(stage, name, None)
        if infer is None:
            continue

        def dry(*args, _infer=infer, **kwargs):
            module.dry_run = True
            try:
                return _infer(*args, **kwargs)
            finally:
                module.dry_run = False

        setattr(stage, name, dry)
    return stage


def _gloo_safe_warmup(stage):
    """Make the stage's p2p warm-up valid on gloo: matching dtypes and no sends to this rank itself."""
    # torch 2.9 sends an int64 into a float32 receive (gloo aborts the process on the size
    # mismatch) and warms up V-shaped neighbours on the same rank (gloo has no pair to itself);
    # torch 2.13 warms PipelineStage up by other means, and where dtypes match and no neighbour
    # shares the rank this changes nothing
    make_ops = getattr(stage, "_get_init_p2p_neighbors_ops", None)
    if make_ops is None:
        return stage

    def gloo_ops():
        ops = [op for op in make_ops() if op.peer != dist.get_rank()]
        for op in ops:
            if op.tensor.dtype != torch.float32:
                op.tensor = op.tensor.to(torch.float32)
        return ops

    stage._get_init_p2p_neighbors_ops = gloo_ops
    return stage


def chunk_batch(args: tuple, kwargs: dict, n: int) -> list[tuple[tuple, dict]]:
    """Split every tensor of a call on dim 0 into n equal microbatches (other values are shared)."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    sizes = {leaf.shape[0] for leaf in leaves if isinstance(leaf, torch.Tensor) and leaf.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(
            f"cannot split the batch into microbatches: tensor inputs have batch sizes "
            f"{sorted(sizes) or 'none'}; every tensor input needs the same dim 0"
        )
    size = sizes.pop()
    if size % n:
        raise ValueError(
            f"the batch of {size} cannot be split into {n} equal microbatches "
            f"(microbatches x dp = {n}); use a batch size that is a multiple of {n}"
        )
    pieces = []
    for i in range(n):
        part = [
            leaf.chunk(n, 0)[i] if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 else leaf
            for leaf in leaves
        ]
        pieces.append(pytree.tree_unflatten(part, spec))
    return pieces


def merge_chunk_outputs(chunks: list[list]) -> list:
    """Merge per-microbatch flat outputs: scalars (losses) are averaged, tensors concatenated on dim 0."""
    merged = []
    for values in zip(*chunks):
        first = values[0]
        if isinstance(first, torch.Tensor) and first.dim() == 0:
            merged.append(torch.stack(list(values)).mean())
        elif isinstance(first, torch.Tensor):
            merged.append(torch.cat(list(values), 0))
        else:
            merged.append(first)
    return merged


def simulate_stages(
    stages: list[StageProgram],
    tp: int,
    state: Callable[[str], object],
    flat_inputs: list,
    store: Callable[[list[str], list], list],
) -> list:
    """Run the stage chain for one microbatch, every tp rank in lockstep; returns the last stage's
    outputs. `store(names, outs)` writes a stage's new buffer values and returns its other outputs."""
    carried = [x for x in flat_inputs if isinstance(x, torch.Tensor)]
    for stage in stages:
        if len(carried) != len(stage.inputs):
            raise PlanError(
                f"stage {stage.index} expects {len(stage.inputs)} inputs, got {len(carried)}"
            )
        ins = [state(name) for name in stage.state_names] + carried
        carried = store(stage.mutated, list(simulate_graph(stage.gm, tp, ins)))
    return carried
