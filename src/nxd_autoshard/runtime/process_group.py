"""ProcessGroupRuntime: this process is one rank of a (dp, pp, tp) mesh of torch.distributed groups.

Parameters are this rank's shards of its stages' weights; programs run with real collectives,
pipelined steps on torch.distributed.pipelining schedules, and gradients of tied weights and dp
replicas are all-reduced after each step.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from nxd_autoshard.ir.placements import Replicate, Shard, shard_tensor, unshard_tensor
from nxd_autoshard.runtime.base import (
    Host,
    LocalState,
    Runtime,
    checkpoint_tensors,
    loss_of,
    read_state,
    state_value,
    store_written,
    write_checkpoint,
)
from nxd_autoshard.runtime.collectives import axis_groups
from nxd_autoshard.runtime.compiled import CompileOptions
from nxd_autoshard.runtime.groups import MeshGroups
from nxd_autoshard.runtime.pipeline import (
    StageModule,
    build_schedule,
    chunk_batch,
    stage_ranks,
    unpack_last_outputs,
)
from nxd_autoshard.runtime.recompute import with_recompute

if TYPE_CHECKING:
    from nxd_autoshard.compiler.driver import LocalProgram
    from nxd_autoshard.ir.program import StageProgram

__all__ = ["ProcessGroupRuntime"]


class ProcessGroupRuntime(Runtime):
    """One rank of a mesh: `groups` (built from the world), or only a tp `group` the user gave.

    With `group=` alone there is no pp or dp axis (autoshard refuses pp/dp then), and the
    checkpoint is written as without a mesh: every rank writes the same full file.
    """

    def __init__(
        self,
        groups: MeshGroups | None = None,
        *,
        group=None,
        compile: CompileOptions | None = None,
    ):
        if (groups is None) == (group is None):
            raise ValueError("ProcessGroupRuntime needs the mesh's groups or a tp group, not both")
        self.groups = groups
        self.compile = compile
        self.group = groups.tp if groups is not None else group
        self.rank = dist.get_rank(self.group)
        self.tied: list[tuple[object, list[str]]] = []  # (group, params) summed across stages

    # ------------------------------------------------------------------ placement
    def local_stages(self, host: Host) -> list[int]:
        if self.groups is None:
            return list(range(host.pipeline.n_stages))
        mine = self.groups.coord("pp")
        return [s for s, r in enumerate(_stage_ranks(host)) if r == mine]

    def local_state(self, host: Host, entry: LocalProgram | None) -> LocalState | None:
        if entry is None:
            return None  # this rank's pieces are the plan's: installed at the first capture
        full, buffers = host.tensors.parameters, host.tensors.buffers
        held = set(full)
        if entry.stages is not None and self.groups is not None:
            held = {n for s in self.local_stages(host) for n in entry.stages[s].state_names}
            held_ids = {id(full[n]) for n in held if n in full}
            held |= {n for n, p in full.items() if id(p) in held_ids}  # tied aliases
            self.tied = self._tied_groups(host, entry.stages)
        state = LocalState(keep_full=False)  # the full weights are no longer needed on this rank
        pieces: dict[int, torch.nn.Parameter] = {}
        for name, p in full.items():
            if name not in held:
                continue
            if id(p) not in pieces:
                piece = shard_tensor(
                    p.detach(),
                    host.placements[name],
                    host.tp,
                    self.rank,
                    host.plan.blocks.get(name, 1),
                    host.padded.get(name),
                )
                pieces[id(p)] = torch.nn.Parameter(piece.clone(), requires_grad=p.requires_grad)
            state.parameters[name] = pieces[id(p)]
        for name, buf in buffers.items():
            if entry.stages is None or name in held or self.groups is None:
                state.buffers[name] = buf
        return state

    def _tied_groups(
        self, host: Host, stages: list[StageProgram]
    ) -> list[tuple[object, list[str]]]:
        """Process groups joining the pp ranks that hold one parameter (e.g. tied embeddings)."""
        where = _stage_ranks(host)
        holders: dict[str, set[int]] = {}
        for stage in stages:
            for name in stage.state_names:
                if name in host.full_shapes:
                    holders.setdefault(name, set()).add(where[stage.index])
        shared: dict[tuple[int, ...], list[str]] = {}
        for name, ranks in holders.items():
            if len(ranks) > 1:
                shared.setdefault(tuple(sorted(ranks)), []).append(name)
        mesh, me = host.mesh, self.groups.rank
        out = []
        for pp_ranks in sorted(shared):  # every rank creates every group, in the same order
            for d in range(mesh.dp):
                for t in range(mesh.tp):
                    ranks = [mesh.rank(dp=d, pp=p, tp=t) for p in pp_ranks]
                    group = dist.new_group(ranks)
                    if me in ranks:
                        out.append((group, shared[pp_ranks]))
        return out

    def step_chunks(self, host: Host) -> int:
        # train_step gets this dp replica's batch: only the microbatches are cut here
        return host.pipeline.microbatches

    # ------------------------------------------------------------------ running
    def forward(self, host: Host, args: tuple, kwargs: dict) -> Any:
        if host.pipeline.n_stages > 1:
            raise RuntimeError(
                "this rank holds pipeline stage(s) "
                f"{self.local_stages(host)} of {host.pipeline.n_stages}, not the whole "
                "model: run a step with sharded.train_step(*inputs, **kwargs)"
            )
        entry, flat = host._program_for(args, kwargs)
        program = entry.program
        state = [
            read_state(n, state_value(host, program, n), program.mutated)
            for n in program.state_names
        ]
        with axis_groups({"tp": self.group}):
            outs = self._runnable(program.gm)(*state, *flat)
        outs = store_written(host.get_buffer, program.mutated, outs)
        return pytree.tree_unflatten(outs, program.out_spec)

    def _runnable(self, gm: torch.fx.GraphModule):
        """The program as this rank runs it: its recomputed regions under checkpoints, compiled
        (autoshard's compile=) or as it is."""
        gm = with_recompute(gm)
        # gm.forward, not gm: a module stored on a pipeline StageModule would become its submodule
        return gm.forward if self.compile is None else self.compile(gm)

    def simulate(self, host: Host, args: tuple, kwargs: dict) -> Any:
        raise RuntimeError(
            "simulate() runs the all-rank program; this module is one rank's "
            "(it was built inside a process group): call it directly instead"
        )

    def train_step(self, host: Host, args: tuple, kwargs: dict, target: Any) -> torch.Tensor:
        kwargs = host._cache.with_defaults(kwargs)
        m = host.pipeline.microbatches
        if host.pipeline.n_stages == 1:
            total = torch.zeros(())
            chunks = chunk_batch(args, kwargs, m) if m > 1 else [(args, kwargs)]
            targets = (
                target.chunk(m) if isinstance(target, torch.Tensor) and m > 1 else [target] * m
            )
            for (a, k), t in zip(chunks, targets):
                loss = loss_of(host, host(*a, **k), t) / m
                loss.backward()
                total += loss.detach()
        else:
            total = self._pipeline_step(host, args, kwargs, target)
        self.sync_grads(host)
        return self._dp_mean(host, total)

    def eval_step(self, host: Host, args: tuple, kwargs: dict, target: Any) -> torch.Tensor:
        if self.groups is None or host.pipeline.n_stages == 1:
            loss = loss_of(host, host(*args, **kwargs), target)
        else:
            loss = self._pipeline_step(
                host, tuple(args), host._cache.with_defaults(kwargs), target, backward=False
            )
        return self._dp_mean(host, loss).detach()

    def _dp_mean(self, host: Host, loss: torch.Tensor) -> torch.Tensor:
        """The loss averaged over data-parallel replicas (in place)."""
        if self.groups is not None and host.mesh.dp > 1:
            dist.all_reduce(loss, group=self.groups.dp)
            loss /= host.mesh.dp
        return loss

    def _pipeline_step(
        self, host: Host, args: tuple, kwargs: dict, target, backward: bool = True
    ) -> torch.Tensor:
        m = host.pipeline.microbatches
        first_args, first_kwargs = chunk_batch(args, kwargs, m)[0]
        entry, _ = host._program_for(first_args, first_kwargs)
        if entry.runtime is None:
            entry.runtime = self._build_schedule(host, entry)
        schedule, local = entry.runtime
        flat = [x for x in host._cache.flatten(entry, args, kwargs) if isinstance(x, torch.Tensor)]
        losses: list[torch.Tensor] = []
        # the schedule hands each microbatch's target to loss_fn; a dummy one when the model
        # has its own loss
        target = target if target is not None else torch.zeros(m)
        # outputs stay per microbatch: the losses come back through `losses`
        inputs = flat if 0 in local else ()
        if backward:
            schedule.step(*inputs, target=target, losses=losses)
        else:
            schedule.eval(*inputs, target=target, losses=losses)
        last = host.pipeline.n_stages - 1
        total = (
            torch.stack([x.detach() for x in losses]).sum() if last in local else torch.zeros(())
        )
        src = host.mesh.rank(
            dp=self.groups.coord("dp"), tp=self.groups.coord("tp"), pp=_stage_ranks(host)[last]
        )
        dist.broadcast(total, src=src, group=self.groups.pp)
        return total

    def _build_schedule(self, host: Host, entry: LocalProgram):
        local = self.local_stages(host)
        state = {
            n: state_value(host, entry.program, n)
            for s in local
            for n in entry.stages[s].state_names
        }
        modules = [
            StageModule(
                entry.stages[s],
                state,
                set(host.full_shapes),
                self.group,
                run=self._runnable(entry.stages[s].gm),
            )
            for s in local
        ]
        m = host.pipeline.microbatches

        def loss_fn(outputs, target):
            flat = unpack_last_outputs(outputs, entry.stages[-1])
            return loss_of(host, pytree.tree_unflatten(flat, entry.program.out_spec), target) / m

        schedule = build_schedule(
            modules,
            local,
            host.pipeline.n_stages,
            self.groups.pp,
            host.tensors.device,
            m,
            host.pipeline.schedule,
            loss_fn,
        )
        return schedule, local

    # ------------------------------------------------------------------ gradients and state
    def sync_grads(self, host: Host) -> None:
        if self.groups is None:
            return
        for group, names in self.tied:
            for name in names:
                param = host.get_parameter(name)
                if param.grad is None:  # every holder must join the collective
                    param.grad = torch.zeros_like(param)
                dist.all_reduce(param.grad, group=group)
        if host.mesh.dp > 1:
            seen = set()
            for p in host.parameters():
                if p.grad is not None and id(p) not in seen:
                    seen.add(id(p))
                    dist.all_reduce(p.grad, group=self.groups.dp)
                    p.grad /= host.mesh.dp

    def gather_full(self, host: Host, name: str, local: torch.Tensor) -> torch.Tensor:
        p = host.placements.get(name, Replicate())
        if not isinstance(p, Shard):
            return local.detach().clone()
        parts = [torch.empty_like(local) for _ in range(host.tp)]
        dist.all_gather(parts, local.detach().contiguous(), group=self.group)
        blocks = host.plan.blocks.get(name, 1)
        # the vocab padding is dropped
        return unshard_tensor(list(parts), p, blocks, host.full_shapes[name][p.dim])

    def optimizer(
        self, params: list[torch.nn.Parameter], optimizer_class: type, *, zero: bool, **kwargs
    ) -> torch.optim.Optimizer:
        if not zero or self.groups is None or self.groups.mesh.dp == 1:
            return optimizer_class(params, **kwargs)
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(
            params, optimizer_class=optimizer_class, process_group=self.groups.dp, **kwargs
        )

    def save_checkpoint(self, host: Host, directory: Path) -> None:
        tensors = checkpoint_tensors(host)  # a tp collective: every rank takes part
        if (
            self.groups is None
        ):  # a tp group alone: every rank holds the whole model's gathered weights
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
            return
        where = self.groups.mesh.coords(self.groups.rank)
        writer = where["dp"] == 0 and where["tp"] == 0
        mine = (where["pp"], sorted(tensors) if writer else [])
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        write_checkpoint(
            host,
            directory,
            tensors,
            stage=where["pp"],
            writer=writer,
            everyone=everyone,
            n_files=host.mesh.pp,
            index_writer=self.groups.rank == 0,
        )
        dist.barrier()


def _stage_ranks(host: Host) -> list[int]:
    """The pp rank that runs each stage."""
    return stage_ranks(host.pipeline.pp, host.pipeline.virtual, host.pipeline.schedule)
