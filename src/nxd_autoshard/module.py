"""`autoshard()` and the ShardedModule it returns: capture, plan, propagate, partition, run."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from nxd_autoshard.compiler.capture import _default_kwargs, meta_shadow
from nxd_autoshard.compiler.driver import LocalProgram, compile_call
from nxd_autoshard.compiler.plan import CompileSettings, Plan
from nxd_autoshard.inspect.history import History
from nxd_autoshard.ir.mesh import Mesh
from nxd_autoshard.ir.placements import Replicate, Shard, shard_tensor
from nxd_autoshard.ir.program import CapturedProgram, StageProgram, input_signature
from nxd_autoshard.runtime.collectives import axis_groups
from nxd_autoshard.runtime.groups import MeshGroups
from nxd_autoshard.runtime.pipeline import (
    _attach,
    chunk_batch,
    merge_chunk_outputs,
    simulate_stages,
    stage_ranks,
)
from nxd_autoshard.runtime.simulator import PerRank, scatter_to_ranks, simulate_graph
from nxd_autoshard.runtime.training import TrainingMixin

__all__ = ["ShardedModule", "PipelineConfig"]


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


class _ReplicaJoin(torch.autograd.Function):
    """Rank 0's copy of a replicated output; backward hands the gradient to every rank."""

    @staticmethod
    def forward(ctx, *xs):
        ctx.n = len(xs)
        return xs[0].clone()

    @staticmethod
    def backward(ctx, grad):
        return tuple(grad for _ in range(ctx.n))


