"""ShardedModule: the nn.Module `autoshard()` returns, a facade over the plan and a runtime.

It keeps the original parameter names; the programs and the plan they share are the
`ProgramCache`'s (compiler/cache.py, handed out as `sharded.compiled`); everything that depends
on where it runs (one process for all ranks, or one rank of a mesh) is the runtime's, chosen
once by `autoshard` (see `runtime/base.py`).
"""

from __future__ import annotations

import functools
from html import escape
from pathlib import Path

import torch
from torch.utils import _pytree as pytree

from nxd_autoshard.compiler.cache import ProgramCache
from nxd_autoshard.compiler.compiled import CompiledPlan
from nxd_autoshard.compiler.driver import LocalProgram
from nxd_autoshard.inspect.dtensor_plan import dtensor_plan
from nxd_autoshard.inspect.history import History
from nxd_autoshard.inspect.report import explain
from nxd_autoshard.ir.mesh import Mesh
from nxd_autoshard.ir.program import CapturedProgram, StageProgram
from nxd_autoshard.runtime.base import LocalState, ModelTensors, Runtime
from nxd_autoshard.runtime.pipeline import PipelineConfig, _attach

__all__ = ["ShardedModule"]


def _installed_first(method, needed_by: str):
    """`method` of nn.Module, once this rank's tensors are installed (captured first if need be)."""

    @functools.wraps(method)
    def installed_first(self, *args, **kwargs):
        self._ensure_installed(needed_by)
        return method(self, *args, **kwargs)

    return installed_first


