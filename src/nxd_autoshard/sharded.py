"""`autoshard()` and the ShardedModule it returns: capture, plan, propagate, partition, run."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from .capture import CapturedProgram, _default_kwargs, capture, input_signature, meta_shadow
from .collectives import axis_groups
from .errors import DivisibilityError
from .graph_passes import drop_assertions, retarget_device, run_pass, split_bias
from .partition import partition, shard_tensor
from .placements import Placement, Replicate, Shard
from .plans import load_plan, resolve_styles
from .propagate import PropagationResult, propagate_placements
from .simulate import PerRank, scatter_to_ranks, simulate_graph

__all__ = ["autoshard", "ShardedModule"]


@dataclass
class LocalProgram:
    """One captured and partitioned program (per call signature and train/eval mode)."""

    program: CapturedProgram
    result: PropagationResult
    kwarg_order: list[str]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _attach(root: torch.nn.Module, fqn: str, value: torch.Tensor, *, parameter: bool, persistent: bool = True):
    *path, leaf = fqn.split(".")
    mod = root
    for part in path:
        child = mod._modules.get(part)
        if child is None:
            child = torch.nn.Module()
            mod.add_module(part, child)
        mod = child
    if parameter:
        mod.register_parameter(leaf, value)
    else:
        mod.register_buffer(leaf, value, persistent=persistent)


class _ReplicaJoin(torch.autograd.Function):
    """Rank 0's copy of a replicated output; backward hands the gradient to every rank."""

    @staticmethod
    def forward(ctx, *xs):
        ctx.n = len(xs)
        return xs[0].clone()

    @staticmethod
    def backward(ctx, grad):
        return tuple(grad for _ in range(ctx.n))


class ShardedModule(torch.nn.Module):
    """A model rewritten for tensor parallelism; parameters keep their original names.

    With a process group, parameters are this rank's shards and forward runs the local
    program with real collectives. Without one, parameters are the full tensors and
    forward (or `simulate`) runs every rank in one process with emulated collectives.
    """

    def __init__(self, model: torch.nn.Module, *, tp: int, styles: dict[str, str], auto: bool,
                 group=None):
        super().__init__()
        self.tp = tp
        self.group = group
        self.rank = dist.get_rank(group) if group is not None else None
        self._styles = styles
        self._auto = auto
        self._shadow = [meta_shadow(model)]  # in a list: not a registered submodule
        self._model_name = type(model).__name__
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
        program = capture(self._shadow[0], args, kwargs, training=self.training, device=self._device())
        history = program.history
        program.gm = run_pass(history, drop_assertions, program.gm)
        program.gm = run_pass(history, split_bias, program.gm)
        result = self._decide(program)
        before = sum(1 for n in program.gm.graph.nodes if n.op == "call_function")
        partition(program, result, self.tp)
        after = sum(1 for n in program.gm.graph.nodes if n.op == "call_function")
        history.append(("partition", before, after))
        device = self._device()
        program.gm = run_pass(history, retarget_device, program.gm, device)
        kwarg_order = list(_default_kwargs(self._shadow[0], dict(kwargs)).keys())
        return LocalProgram(program, result, kwarg_order)

    def _device(self) -> torch.device:
        for t in list(self._full.values()) + list(self._buffers_full.values()):
            return t.device
        return torch.device("cpu")

    def _decide(self, program: CapturedProgram) -> PropagationResult:
        """Propagate, dropping auto/plan column choices that a later op would have to gather."""
        first = not self.placements
        styles = dict(self._styles)
        veto: set[str] = set()
        for _ in range(8):
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
            veto |= set(failed)
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
        self._install_state()

    def _install_state(self) -> None:
        local: dict[int, torch.nn.Parameter] = {}
        for name, full in self._full.items():
            if id(full) not in local:
                if self.group is None:
                    local[id(full)] = full
                else:
                    piece = shard_tensor(full.detach(), self.placements[name], self.tp, self.rank,
                                         self.blocks.get(name, 1), self.padded.get(name))
                    local[id(full)] = torch.nn.Parameter(piece.clone(), requires_grad=full.requires_grad)
            _attach(self, name, local[id(full)], parameter=True)
        for name, buf in self._buffers_full.items():
            _attach(self, name, buf, parameter=False, persistent=name in self._persistent)
        if self.group is not None:
            self._full = {}  # the full weights are no longer needed on this rank

    # ------------------------------------------------------------------ running
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
        if self.group is None:
            return self.simulate(*args, **kwargs)
        entry, flat = self._program_for(args, kwargs)
        program = entry.program
        state = [self._state_value(program, n) for n in program.state_names]
        with axis_groups({"tp": self.group}):
            outs = program.gm(*state, *flat)
        return pytree.tree_unflatten(list(outs), program.out_spec)

    def simulate(self, *args, **kwargs):
        """Run all tp ranks in this process with emulated collectives; returns the model's output."""
        if self.group is not None:
            raise RuntimeError("simulate() runs the all-rank program; this module is one rank's "
                               "(it was built inside a process group): call it directly instead")
        entry, flat = self._program_for(args, kwargs)
        program = entry.program
        inputs = []
        for name in program.state_names:
            value = self._state_value(program, name)
            if name in self._full_shapes:
                inputs.append(scatter_to_ranks(value, self.placements[name], self.tp,
                                               self.blocks.get(name, 1), self.padded.get(name)))
            else:
                inputs.append(PerRank([value] * self.tp))
        inputs += flat
        outs = simulate_graph(program.gm, self.tp, inputs)
        joined = [
            _ReplicaJoin.apply(*o) if isinstance(o, PerRank) and isinstance(o[0], torch.Tensor)
            else (o[0] if isinstance(o, PerRank) else o)
            for o in outs
        ]
        return pytree.tree_unflatten(joined, program.out_spec)

    # ------------------------------------------------------------------ inspection
    def programs(self) -> list[CapturedProgram]:
        """Every captured local program (one per call signature and train/eval mode)."""
        return [e.program for entries in self._programs.values() for e in entries]

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        """The local program of the first captured call."""
        return self.programs()[0].gm

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


