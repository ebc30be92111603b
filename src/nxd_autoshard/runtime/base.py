"""The runtime seam: one protocol for running a compiled ShardedModule, chosen once by `autoshard`.

A runtime decides everything that differs between "all ranks in this process" (the simulator)
and "this process is one rank" (torch.distributed process groups): which stages and parameter
pieces this rank holds, how a captured program runs, the training and eval steps, gradient sync,
gathering full tensors, the optimizer and who writes which checkpoint file. The module facade
never asks which runtime it has. torch.compile is an option of the process-group runtime (its
programs compiled, `compiled.py`); a backend that runs programs differently (torch-xla) is a
new subclass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch.utils._pytree import tree_map

from nxd_autoshard.ir.program import split_written

if TYPE_CHECKING:
    from nxd_autoshard.compiler.driver import LocalProgram
    from nxd_autoshard.ir.mesh import Mesh
    from nxd_autoshard.ir.placements import Placement
    from nxd_autoshard.ir.program import CapturedProgram

__all__ = [
    "Host",
    "LocalState",
    "ModelTensors",
    "Runtime",
    "checkpoint_tensors",
    "loss_of",
    "read_for_write",
    "read_state",
    "state_value",
    "store_written",
    "write_checkpoint",
]


@dataclass
class ModelTensors:
    """The unsharded model's tensors as the runtime installs them, by original name (tied aliases
    share one), with what a checkpoint needs besides: the persistent buffers' names and the
    model's config (a Hugging Face config, written as config.json)."""

    parameters: dict[str, torch.nn.Parameter]
    buffers: dict[str, torch.Tensor]
    persistent: set[str]
    config: Any
    device: torch.device

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelTensors:
        config = getattr(model, "config", None)
        parameters = dict(model.named_parameters(remove_duplicate=False))
        buffers = dict(model.named_buffers(remove_duplicate=False))
        first = next(iter([*parameters.values(), *buffers.values()]), None)
        return cls(
            parameters,
            buffers,
            {
                f"{mod_name}.{b}" if mod_name else b
                for mod_name, mod in model.named_modules()
                for b in mod._buffers
                if b not in mod._non_persistent_buffers_set
            },
            config if hasattr(config, "to_json_file") else None,
            first.device if first is not None else torch.device("cpu"),
        )


class Host(Protocol):
    """What a runtime reads of the module it runs: the plan, and the module's own tensors.

    ShardedModule is the one implementation; the protocol keeps the runtime layer from
    importing the module layer above it.
    """

    tp: int
    pipeline: Any  # PipelineConfig: pp, dp, microbatches, schedule, virtual, n_stages
    mesh: Mesh
    placements: dict[str, Placement]
    plan: Any  # compiler.plan.Plan: placements, blocks (fused projections), padding
    padded: dict[str, int]
    loss_fn: Callable | None
    tensors: ModelTensors
    full_shapes: dict[str, tuple[int, ...]]  # every parameter's, by original name
    _cache: Any  # compiler.cache.ProgramCache: flatten, with_defaults, compute_dtype, settings

    def __call__(self, *args, **kwargs) -> Any: ...
    def _program_for(self, args: tuple, kwargs: dict) -> tuple[LocalProgram, list]: ...
    def named_parameters(self, *args, **kwargs): ...
    def named_buffers(self, *args, **kwargs): ...
    def parameters(self, *args, **kwargs): ...
    def get_parameter(self, target: str) -> torch.nn.Parameter: ...
    def get_buffer(self, target: str) -> torch.Tensor: ...
    def full_state_dict(self) -> dict[str, torch.Tensor]: ...


@dataclass
class LocalState:
    """The tensors this rank registers on the module, by original name (tied aliases share one)."""

    parameters: dict[str, torch.nn.Parameter] = field(default_factory=dict)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    keep_full: bool = True  # whether the module still needs the full weights afterwards


class Runtime(ABC):
    """How one compiled module runs: in one process for every rank, or as one rank of a mesh."""

    @abstractmethod
    def local_stages(self, host: Host) -> list[int]:
        """Indices of the pipeline stages this runtime runs."""

    @abstractmethod
    def local_state(self, host: Host, entry: LocalProgram | None) -> LocalState | None:
        """The parameters and buffers to install: from the first captured program `entry`, or
        before any capture (`entry` None) where they do not depend on the plan, else None."""

    @abstractmethod
    def step_chunks(self, host: Host) -> int:
        """Into how many pieces a pipelined step's batch is cut (the capture sees one)."""

    @abstractmethod
    def forward(self, host: Host, args: tuple, kwargs: dict) -> Any:
        """The module's forward: what the original model returns."""

    @abstractmethod
    def simulate(self, host: Host, args: tuple, kwargs: dict) -> Any:
        """Every rank in this process with emulated collectives (refused where this is one rank)."""

    @abstractmethod
    def train_step(self, host: Host, args: tuple, kwargs: dict, target: Any) -> torch.Tensor:
        """Forward and backward of one batch, gradients synced; returns the detached loss."""

    @abstractmethod
    def eval_step(self, host: Host, args: tuple, kwargs: dict, target: Any) -> torch.Tensor:
        """The loss of one batch without backward."""

    @abstractmethod
    def sync_grads(self, host: Host) -> None:
        """Sum tied weights' gradients across stages, then average over dp."""

    @abstractmethod
    def gather_full(self, host: Host, name: str, local: torch.Tensor) -> torch.Tensor:
        """The full-shape tensor of parameter `name` from this runtime's piece of it."""

    @abstractmethod
    def optimizer(
        self, params: list[torch.nn.Parameter], optimizer_class: type, *, zero: bool, **kwargs
    ) -> torch.optim.Optimizer:
        """An optimizer over `params`; zero=True shards its state over dp where dp exists."""

    @abstractmethod
    def save_checkpoint(self, host: Host, directory: Path) -> None:
        """Write the full weights as a transformers-style safetensors checkpoint."""