class ShardedModule(torch.nn.Module):
    """A model rewritten for tensor parallelism; parameters keep their original names.

    With a process group (`ProcessGroupRuntime`), parameters are this rank's shards and
    forward runs the local program with real collectives. Without one (`SimulatorRuntime`),
    parameters are the full tensors and forward (or `simulate`) runs every rank in one process
    with emulated collectives.

    The program is captured at the first call (`forward`, `train_step`, `eval_step`) with its
    real inputs, unless autoshard got example inputs. What needs a program before that
    (`explain()`, the notebook view, this rank's parameter shards on a process group, hence
    `parameters()`, `optimizer()`, `state_dict()`, `save_checkpoint()`) captures the model's own
    example call (a Hugging Face model's `dummy_inputs`) or says what to pass.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cache: ProgramCache,
        *,
        runtime: Runtime,
        pipeline: PipelineConfig,
        loss_fn=None,
    ):
        super().__init__()
        self.tp = cache.settings.tp
        self.pipeline = pipeline
        self.mesh = Mesh(pipeline.dp, pipeline.pp, self.tp)
        self.runtime = runtime
        self.loss_fn = loss_fn
        self._cache = cache
        self.plan = cache.plan  # decided by the first capture
        self.full_shapes = cache.settings.full_shapes
        self.tensors = ModelTensors.of(model)
        self._installed = False
        self.train(model.training)
        self._install_state(self.runtime.local_state(self, None))

    # ------------------------------------------------------------------ building
    def _program_for(self, args: tuple, kwargs: dict) -> tuple[LocalProgram, list]:
        """The program for this call and its flat inputs; the first capture installs the
        runtime's tensors (this rank's shards, or every full tensor)."""
        entry, flat, new = self._cache.get(args, kwargs, self.training)
        if new and not self._installed:
            self._install_state(self.runtime.local_state(self, entry))
        return entry, flat

    def _ensure_program(self, needed_by: str) -> None:
        """Capture the model's own example call if nothing has been captured yet."""
        if self._cache.captured:
            return
        own = self._cache.own_example_call(needed_by)
        args, kwargs = pytree.tree_map(
            lambda x: x.to(self.tensors.device) if isinstance(x, torch.Tensor) else x, own
        )
        # one microbatch as it is: the pipeline's capture sees one chunk
        self._program_for(args, kwargs)

    def _ensure_installed(self, needed_by: str) -> None:
        if not self._installed:
            self._ensure_program(needed_by)

    # On a process group the parameters are this rank's pieces of the plan: until it exists
    # they are not registered, so the module's tensor accessors capture first (or say what to
    # pass) instead of answering with no parameters, which an optimizer would silently keep.
    # parameters() is a generator: the check runs at the call, not at the first next().
    _PARAMETERS = "this rank's parameters (parameters(), an optimizer over them)"
    named_parameters = _installed_first(torch.nn.Module.named_parameters, _PARAMETERS)
    parameters = _installed_first(torch.nn.Module.parameters, _PARAMETERS)
    named_buffers = _installed_first(torch.nn.Module.named_buffers, "this rank's buffers")
    state_dict = _installed_first(torch.nn.Module.state_dict, "state_dict() of this rank's shards")
    load_state_dict = _installed_first(torch.nn.Module.load_state_dict, "load_state_dict()")
    _apply = _installed_first(torch.nn.Module._apply, "moving or casting this rank's parameters")

    # the plan's decisions, by the names the report, goldens, runtimes and users read
    placements = property(lambda self: self.plan.placements)
    padded = property(lambda self: self.plan.padded)
    units = property(lambda self: self.plan.units)
    stage_of_unit = property(lambda self: self.plan.stage_of_unit)
    stage_of_block = property(lambda self: self.plan.stage_of_block)
    unit_costs = property(lambda self: self.plan.unit_costs)
    block_costs = property(lambda self: self.plan.block_costs)

    def _install_state(self, state: LocalState | None) -> None:
        """Register what the runtime installs (this rank's stages' shards, or every full tensor);
        None: nothing yet, the plan decides it at the first capture."""
        if state is None:
            return
        self._installed = True
        for name, param in state.parameters.items():
            _attach(self, name, param, parameter=True)
        for name, buf in state.buffers.items():
            _attach(self, name, buf, parameter=False, persistent=name in self.tensors.persistent)
        if not state.keep_full:
            self.tensors.parameters = {}  # the full weights are no longer needed on this rank

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
        self._ensure_installed("optimizer()")
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
        self._ensure_installed("save_checkpoint()")
        self.runtime.save_checkpoint(self, Path(directory))

    # ------------------------------------------------------------------ inspection
    @property
    def compiled(self) -> CompiledPlan:
        """The plan and every program captured so far, as one read-only value with no runtime
        inside (compiler/compiled.py): what explain(), goldens and the plan CLI read."""
        return self._compiled("compiled")

    def _compiled(self, needed_by: str) -> CompiledPlan:
        self._ensure_program(needed_by)
        local = {n: p.dtype for n, p in self.named_parameters(remove_duplicate=False)}
        return self._cache.compiled(self.pipeline.pp, local)

    def programs(self) -> list[CapturedProgram]:
        """Every captured local program (one per call signature and train/eval mode)."""
        return [e.program for e in self._cache.entries()]

    def stages(self, program: int = 0) -> list[StageProgram]:
        """Pipeline stages of a captured program, by default the first ([] without pipelining)."""
        return list(self._compiled("stages()").program(program, "stages()").stages)

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        """The local program of the first captured call."""
        self._ensure_program("graph_module")
        return self.programs()[0].gm

    @property
    def history(self) -> History:
        """The passes of the first captured program: name, seconds, op counts, graph after each."""
        self._ensure_program("history")
        return History(self.programs()[0].history)

    def explain(self, format: str | None = None, *, program: int = 0):
        """The plan report (see `report.explain`): a Report, or its "text" / "html" / "json" form."""
        return explain(self._compiled("explain()"), format=format, program=program)

    def dtensor_plan(self, *, program: int = 0):
        """This plan as a DTensor `parallelize_module` plan `{module: ColwiseParallel(), ...}`.

        Regions DTensor's styles cannot express (fused blocks, padded vocab, replicated KV heads,
        hard-coded head counts, ...) are left out, each module named with why in `.skipped`;
        `parallelize_module(model, mesh["tp"], plan)` then gives this plan's loss and gradients.
        """
        return dtensor_plan(self._compiled("dtensor_plan()"), self._cache.shadow, program=program)

    def _repr_html_(self) -> str:
        try:
            self._ensure_program("the plan view")
        except ValueError as err:  # a notebook cell showing the module must not fail
            return f"<pre>{escape(self.extra_repr())}\n\n{escape(str(err))}</pre>"
        return explain(self._compiled("the plan view")).to_html(full=True)

    def extra_repr(self) -> str:
        mesh = f"{self._cache.settings.model_name}, tp={self.tp}, pp={self.pipeline.pp}, dp={self.pipeline.dp}"
        if not self._cache.captured:
            return f"{mesh}, not captured yet (captured at the first call)"
        return f"{mesh}, {len(self.programs())} captured program(s)"

    def local_shape(self, name: str) -> tuple[int, ...]:
        self._ensure_program("local_shape()")
        return self.plan.local_shape(name, self.full_shapes[name], self.tp)

    def full_shape(self, name: str) -> tuple[int, ...]:
        return self.full_shapes[name]

    def gather_grads(self) -> dict[str, torch.Tensor]:
        """Full-shape gradients of every parameter (all-gathers shards when run on a process group)."""
        return {
            name: self.runtime.gather_full(self, name, p.grad)
            for name, p in self.named_parameters()
            if p.grad is not None
        }

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters gathered back to full shape, by original name."""
        return {
            name: self.runtime.gather_full(self, name, p.detach())
            for name, p in self.named_parameters()
        }
