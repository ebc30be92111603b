"""ShardedModule: the nn.Module `autoshard()` returns, a facade over the plan and a runtime.

It keeps the original parameter names and the plan (placements, stages, history); everything
that depends on where it runs (one process for all ranks, or one rank of a mesh) is the
runtime's, chosen once by `autoshard` (see `runtime/base.py`).
"""

from __future__ import annotations

import re
import time
import warnings
from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree

from nxd_autoshard.compiler.capture import _default_kwargs, capture, meta_shadow
from nxd_autoshard.compiler.driver import LocalProgram, count_ops, record_pass, run_pass
from nxd_autoshard.compiler.normalize import (
    drop_assertions,
    expert_linear_from_grouped_mm,
    linear_from_matmul,
    retarget_device,
    split_bias,
)
from nxd_autoshard.compiler.partition import partition
from nxd_autoshard.compiler.propagate import PropagationResult, propagate_placements
from nxd_autoshard.compiler.split import (
    Units,
    assign_units,
    find_blocks,
    segment_blocks,
    split_program,
    stage_of_units,
    unit_costs,
)
from nxd_autoshard.inspect.history import History
from nxd_autoshard.ir.errors import DivisibilityError, PlanError
from nxd_autoshard.ir.mesh import Mesh
from nxd_autoshard.ir.placements import Placement, Replicate, Shard
from nxd_autoshard.ir.program import BlockCost, CapturedProgram, StageProgram, input_signature
from nxd_autoshard.runtime.base import Runtime, loss_of
from nxd_autoshard.runtime.pipeline import _attach
from nxd_autoshard.runtime.simulated import SimulatorRuntime

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


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class ShardedModule(torch.nn.Module):
    """A model rewritten for tensor parallelism; parameters keep their original names.

    With a process group (`ProcessGroupRuntime`), parameters are this rank's shards and
    forward runs the local program with real collectives. Without one (`SimulatorRuntime`),
    parameters are the full tensors and forward (or `simulate`) runs every rank in one process
    with emulated collectives.
    """

    def __init__(self, model: torch.nn.Module, *, tp: int, styles: dict[str, str], auto: bool,
                 runtime: Runtime | None = None, pipeline: PipelineConfig | None = None,
                 loss_fn=None):
        super().__init__()
        self.tp = tp
        self.pipeline = pipeline or PipelineConfig()
        self.mesh = Mesh(self.pipeline.dp, self.pipeline.pp, tp)
        self.runtime = runtime if runtime is not None else SimulatorRuntime()
        self.loss_fn = loss_fn
        self.stage_of_block: list[int] | None = None  # stage where each block starts
        self.stage_of_unit: list[int] | None = None
        self.block_costs: list[BlockCost] = []
        self.unit_costs: list[BlockCost] = []
        self.units: Units | None = None  # pipeline units of the first capture
        self._installed = False
        self._styles = styles
        self._auto = auto
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
        self.placements: dict[str, Placement] = {}
        self.blocks: dict[str, int] = {}
        self.padded: dict[str, int] = {}  # vocab padding: param -> padded size of its shard dim
        self.plan_styles: dict[str, str] = {}
        self._programs: dict[tuple, list[LocalProgram]] = {}
        self.train(model.training)

    # ------------------------------------------------------------------ building
    def _capture(self, args: tuple, kwargs: dict) -> LocalProgram:
        # stage programs are static per microbatch shape: values crossing a cut must be tensors
        started = time.perf_counter()
        program = capture(self._shadow[0], args, kwargs, training=self.training, device=self._device(),
                          dynamic=self.pipeline.n_stages == 1)
        history = program.history
        record_pass(history, "capture", program.gm, 0, started)
        program.gm = run_pass(history, drop_assertions, program.gm)
        program.gm = run_pass(history, linear_from_matmul, program.gm)
        program.gm = run_pass(history, expert_linear_from_grouped_mm, program.gm)
        program.gm = run_pass(history, split_bias, program.gm)
        before, started = count_ops(program.gm), time.perf_counter()
        result = self._decide(program)
        record_pass(history, "propagate", program.gm, before, started)
        before, started = count_ops(program.gm), time.perf_counter()
        partition(program, result, self.tp)
        record_pass(history, "partition", program.gm, before, started)
        device = self._device()
        program.gm = run_pass(history, retarget_device, program.gm, device)
        kwarg_order = list(_default_kwargs(self._shadow[0], dict(kwargs)).keys())
        entry = LocalProgram(program, result, kwarg_order)
        if self.pipeline.n_stages > 1:
            before, started = count_ops(program.gm), time.perf_counter()
            entry.stages = self._split(program)
            record_pass(history, "split", [st.gm for st in entry.stages], before, started)
        if not self._installed:
            self._install_state(entry)
        return entry

    def _split(self, program: CapturedProgram) -> list[StageProgram]:
        """Cut the local program into stages; the first capture fixes which units each stage holds."""
        blocks = find_blocks(self._shadow[0])
        if len(blocks) < 2:
            raise PlanError(f"{self._model_name} has no repeated blocks (a ModuleList of layers of one "
                            "class) to cut between, so it cannot be pipelined; use pp=1")
        units = segment_blocks(program, assign_units(program.gm, blocks), blocks)
        local = {n: int(torch.Size(self.local_shape(n)).numel()) for n in self._full_shapes}
        costs = unit_costs(program, units.of_node, units.names, local)
        if self.stage_of_unit is None:
            self.units, self.unit_costs = units, costs
            self.block_costs = [BlockCost(b) for b in blocks]
            for cost, b in zip(costs, units.block):
                for key in ("flops", "params", "param_bytes"):
                    setattr(self.block_costs[b], key, getattr(self.block_costs[b], key) + getattr(cost, key))
            self.stage_of_unit = stage_of_units(blocks, units, self.pipeline.n_stages, costs,
                                                self.pipeline.cuts, self.pipeline.balance)
            self.stage_of_block = [self.stage_of_unit[units.first_of_block(b)] for b in range(len(blocks))]
            return split_program(program, units, self.stage_of_unit, blocks)
        return split_program(program, units, self._same_stages(units), blocks)

    def _same_stages(self, units: Units) -> list[int]:
        """Stages for a later capture's units (eval mode drops dropout-only units): by unit name."""
        first = dict(zip(self.units.names, self.stage_of_unit))
        stages, current = [], 0
        for name in units.names:
            current = max(current, first.get(name, current))
            stages.append(current)
        return stages

    def _device(self) -> torch.device:
        for t in list(self._full.values()) + list(self._buffers_full.values()):
            return t.device
        return torch.device("cpu")

    def _decide(self, program: CapturedProgram) -> PropagationResult:
        """Propagate, dropping auto/plan column choices that a later op would have to gather."""
        first = not self.placements
        styles = dict(self._styles)
        veto: set[str] = set()
        for _ in range(16):
            result = propagate_placements(
                program, self.tp, styles=styles, fixed=self.placements, auto=self._auto and first, veto=veto,
                padded=self.padded,
            )
            # auto choices that end in a gather are undone; a rule the user wrote is kept
            # (and its gather warned about) unless the size simply does not split
            failed = {
                m: why for m, why in result.failed_columns.items()
                if m not in veto and (m in result.auto_styles or "not divisible" in why)
            }
            if not failed or not first:
                break
            self._check_divisibility(result, failed)
            veto |= _root_failures(failed)
            styles = {p: s for p, s in styles.items() if p.rsplit(".", 1)[0] not in veto}
        for line in result.fallbacks:
            warnings.warn(f"nxd-autoshard: gathered to replicate (no sharding rule): {line}", stacklevel=3)
        if first:
            self._commit_placements(result)
        return result

    def _check_divisibility(self, result: PropagationResult, failed: dict[str, str]) -> None:
        """KV projections that cannot be split are replicated; a layer with no split at all is an error."""
        by_input: dict[str, list[str]] = {}
        for mod, x in result.column_inputs.items():
            by_input.setdefault(x, []).append(mod)
        for mod, why in failed.items():
            if "not divisible" not in why:
                continue
            siblings = by_input.get(result.column_inputs.get(mod, ""), [])
            if any(s not in failed for s in siblings):
                continue  # e.g. k/v with fewer heads than tp beside a sharded q
            size = int(why.split("size ")[1].split(" ")[0])
            raise DivisibilityError(
                f"module '{mod}' of {self._model_name} cannot be split across tp={self.tp}: {why} "
                f"(e.g. the number of attention heads). tp values that divide it: "
                f"{', '.join(map(str, _divisors(size)))}."
            )

    def _commit_placements(self, result: PropagationResult) -> None:
        self.placements = dict(result.param_placements)
        self.blocks = dict(result.blocks)
        self.padded = dict(result.padded)
        self.plan_styles = dict(result.auto_styles)
        for name, full in self._full.items():
            self.placements.setdefault(name, Replicate())
        # tied parameters: one placement for every alias
        by_id: dict[int, Placement] = {}
        padded_by_id: dict[int, int] = {}
        for name, full in self._full.items():
            if not isinstance(self.placements[name], Replicate):
                by_id[id(full)] = self.placements[name]
            if name in self.padded:
                padded_by_id[id(full)] = self.padded[name]
        for name, full in self._full.items():
            self.placements[name] = by_id.get(id(full), self.placements[name])
            if id(full) in padded_by_id:
                self.padded[name] = padded_by_id[id(full)]

    def _install_state(self, entry: LocalProgram) -> None:
        """Register what the runtime installs: this rank's stages' shards, or every full tensor."""
        self._installed = True
        state = self.runtime.local_state(self, entry, self._full, self._buffers_full)
        for name, param in state.parameters.items():
            _attach(self, name, param, parameter=True)
        for name, buf in state.buffers.items():
            _attach(self, name, buf, parameter=False, persistent=name in self._persistent)
        if not state.keep_full:
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

    def _with_defaults(self, kwargs: dict) -> dict:
        """`kwargs` with the model's defaults for the keyword arguments the call left out."""
        return _default_kwargs(self._shadow[0], dict(kwargs))

    def _loss_from(self, output, target) -> torch.Tensor:
        return loss_of(output, target, self.loss_fn, self._model_name)

    # ------------------------------------------------------------------ running (the runtime's)
    def forward(self, *args, **kwargs):
        return self.runtime.forward(self, args, kwargs)

    def simulate(self, *args, **kwargs):
        """Run every rank (all tp ranks, all stages) in this process with emulated collectives.

        Returns what the original model returns. With pipeline stages the batch is cut into
        dp x microbatches chunks as on the mesh; their losses are averaged, other outputs concatenated.
        """
        return self.runtime.simulate(self, args, kwargs)

    def train_step(self, *args, target=None, **kwargs) -> torch.Tensor:
        """Forward and backward of one batch; returns the loss. Gradients end up in `.grad`, summed
        across pipeline stages for tied weights and averaged across data-parallel replicas.

        On a mesh, `args`/`kwargs` are this data-parallel replica's batch; in simulation they are
        the whole batch. The loss is the model's own (`output.loss`, e.g. with `labels=`) unless
        autoshard got `loss_fn(output, target)`. Call `optimizer.step()` afterwards.
        """
        return self.runtime.train_step(self, args, kwargs, target)

    @torch.no_grad()
    def eval_step(self, *args, target=None, **kwargs) -> torch.Tensor:
        """The loss of one batch without backward (pipeline: the schedule's forward-only pass)."""
        return self.runtime.eval_step(self, args, kwargs, target)

    def optimizer(self, optimizer_class=torch.optim.AdamW, *, zero: bool = False, **kwargs):
        """An optimizer over this rank's parameters; zero=True shards its state over dp (ZeRO-1,
        torch's ZeroRedundancyOptimizer)."""
        return self.runtime.optimizer(list(self.parameters()), optimizer_class, zero=zero, **kwargs)

    def sync_grads(self) -> None:
        """Sum gradients of weights shared by stages (tied embeddings), then average over dp."""
        self.runtime.sync_grads(self)

    def save_checkpoint(self, directory) -> None:
        """Write the full, unsharded weights as a transformers-style safetensors checkpoint.

        Call it on every rank. Each pipeline stage's first rank (dp 0, tp 0) writes that stage's
        tensors to model-0000k-of-0000n.safetensors (model.safetensors without pipelining);
        global rank 0 writes model.safetensors.index.json and the model's config.json, so
        `AutoModel*.from_pretrained(directory)` and `safetensors.torch.load_file` read it.
        """
        from pathlib import Path

        self.runtime.save_checkpoint(self, Path(directory))

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
        shape = list(self._full_shapes[name])
        p = self.placements.get(name, Replicate())
        if isinstance(p, Shard):
            shape[p.dim] = self.padded.get(name, shape[p.dim]) // self.tp
        return tuple(shape)

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
        return self.runtime.gather_full(self, name, local)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters gathered back to full shape, by original name."""
        return {name: self._gather_full(name, p.detach()) for name, p in self.named_parameters()}


def _root_failures(failed: dict[str, str]) -> set[str]:
    """Failures to undo now: sizes that do not split, and the first other failure of each layer.

    Later failures in a layer are often caused by the first (a replicated attention makes the
    output projection's choice fail too): they are retried once it is undone.
    """
    roots, seen_layers = set(), set()
    for module, why in failed.items():  # in graph order
        layer = re.match(r"^(.*?\.\d+)(\.|$)", module)
        key = layer.group(1) if layer else ""
        if "not divisible" in why:
            roots.add(module)
        elif key not in seen_layers:
            seen_layers.add(key)
            roots.add(module)
    return roots