class ShardedModule(TrainingMixin, torch.nn.Module):
    """A model rewritten for tensor parallelism; parameters keep their original names.

    With a process group, parameters are this rank's shards and forward runs the local
    program with real collectives. Without one, parameters are the full tensors and
    forward (or `simulate`) runs every rank in one process with emulated collectives.
    """

    def __init__(self, model: torch.nn.Module, *, tp: int, styles: dict[str, str], auto: bool,
                 group=None, groups: MeshGroups | None = None, pipeline: PipelineConfig | None = None,
                 loss_fn=None, strict: bool = False):
        super().__init__()
        self.tp = tp
        self.pipeline = pipeline or PipelineConfig()
        self.mesh = Mesh(self.pipeline.dp, self.pipeline.pp, tp)
        self._groups = groups
        self.group = groups.tp if groups is not None else group
        self.rank = dist.get_rank(self.group) if self.group is not None else None
        self.loss_fn = loss_fn
        self._tied: list[tuple[object, list[str]]] = []  # (group, params) summed across stages
        self._installed = False
        self._shadow = [meta_shadow(model)]  # in a list: not a registered submodule
        self._model_name = type(model).__name__
        self._config = getattr(model, "config", None) if hasattr(getattr(model, "config", None), "to_json_file") else None
        self._full_shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
        self._full = dict(model.named_parameters(remove_duplicate=False))
        self._buffers_full = dict(model.named_buffers(remove_duplicate=False))
        self._persistent = {
            f"{mod_name}.{b}" if mod_name else b
            for mod_name, mod in model.named_modules()
            for b in mod._buffers
            if b not in mod._non_persistent_buffers_set
        }
        aliases: dict[int, list[str]] = {}
        for name, full in self._full.items():
            aliases.setdefault(id(full), []).append(name)
        self.plan = Plan()  # decided by the first capture
        self._settings = CompileSettings(
            tp=tp, styles=dict(styles), auto=auto, model_name=self._model_name,
            full_shapes=dict(self._full_shapes), device=self._device(),
            aliases=tuple(tuple(names) for names in aliases.values() if len(names) > 1),
            n_stages=self.pipeline.n_stages, cuts=self.pipeline.cuts, balance=self.pipeline.balance,
            strict=strict)
        self._programs: dict[tuple, list[LocalProgram]] = {}
        self.train(model.training)

    # ------------------------------------------------------------------ building
    def _capture(self, args: tuple, kwargs: dict) -> LocalProgram:
        entry = compile_call(self._shadow[0], args, kwargs, training=self.training,
                             settings=self._settings, plan=self.plan)
        if not self._installed:
            self._install_state(entry)
        return entry

    # the plan's decisions, by the names the report, goldens and runtime read
    placements = property(lambda self: self.plan.placements)
    blocks = property(lambda self: self.plan.blocks)
    padded = property(lambda self: self.plan.padded)
    plan_styles = property(lambda self: self.plan.auto_styles)
    units = property(lambda self: self.plan.units)
    stage_of_unit = property(lambda self: self.plan.stage_of_unit)
    stage_of_block = property(lambda self: self.plan.stage_of_block)
    unit_costs = property(lambda self: self.plan.unit_costs)
    block_costs = property(lambda self: self.plan.block_costs)

    def _device(self) -> torch.device:
        for t in list(self._full.values()) + list(self._buffers_full.values()):
            return t.device
        return torch.device("cpu")

    def _stage_ranks(self) -> list[int]:
        """The pp rank that runs each stage."""
        return stage_ranks(self.pipeline.pp, self.pipeline.virtual, self.pipeline.schedule)

    def _local_stages(self) -> list[int]:
        """Indices of the stages this rank runs (all of them without a process group)."""
        if self._groups is None:
            return list(range(self.pipeline.n_stages))
        mine = self._groups.coord("pp")
        return [s for s, r in enumerate(self._stage_ranks()) if r == mine]

    def _install_state(self, entry: LocalProgram) -> None:
        """Register this rank's parameters (its stages' shards, or every full tensor when simulating)."""
        self._installed = True
        held = set(self._full)
        if entry.stages is not None and self._groups is not None:
            held = {n for s in self._local_stages() for n in entry.stages[s].state_names}
            held_ids = {id(self._full[n]) for n in held if n in self._full}
            held |= {n for n, full in self._full.items() if id(full) in held_ids}  # tied aliases
            self._tied = self._tied_groups(entry.stages)
        local: dict[int, torch.nn.Parameter] = {}
        for name, full in self._full.items():
            if name not in held:
                continue
            if id(full) not in local:
                if self.group is None:
                    local[id(full)] = full
                else:
                    piece = shard_tensor(full.detach(), self.placements[name], self.tp, self.rank,
                                         self.blocks.get(name, 1), self.padded.get(name))
                    local[id(full)] = torch.nn.Parameter(piece.clone(), requires_grad=full.requires_grad)
            _attach(self, name, local[id(full)], parameter=True)
        for name, buf in self._buffers_full.items():
            if entry.stages is None or name in held or self._groups is None:
                _attach(self, name, buf, parameter=False, persistent=name in self._persistent)
        if self.group is not None or self._groups is not None:
            self._full = {}  # the full weights are no longer needed on this rank

    def _program_for(self, args: tuple, kwargs: dict) -> tuple[LocalProgram, list]:
        kwargs = _default_kwargs(self._shadow[0], dict(kwargs))
        key = (input_signature(args, dict(sorted(kwargs.items()))), self.training)
        for entry in self._programs.get(key, []):
            flat = self._flatten(entry, args, kwargs)
            if entry.program.accepts(flat):
                return entry, flat
        entry = self._capture(args, kwargs)
        self._programs.setdefault(key, []).append(entry)
        return entry, self._flatten(entry, args, kwargs)

    @staticmethod
    def _flatten(entry: LocalProgram, args: tuple, kwargs: dict) -> list:
        ordered = {k: kwargs[k] for k in entry.kwarg_order}
        return pytree.tree_leaves((args, ordered))

    def _state_value(self, program: CapturedProgram, name: str):
        if name in program.constants:
            return program.constants[name]
        return self.get_parameter(name) if name in self._full_shapes else self.get_buffer(name)

    def forward(self, *args, **kwargs):
        if self.group is None and self._groups is None:
            return self.simulate(*args, **kwargs)
        if self.pipeline.n_stages > 1:
            raise RuntimeError("this rank holds pipeline stage(s) "
                               f"{self._local_stages()} of {self.pipeline.n_stages}, not the whole "
                               "model: run a step with sharded.train_step(*inputs, **kwargs)")
        entry, flat = self._program_for(args, kwargs)
        program = entry.program
        state = [self._state_value(program, n) for n in program.state_names]
        with axis_groups({"tp": self.group}):
            outs = program.gm(*state, *flat)
        return pytree.tree_unflatten(list(outs), program.out_spec)

    def simulate(self, *args, **kwargs):
        """Run every rank (all tp ranks, all stages) in this process with emulated collectives.

        Returns what the original model returns. With pipeline stages the batch is cut into
        dp x microbatches chunks as on the mesh; their losses are averaged, other outputs concatenated.
        """
        if self.group is not None or self._groups is not None:
            raise RuntimeError("simulate() runs the all-rank program; this module is one rank's "
                               "(it was built inside a process group): call it directly instead")
        scattered: dict[str, PerRank] = {}
        if self.pipeline.n_stages == 1:
            entry, flat = self._program_for(args, kwargs)
            program = entry.program
            inputs = [self._rank_state(program, n, scattered) for n in program.state_names] + flat
            return pytree.tree_unflatten(_join(simulate_graph(program.gm, self.tp, inputs)),
                                         program.out_spec)
        outs = []
        for chunk_args, chunk_kwargs in chunk_batch(args, kwargs, self.pipeline.dp * self.pipeline.microbatches):
            entry, flat = self._program_for(chunk_args, chunk_kwargs)
            last = simulate_stages(entry.stages, self.tp,
                                   lambda n, p=entry.program: self._rank_state(p, n, scattered), flat)
            outs.append(_join(last))
        return pytree.tree_unflatten(merge_chunk_outputs(outs), entry.program.out_spec)

    def _rank_state(self, program: CapturedProgram, name: str, cache: dict) -> PerRank:
        """Each rank's piece of a parameter (scattered once per call, so tied uses share a gradient)."""
        if name not in cache:
            value = self._state_value(program, name)
            if name in self._full_shapes:
                cache[name] = scatter_to_ranks(value, self.placements[name], self.tp,
                                               self.blocks.get(name, 1), self.padded.get(name))
            else:
                cache[name] = PerRank([value] * self.tp)
        return cache[name]

    # ------------------------------------------------------------------ inspection
    def programs(self) -> list[CapturedProgram]:
        """Every captured local program (one per call signature and train/eval mode)."""
        return [e.program for entries in self._programs.values() for e in entries]

    def stages(self, program: int = 0) -> list[StageProgram]:
        """Pipeline stages of a captured program, by default the first ([] without pipelining)."""
        entries = [e for es in self._programs.values() for e in es]
        return entries[program].stages or []

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        """The local program of the first captured call."""
        return self.programs()[0].gm

    @property
    def history(self) -> History:
        """The passes of the first captured program: name, seconds, op counts, graph after each."""
        return History(self.programs()[0].history)

    def explain(self, format: str | None = None, *, program: int = 0):
        """The plan report (see `report.explain`): a Report, or its "text" / "html" / "json" form."""
        from nxd_autoshard.inspect.report import explain

        return explain(self, format=format, program=program)

    def _repr_html_(self) -> str:
        from nxd_autoshard.inspect.report import explain

        return explain(self).to_html(full=True)

    def local_shape(self, name: str) -> tuple[int, ...]:
        return self.plan.local_shape(name, self._full_shapes[name], self.tp)

    def full_shape(self, name: str) -> tuple[int, ...]:
        return self._full_shapes[name]

    def gather_grads(self) -> dict[str, torch.Tensor]:
        """Full-shape gradients of every parameter (all-gathers shards when run on a process group)."""
        grads = {}
        seen = set()
        for name, param in self.named_parameters():
            if param.grad is None or name in seen:
                continue
            seen.add(name)
            grads[name] = self._gather_full(name, param.grad)
        return grads

    def _gather_full(self, name: str, local: torch.Tensor) -> torch.Tensor:
        p = self.placements.get(name, Replicate())
        if self.group is None or not isinstance(p, Shard):
            return local.detach().clone()
        parts = [torch.empty_like(local) for _ in range(self.tp)]
        dist.all_gather(parts, local.detach().contiguous(), group=self.group)
        blocks = self.blocks.get(name, 1)
        per_rank = [t.chunk(blocks, p.dim) for t in parts]
        full = torch.cat([torch.cat([r[b] for r in per_rank], p.dim) for b in range(blocks)], p.dim)
        return full.narrow(p.dim, 0, self._full_shapes[name][p.dim])  # drop vocab padding

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters gathered back to full shape, by original name."""
        return {name: self._gather_full(name, p.detach()) for name, p in self.named_parameters()}


def _join(outs: list) -> list:
    """Rank 0's copy of every replicated output (its backward feeds every rank)."""
    return [
        _ReplicaJoin.apply(*o) if isinstance(o, PerRank) and isinstance(o[0], torch.Tensor)
        else (o[0] if isinstance(o, PerRank) else o)
        for o in outs
    ]