def state_value(host: Host, program: CapturedProgram, name: str) -> torch.Tensor:
    """State input `name` of `program`: a constant it captured, else the module's installed
    parameter or buffer."""
    if name in program.constants:
        return program.constants[name]
    return host.get_parameter(name) if name in host.full_shapes else host.get_buffer(name)


def read_for_write(value: torch.Tensor) -> torch.Tensor:
    """A buffer the program writes, as the program reads it: a copy, because autograd may keep
    the value read (BatchNorm's backward reads the running stats) and the write after the call
    would change it under autograd (an in-place error in backward, or a silent wrong gradient)."""
    return value.detach().clone()


def read_state(name: str, value: torch.Tensor, mutated: list[str]) -> torch.Tensor:
    """State tensor `name` as a program that writes the `mutated` buffers reads it: the copy of
    `read_for_write` where it is one of them, else the tensor itself."""
    return read_for_write(value) if name in mutated else value


def store_written(
    buffer: Callable[[str], torch.Tensor], names: list[str], outs: list | tuple
) -> list:
    """Store the first len(names) outputs, the new values of the buffers the forward wrote, into
    those buffers in place (tensors aliasing them, a state_dict, see it as after the unsharded
    forward), and return the rest: the user outputs (or a stage's outputs)."""
    written, rest = split_written(names, outs)
    with torch.no_grad():
        for name, value in zip(names, written):
            buffer(name).copy_(value)
    return rest


def loss_of(host: Host, output: Any, target: Any) -> torch.Tensor:
    """The loss in fp32: loss_fn(output, target), else the model's own (`output.loss`, a scalar)."""
    if host.loss_fn is not None:
        if host._cache.compute_dtype is not torch.float32:
            # a loss function of the bf16 outputs computes and reduces in fp32
            output = tree_map(
                lambda x: x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x,
                output,
            )
        return host.loss_fn(output, target).float()
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, torch.Tensor) and output.dim() == 0:
        loss = output
    if (
        loss is None
        and isinstance(output, (tuple, list))
        and output
        and isinstance(output[0], torch.Tensor)
        and output[0].dim() == 0
    ):
        loss = output[0]
    if loss is None:
        raise ValueError(
            f"{host._cache.settings.model_name} returned no loss: pass the labels its forward "
            "takes (e.g. labels=...) or give autoshard(..., loss_fn=fn(output, target))"
        )
    return loss.float()


def write_checkpoint(
    host: Host,
    directory: Path,
    tensors: dict[str, torch.Tensor],
    *,
    stage: int,
    writer: bool,
    everyone: list[tuple[int, list[str]]],
    n_files: int,
    index_writer: bool,
) -> None:
    """Write this rank's share of a checkpoint: its stage's file if `writer`, the index and config
    if `index_writer`. `everyone` is each writer's (stage, tensor names), to give a tied weight
    held by two stages to the first."""
    import json

    from safetensors.torch import save_file

    owner: dict[str, int] = {}
    for s, names in sorted(everyone):
        for name in names:
            owner.setdefault(name, s)
    file_of = {
        s: (
            "model.safetensors"
            if n_files == 1
            else f"model-{s + 1:05d}-of-{n_files:05d}.safetensors"
        )
        for s in range(n_files)
    }
    if writer:
        directory.mkdir(parents=True, exist_ok=True)
        own = {n: t.contiguous() for n, t in tensors.items() if owner[n] == stage}
        save_file(own, directory / file_of[stage], metadata={"format": "pt"})
    if index_writer:
        directory.mkdir(parents=True, exist_ok=True)
        if n_files > 1:
            index = {
                "metadata": {},
                "weight_map": {n: file_of[s] for n, s in sorted(owner.items())},
            }
            (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        if host.tensors.config is not None:
            host.tensors.config.to_json_file(str(directory / "config.json"))


def checkpoint_tensors(host: Host) -> dict[str, torch.Tensor]:
    """Full parameters (a tp collective on a mesh: every rank takes part) and persistent buffers."""
    tensors = host.full_state_dict()
    tensors.update(
        {n: b.detach().clone() for n, b in host.named_buffers() if n in host.tensors.persistent}
    )
    return tensors
