"""Training on a mesh: train/eval steps on torch pipelining schedules, dp and tied-weight
gradient sync, ZeRO-1, and full checkpoints. Mixed into ShardedModule."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from nxd_autoshard.compiler.capture import _default_kwargs
from nxd_autoshard.ir.program import StageProgram
from nxd_autoshard.runtime.pipeline import (
    StageModule,
    build_schedule,
    chunk_batch,
    unpack_last_outputs,
)

if TYPE_CHECKING:
    from nxd_autoshard.compiler.driver import LocalProgram


__all__ = ["TrainingMixin"]


class TrainingMixin:
    """train_step / eval_step / optimizer / sync_grads / save_checkpoint of a ShardedModule."""

    def train_step(self, *args, target=None, **kwargs) -> torch.Tensor:
        """Forward and backward of one batch; returns the loss. Gradients end up in `.grad`, summed
        across pipeline stages for tied weights and averaged across data-parallel replicas.

        On a mesh, `args`/`kwargs` are this data-parallel replica's batch; in simulation they are
        the whole batch. The loss is the model's own (`output.loss`, e.g. with `labels=`) unless
        autoshard got `loss_fn(output, target)`. Call `optimizer.step()` afterwards.
        """
        on_mesh = self.group is not None or self._groups is not None
        if not on_mesh:
            loss = self._loss_from(self.simulate(*args, **kwargs), target)
            loss.backward()
            return loss.detach()
        kwargs = _default_kwargs(self._shadow[0], dict(kwargs))
        m = self.pipeline.microbatches
        if self.pipeline.n_stages == 1:
            total = torch.zeros(())
            chunks = chunk_batch(args, kwargs, m) if m > 1 else [(args, kwargs)]
            targets = target.chunk(m) if isinstance(target, torch.Tensor) and m > 1 else [target] * m
            for (a, k), t in zip(chunks, targets):
                loss = self._loss_from(self(*a, **k), t) / m
                loss.backward()
                total += loss.detach()
        else:
            total = self._pipeline_step(args, kwargs, target)
        self.sync_grads()
        if self._groups is not None and self.mesh.dp > 1:
            dist.all_reduce(total, group=self._groups.dp)
            total /= self.mesh.dp
        return total

    def _pipeline_step(self, args: tuple, kwargs: dict, target, backward: bool = True) -> torch.Tensor:
        m = self.pipeline.microbatches
        first_args, first_kwargs = chunk_batch(args, kwargs, m)[0]
        entry, _ = self._program_for(first_args, first_kwargs)
        if entry.runtime is None:
            entry.runtime = self._build_runtime(entry)
        schedule, local = entry.runtime
        flat = [x for x in self._flatten(entry, args, kwargs) if isinstance(x, torch.Tensor)]
        losses: list[torch.Tensor] = []
        # the schedule hands each microbatch's target to loss_fn; a dummy one when the model has its own loss
        target = target if target is not None else torch.zeros(m)
        # outputs stay per microbatch: the losses come back through `losses`
        inputs = flat if 0 in local else ()
        if backward:
            schedule.step(*inputs, target=target, losses=losses)
        else:
            schedule.eval(*inputs, target=target, losses=losses)
        last = self.pipeline.n_stages - 1
        total = torch.stack([x.detach() for x in losses]).sum() if last in local else torch.zeros(())
        src = self.mesh.rank(dp=self._groups.coord("dp"), tp=self._groups.coord("tp"),
                             pp=self._stage_ranks()[last])
        dist.broadcast(total, src=src, group=self._groups.pp)
        return total

    def _build_runtime(self, entry: LocalProgram):
        local = self._local_stages()
        state = {n: self._state_value(entry.program, n) for s in local for n in entry.stages[s].state_names}
        modules = [StageModule(entry.stages[s], state, set(self._full_shapes), self.group) for s in local]
        m = self.pipeline.microbatches

        def loss_fn(outputs, target):
            flat = unpack_last_outputs(outputs, entry.stages[-1])
            return self._loss_from(pytree.tree_unflatten(flat, entry.program.out_spec), target) / m

        schedule = build_schedule(modules, local, self.pipeline.n_stages, self._groups.pp, self._device(),
                                  m, self.pipeline.schedule, loss_fn)
        return schedule, local

    def _loss_from(self, output, target) -> torch.Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(output, target)
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, torch.Tensor) and output.dim() == 0:
            loss = output
        if loss is None and isinstance(output, (tuple, list)) and output and \
                isinstance(output[0], torch.Tensor) and output[0].dim() == 0:
            loss = output[0]
        if loss is None:
            raise ValueError(f"{self._model_name} returned no loss: pass the labels its forward takes "
                             "(e.g. labels=...) or give autoshard(..., loss_fn=fn(output, target))")
        return loss

    @torch.no_grad()
    def eval_step(self, *args, target=None, **kwargs) -> torch.Tensor:
        """The loss of one batch without backward (pipeline: the schedule's forward-only pass)."""
        if self._groups is None or self.pipeline.n_stages == 1:
            loss = self._loss_from(self(*args, **kwargs), target)
        else:
            loss = self._pipeline_step(tuple(args), _default_kwargs(self._shadow[0], dict(kwargs)),
                                       target, backward=False)
        if self._groups is not None and self.mesh.dp > 1:
            dist.all_reduce(loss, group=self._groups.dp)
            loss /= self.mesh.dp
        return loss.detach()

    def optimizer(self, optimizer_class=torch.optim.AdamW, *, zero: bool = False, **kwargs):
        """An optimizer over this rank's parameters; zero=True shards its state over dp (ZeRO-1,
        torch's ZeroRedundancyOptimizer)."""
        params = list(self.parameters())
        if not zero or self._groups is None or self.mesh.dp == 1:
            return optimizer_class(params, **kwargs)
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(params, optimizer_class=optimizer_class,
                                       process_group=self._groups.dp, **kwargs)

    def sync_grads(self) -> None:
        """Sum gradients of weights shared by stages (tied embeddings), then average them over dp."""
        if self._groups is None:
            return
        for group, names in self._tied:
            for name in names:
                param = self.get_parameter(name)
                if param.grad is None:  # every holder must join the collective
                    param.grad = torch.zeros_like(param)
                dist.all_reduce(param.grad, group=group)
        if self.mesh.dp > 1:
            seen = set()
            for p in self.parameters():
                if p.grad is not None and id(p) not in seen:
                    seen.add(id(p))
                    dist.all_reduce(p.grad, group=self._groups.dp)
                    p.grad /= self.mesh.dp

    def _tied_groups(self, stages: list[StageProgram]) -> list[tuple[object, list[str]]]:
        """Process groups joining the pp ranks that hold the same parameter (e.g. tied embeddings)."""
        where = self._stage_ranks()
        holders: dict[str, set[int]] = {}
        for stage in stages:
            for name in stage.state_names:
                if name in self._full_shapes:
                    holders.setdefault(name, set()).add(where[stage.index])
        shared: dict[tuple[int, ...], list[str]] = {}
        for name, ranks in holders.items():
            if len(ranks) > 1:
                shared.setdefault(tuple(sorted(ranks)), []).append(name)
        mesh, me = self.mesh, self._groups.rank
        out = []
        for pp_ranks in sorted(shared):  # every rank creates every group, in the same order
            for d in range(mesh.dp):
                for t in range(mesh.tp):
                    ranks = [mesh.rank(dp=d, pp=p, tp=t) for p in pp_ranks]
                    group = dist.new_group(ranks)
                    if me in ranks:
                        out.append((group, shared[pp_ranks]))
        return out

    def save_checkpoint(self, directory) -> None:
        """Write the full, unsharded weights as a transformers-style safetensors checkpoint.

        Call it on every rank. Each pipeline stage's first rank (dp 0, tp 0) writes that stage's
        tensors to model-0000k-of-0000n.safetensors (model.safetensors without pipelining);
        global rank 0 writes model.safetensors.index.json and the model's config.json, so
        `AutoModel*.from_pretrained(directory)` and `safetensors.torch.load_file` read it.
        """
        import json
        from pathlib import Path

        from safetensors.torch import save_file

        directory = Path(directory)
        tensors = self.full_state_dict()  # a tp collective: every rank takes part
        tensors.update({n: b.detach().clone() for n, b in self.named_buffers() if n in self._persistent})
        on_mesh = self._groups is not None
        where = self._groups.mesh.coords(self._groups.rank) if on_mesh else {"dp": 0, "pp": 0, "tp": 0}
        writer = where["dp"] == 0 and where["tp"] == 0
        mine = (where["pp"], sorted(tensors) if writer else [])
        everyone = [None] * dist.get_world_size() if on_mesh else [mine]
        if on_mesh:
            dist.all_gather_object(everyone, mine)
        owner: dict[str, int] = {}  # a tied weight held by two stages is written once, by the first
        for stage, names in sorted(everyone):
            for name in names:
                owner.setdefault(name, stage)
        n_files = self.mesh.pp if on_mesh else 1
        file_of = {s: ("model.safetensors" if n_files == 1 else f"model-{s + 1:05d}-of-{n_files:05d}.safetensors")
                   for s in range(n_files)}
        if writer:
            directory.mkdir(parents=True, exist_ok=True)
            own = {n: t.contiguous() for n, t in tensors.items() if owner[n] == where["pp"]}
            save_file(own, directory / file_of[where["pp"]], metadata={"format": "pt"})
        if (not on_mesh or self._groups.rank == 0):
            directory.mkdir(parents=True, exist_ok=True)
            if n_files > 1:
                index = {"metadata": {}, "weight_map": {n: file_of[s] for n, s in sorted(owner.items())}}
                (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
            if self._config is not None:
                self._config.to_json_file(str(directory / "config.json"))
        if on_mesh:
            dist.barrier()

