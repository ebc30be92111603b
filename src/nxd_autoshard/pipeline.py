"""Run pipeline stages: on `torch.distributed.pipelining` schedules, or all in one process (simulator)."""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils import _pytree as pytree

from .collectives import axis_groups
from .errors import PlanError
from .simulate import simulate_graph
from .split import StageProgram

__all__ = ["SCHEDULES", "check_schedule", "StageModule", "build_schedule", "chunk_batch",
           "merge_chunk_outputs", "simulate_stages", "stage_ranks", "unpack_last_outputs"]

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
        raise ValueError(f"unknown pipeline schedule '{schedule}': use one of {', '.join(SCHEDULES)}")
    if not isinstance(microbatches, int) or microbatches < 1:
        raise ValueError(f"microbatches must be a positive integer, got {microbatches!r}")
    if schedule == "1f1b" and microbatches < pp:
        raise ValueError(f"schedule '1f1b' needs at least as many microbatches as stages: "
                         f"microbatches={microbatches} < pp={pp}; use microbatches >= {pp} or 'gpipe'")
    if schedule in ("interleaved", "looped_bfs", "zero_bubble"):
        rounds = max(1, microbatches // pp)
        if microbatches % rounds:
            raise ValueError(f"schedule '{schedule}' with pp={pp} needs microbatches that are a multiple "
                             f"of {rounds} (microbatches // pp); got {microbatches}, use "
                             f"{rounds * (microbatches // rounds)} or {pp * rounds}")
    return SCHEDULES[schedule][1]


def stage_ranks(pp: int, virtual: int, schedule: str = "1f1b") -> list[int]:
    """The pp rank of each stage: s % pp (loop placement), or a V (0..pp-1, pp-1..0) for V schedules."""
    if schedule in V_SHAPED:
        return [s if s < pp else 2 * pp - 1 - s for s in range(pp * virtual)]
    return [s % pp for s in range(pp * virtual)]


class StageModule(torch.nn.Module):
    """One stage's program with the parameters it reads, as `PipelineStage` expects a module."""

    def __init__(self, stage: StageProgram, state: dict[str, torch.Tensor], params: set[str], tp_group):
        super().__init__()
        from .sharded import _attach

        self.stage = stage
        self.tp_group = tp_group
        for name in stage.state_names:
            _attach(self, name, state[name], parameter=name in params)
        self._params = params

    def forward(self, *inputs):
        state = [self.get_parameter(n) if n in self._params else self.get_buffer(n)
                 for n in self.stage.state_names]
        with axis_groups({"tp": self.tp_group}):
            out = self.stage.gm(*state, *inputs)
        # the schedule concatenates microbatch outputs on dim 0: a scalar loss travels as shape (1,)
        return tuple(o.unsqueeze(0) if isinstance(o, torch.Tensor) and o.dim() == 0 else o for o in out)


def unpack_last_outputs(outputs: tuple, stage: StageProgram) -> list:
    """Undo StageModule's (1,)-shaped scalars for the loss function."""
    vals = [n.meta.get("val") for n in stage.gm.graph.output_node().args[0]] \
        if isinstance(stage.gm.graph.output_node().args[0], (list, tuple)) else []
    return [o.squeeze(0) if isinstance(v, torch.Tensor) and v.dim() == 0 else o
            for o, v in zip(outputs, vals)] if vals else list(outputs)


def build_schedule(modules: list[StageModule], stage_indices: list[int], n_stages: int, pp_group,
                   device: torch.device, microbatches: int, schedule: str,
                   loss_fn: Callable):
    """A `torch.distributed.pipelining` schedule over this rank's stages (gradients unscaled)."""
    import torch.distributed.pipelining as pipelining

    stages = [pipelining.PipelineStage(m, i, n_stages, device, group=pp_group)
              for m, i in zip(modules, stage_indices)]
    cls = getattr(pipelining, SCHEDULES[schedule][0])
    # the loss is divided by the microbatch count in loss_fn, so grads are scaled exactly once
    # even when one parameter sits in two local stages (tied embeddings under interleaving)
    if SCHEDULES[schedule][1] == 1:
        return cls(stages[0], microbatches, loss_fn=loss_fn, scale_grads=False)
    return cls(stages, microbatches, loss_fn=loss_fn, scale_grads=False)


def chunk_batch(args: tuple, kwargs: dict, n: int) -> list[tuple[tuple, dict]]:
    """Split every tensor of a call on dim 0 into n equal microbatches (other values are shared)."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    sizes = {leaf.shape[0] for leaf in leaves if isinstance(leaf, torch.Tensor) and leaf.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(f"cannot split the batch into microbatches: tensor inputs have batch sizes "
                         f"{sorted(sizes) or 'none'}; every tensor input needs the same dim 0")
    size = sizes.pop()
    if size % n:
        raise ValueError(f"the batch of {size} cannot be split into {n} equal microbatches "
                         f"(microbatches x dp = {n}); use a batch size that is a multiple of {n}")
    pieces = []
    for i in range(n):
        part = [leaf.chunk(n, 0)[i] if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 else leaf
                for leaf in leaves]
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


def simulate_stages(stages: list[StageProgram], tp: int, state: Callable[[str], object],
                    flat_inputs: list) -> list:
    """Run the stage chain for one microbatch, every tp rank in lockstep; returns the last stage's outputs."""
    carried = [x for x in flat_inputs if isinstance(x, torch.Tensor)]
    for stage in stages:
        if len(carried) != len(stage.inputs):
            raise PlanError(f"stage {stage.index} expects {len(stage.inputs)} inputs, got {len(carried)}")
        ins = [state(name) for name in stage.state_names] + carried
        carried = simulate_graph(stage.gm, tp, ins)
        if not stage.is_last:
            carried = list(carried)
    return carried
