"""SimulatorRuntime: every rank (all tp ranks, all pipeline stages) in this process.

Parameters are the full tensors; each call scatters them to per-rank pieces and runs the
partitioned program with emulated collectives, so loss and gradients land on the full weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils import _pytree as pytree

from nxd_autoshard.ir.program import split_written
from nxd_autoshard.runtime.base import (
    Host,
    LocalState,
    Runtime,
    checkpoint_tensors,
    loss_of,
    read_for_write,
    state_value,
    store_written,
    write_checkpoint,
)
from nxd_autoshard.runtime.pipeline import chunk_batch, merge_chunk_outputs, simulate_stages
from nxd_autoshard.runtime.simulator import PerRank, scatter_to_ranks, simulate_graph

if TYPE_CHECKING:
    from nxd_autoshard.compiler.driver import LocalProgram
    from nxd_autoshard.ir.program import CapturedProgram

__all__ = ["SimulatorRuntime"]


class _ReplicaJoin(torch.autograd.Function):
    """Rank 0's copy of a replicated output; backward hands the gradient to every rank."""

    @staticmethod
    def forward(ctx, *xs):
        ctx.n = len(xs)
        return xs[0].clone()

    @staticmethod
    def backward(ctx, grad):
        return tuple(grad for _ in range(ctx.n))


def _join(outs: list) -> list:
    """Rank 0's copy of every replicated output (its backward feeds every rank)."""
    return [
        _ReplicaJoin.apply(*o)
        if isinstance(o, PerRank) and isinstance(o[0], torch.Tensor)
        else (o[0] if isinstance(o, PerRank) else o)
        for o in outs
    ]


class SimulatorRuntime(Runtime):
    """All ranks in one process: full parameters, emulated collectives, nothing to sync."""

    def local_stages(self, host: Host) -> list[int]:
        return list(range(host.pipeline.n_stages))

    def local_state(self, host: Host, entry: LocalProgram | None) -> LocalState:
        # the full tensors themselves, whatever the plan: gradients of the simulated ranks
        # accumulate into them, and an optimizer can be built over them before the first call
        return LocalState(dict(host.tensors.parameters), dict(host.tensors.buffers))

    def step_chunks(self, host: Host) -> int:
        # the whole batch is here: dp replicas x microbatches, as the mesh would cut it
        return host.pipeline.dp * host.pipeline.microbatches

    def forward(self, host: Host, args: tuple, kwargs: dict) -> Any:
        return self.simulate(host, args, kwargs)

    def simulate(self, host: Host, args: tuple, kwargs: dict) -> Any:
        scattered: dict[str, PerRank] = {}
        if host.pipeline.n_stages == 1:
            entry, flat = host._program_for(args, kwargs)
            program = entry.program
            inputs = [_rank_state(host, program, n, scattered) for n in program.state_names] + flat
            outs = _store(host, program.mutated, simulate_graph(program.gm, host.tp, inputs))
            return pytree.tree_unflatten(_join(outs), program.out_spec)
        outs = []
        # each chunk writes the buffers before the next reads them, as microbatches do on a mesh
        for chunk_args, chunk_kwargs in chunk_batch(args, kwargs, self.step_chunks(host)):
            entry, flat = host._program_for(chunk_args, chunk_kwargs)
            last = simulate_stages(
                entry.stages,
                host.tp,
                lambda n, p=entry.program: _rank_state(host, p, n, scattered),
                flat,
                lambda names, values: _store(host, names, values),
            )
            outs.append(_join(last))
        return pytree.tree_unflatten(merge_chunk_outputs(outs), entry.program.out_spec)

    def train_step(self, host: Host, args: tuple, kwargs: dict, target: Any) -> torch.Tensor:
        loss = loss_of(host, self.simulate(host, args, kwargs), target)
        loss.backward()
        return loss.detach()

    def eval_step(self, host: Host, args: tuple, kwargs: dict, target: Any) -> torch.Tensor:
        return loss_of(host, host(*args, **kwargs), target).detach()

    def sync_grads(self, host: Host) -> None:
        # tied weights are one tensor and dp replicas are one batch here: nothing to sync
        return None

    def gather_full(self, host: Host, name: str, local: torch.Tensor) -> torch.Tensor:
        return local.detach().clone()

    def optimizer(
        self, params: list[torch.nn.Parameter], optimizer_class: type, *, zero: bool, **kwargs
    ) -> torch.optim.Optimizer:
        return optimizer_class(params, **kwargs)  # no dp group to shard the state over

    def save_checkpoint(self, host: Host, directory: Path) -> None:
        tensors = checkpoint_tensors(host)
        write_checkpoint(
            host,
            directory,
            tensors,
            stage=0,
            writer=True,
            everyone=[(0, sorted(tensors))],
            n_files=1,
            index_writer=True,
        )


def _store(host: Host, names: list[str], outs: list) -> list:
    """Store the new values of the buffers a program wrote (every rank's must agree: a buffer is
    replicated) and return the other outputs."""
    written, rest = split_written(names, outs)
    agreed = []
    for name, value in zip(names, written):
        first = value[0] if isinstance(value, PerRank) else value
        if isinstance(value, PerRank) and not all(torch.equal(first, v) for v in value[1:]):
            raise RuntimeError(
                f"the tp ranks computed different new values of buffer '{name}'; it is "
                "replicated, so they must agree: this is a bug of the plan, please report it"
            )
        agreed.append(first)
    store_written(host.get_buffer, names, agreed)
    return rest


def _rank_state(host: Host, program: CapturedProgram, name: str, cache: dict) -> PerRank:
    """Each rank's piece of a parameter (scattered once per call, so tied uses share a gradient);
    a buffer the program writes is read afresh (a copy) by every program run."""
    if name in program.mutated:
        return PerRank([read_for_write(state_value(host, program, name))] * host.tp)
    if name not in cache:
        value = state_value(host, program, name)
        if name in host.full_shapes:
            cache[name] = scatter_to_ranks(
                value,
                host.placements[name],
                host.tp,
                host.plan.blocks.get(name, 1),
                host.padded.get(name),
            )
        else:
            cache[name] = PerRank([value] * host.tp)
    return cache[name]