def _tp_group(tp: int, group):
    if group is not None:
        if dist.get_world_size(group) != tp:
            raise ValueError(f"the given process group has {dist.get_world_size(group)} ranks, not tp={tp}")
        return group
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    if world == tp:
        return dist.group.WORLD
    if world % tp:
        raise ValueError(f"the world has {world} ranks, which tp={tp} does not divide; launch "
                         f"a multiple of {tp} ranks or pass group=")
    mine = None
    for start in range(0, world, tp):  # NxD rank order: tp varies fastest
        g = dist.new_group(list(range(start, start + tp)))
        if start <= dist.get_rank() < start + tp:
            mine = g
    return mine


def autoshard(
    model: torch.nn.Module,
    tp: int = 1,
    *,
    example_inputs: tuple = (),
    example_kwargs: Mapping[str, Any] | None = None,
    plan: str | Mapping[str, str] = "auto",
    auto: bool | None = None,
    group=None,
    pp: int = 1,
    dp: int = 1,
) -> ShardedModule:
    """Shard an unmodified model for tensor parallelism (tp ranks); see the README for the contract.

    plan: "auto" (infer), a dict {module pattern: style}, a YAML path, or a family name
    ("llama", "gpt2", ...); rules win over inference, which fills in the rest unless auto=False.
    """
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be a positive integer, got {tp!r}")
    if pp != 1 or dp != 1:
        raise NotImplementedError("pipeline (pp) and data (dp) parallelism are not implemented yet; "
                                  "use tp alone for now")
    if not example_inputs and not example_kwargs:
        raise ValueError("autoshard needs example inputs to capture the model: "
                         "autoshard(model, tp, example_inputs=(input_ids,))")
    rules = {} if plan == "auto" else load_plan(plan)
    styles = resolve_styles(model, rules)
    auto = (plan == "auto" or isinstance(plan, Mapping)) if auto is None else auto
    sharded = ShardedModule(model, tp=tp, styles=styles, auto=auto, group=_tp_group(tp, group))
    sharded._program_for(tuple(example_inputs), dict(example_kwargs or {}))
    return sharded
