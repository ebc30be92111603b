"""Run every TP rank of a local program in one process, with exact emulated collectives.

Each value is a list with one tensor per rank; ordinary ops run rank by rank, collectives
run as multi-rank autograd functions whose forward and backward mirror the real ones in
`collectives`, so `loss.backward()` through a simulation gives each rank's gradients.
"""

from __future__ import annotations

import torch
import torch.fx
from torch.utils.checkpoint import checkpoint

from nxd_autoshard.ir import ops as C
from nxd_autoshard.ir.placements import Placement, Shard, shard_tensor, unshard_tensor
from nxd_autoshard.runtime.collectives import (
    AmaxAllReduce,
    LogsumexpAllReduce,
    MaxDimAllReduce,
    argmax_forward,
    draw_mask,
    dropout_part,
    local_vocab_embedding,
    reduce_loss,
)
from nxd_autoshard.runtime.recompute import Recompute, with_recompute

__all__ = ["PerRank", "simulate_graph", "scatter_to_ranks", "trace_collectives"]


_TRACE: list | None = None


class trace_collectives:
    """Record every emulated collective as (kind, phase, shape, bytes per rank) while active.

    `with trace_collectives() as log: out = sharded.simulate(...); out.loss.backward()`
    """

    def __enter__(self) -> list:
        global _TRACE
        self._saved, _TRACE = _TRACE, []
        return _TRACE

    def __exit__(self, *exc) -> None:
        global _TRACE
        _TRACE = self._saved


def _record(kind: str, phase: str, tensor: torch.Tensor) -> None:
    if _TRACE is not None:
        _TRACE.append((kind, phase, tuple(tensor.shape), tensor.numel() * tensor.element_size()))


class PerRank(list):
    """One value per rank."""


def _cat(parts, dim):
    return torch.cat(list(parts), dim=dim)


class _SimAllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *xs):
        _record("all_reduce", "forward", xs[0])
        total = torch.stack(xs).sum(0)
        return tuple(total.clone() for _ in xs)

    @staticmethod
    def backward(ctx, *grads):
        return grads


class _SimGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dim, *xs):
        _record("all_gather", "forward", xs[0])
        ctx.dim, ctx.n = dim, len(xs)
        full = _cat(xs, dim)
        return tuple(full.clone() for _ in xs)

    @staticmethod
    def backward(ctx, *grads):
        return (None, *(g.chunk(ctx.n, ctx.dim)[r].contiguous() for r, g in enumerate(grads)))


class _SimGatherRS(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dim, *xs):
        _record("all_gather", "forward", xs[0])
        ctx.dim = dim
        full = _cat(xs, dim)
        return tuple(full.clone() for _ in xs)

    @staticmethod
    def backward(ctx, *grads):
        _record("reduce_scatter", "backward", grads[0])
        total = torch.stack(grads).sum(0)
        return (None, *(c.contiguous() for c in total.chunk(len(grads), ctx.dim)))


class _SimReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dim, *xs):
        _record("reduce_scatter", "forward", xs[0])
        ctx.dim = dim
        total = torch.stack(xs).sum(0)
        return tuple(c.contiguous() for c in total.chunk(len(xs), dim))

    @staticmethod
    def backward(ctx, *grads):
        _record("all_gather", "backward", grads[0])
        full = _cat(grads, ctx.dim)
        return (None, *(full.clone() for _ in grads))


class _SimShard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dim, *xs):
        ctx.dim = dim
        return tuple(x.chunk(len(xs), dim)[r].contiguous() for r, x in enumerate(xs))

    @staticmethod
    def backward(ctx, *grads):
        _record("all_gather", "backward", grads[0])
        full = _cat(grads, ctx.dim)
        return (None, *(full.clone() for _ in grads))


class _SimGradAllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *xs):
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        _record("all_reduce", "backward", grads[0])
        total = torch.stack(grads).sum(0)
        return tuple(total.clone() for _ in grads)


class _SimVocabCrossEntropy(torch.autograd.Function):
    """Per-token losses from vocab-sharded logits; each rank's backward uses its own grad only."""

    @staticmethod
    def forward(ctx, target, ignore_index, vocab_size, *logits):
        per_token = torch.empty(
            target.shape, dtype=torch.float32, device="meta"
        )  # real ones reduce fp32
        for kind in ("all_reduce(max)", "all_reduce", "all_reduce"):
            _record(kind, "forward", per_token)
        full = _cat([x.float() for x in logits], -1)
        if full.shape[-1] > vocab_size:
            full = full.clone()
            full[..., vocab_size:] = float("-inf")
        logp = torch.log_softmax(full, -1)
        safe = target.masked_fill(target == ignore_index, 0)
        loss = -logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
        ignored = target == ignore_index
        loss = loss.masked_fill(ignored, 0.0)
        grad_full = logp.exp()
        grad_full.scatter_add_(-1, safe.unsqueeze(-1), -torch.ones_like(loss).unsqueeze(-1))
        ctx.save_for_backward(grad_full, ignored)
        ctx.n, ctx.dtypes = len(logits), [x.dtype for x in logits]
        return tuple(loss.clone() for _ in logits)

    @staticmethod
    def backward(ctx, *grads):
        grad_full, ignored = ctx.saved_tensors
        pieces = grad_full.chunk(ctx.n, -1)
        out = []
        for r, g in enumerate(grads):
            scale = (g * (~ignored)).unsqueeze(-1)
            out.append((pieces[r] * scale).to(ctx.dtypes[r]))
        return (None, None, None, *out)


class _Stacked:
    """The lowering of the sharded reductions (`collectives.AmaxAllReduce`, ...) over every
    rank's value stacked on a new leading dim: a reduction over the ranks is one over that dim,
    so the simulator runs the very code the ranks run."""

    _REDUCE = {"sum": torch.sum, "max": torch.amax, "min": torch.amin}

    def __init__(self, tp: int):
        self.tp = tp

    def reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        # inside a backward, autograd has a current node
        phase = "forward" if torch._C._current_autograd_node() is None else "backward"
        _record("all_reduce" if op == "sum" else f"all_reduce({op})", phase, x[0])
        return self._REDUCE[op](x, 0, keepdim=True).expand_as(x).clone()

    def offset(self, n: int, ndim: int) -> torch.Tensor:
        return torch.arange(self.tp).view(-1, *[1] * (ndim - 1)) * n


def _sim_reduction(target, x: PerRank, args, tp: int):
    """A sharded reduction on all ranks at once, its dims shifted past the stacking dim."""
    stacked, low = torch.stack(list(x)), _Stacked(tp)
    dims, keepdim = args[1], args[2]
    padding = args[-2] if args[-2] is None else (args[-2][0] + 1, args[-2][1])
    if target is C.logsumexp_all_reduce:
        dims = tuple(d + 1 for d in dims)
        return PerRank(LogsumexpAllReduce.apply(stacked, dims, keepdim, padding, low).unbind(0))
    op = args[3]
    if target is C.amax_all_reduce:
        dims = tuple(d + 1 for d in dims)
        return PerRank(AmaxAllReduce.apply(stacked, dims, keepdim, op, padding, low).unbind(0))
    dim = dims + 1
    if target is C.argmax_all_reduce:
        return PerRank(argmax_forward(stacked, dim, keepdim, op, padding, low).unbind(0))
    values, index = MaxDimAllReduce.apply(stacked, dim, keepdim, op, padding, low)
    return PerRank(values.unbind(0)), PerRank(index.unbind(0))


def _sim_collective(target, args, tp: int):
    x = args[0] if isinstance(args[0], PerRank) else PerRank([args[0]] * tp)
    if target is C.all_reduce:
        return PerRank(_SimAllReduce.apply(*x))
    if target is C.all_gather:
        return PerRank(_SimGather.apply(args[1], *x))
    if target is C.all_gather_rs:
        return PerRank(_SimGatherRS.apply(args[1], *x))
    if target is C.reduce_scatter:
        return PerRank(_SimReduceScatter.apply(args[1], *x))
    if target is C.shard:
        return PerRank(_SimShard.apply(args[1], *x))
    if target is C.grad_all_reduce:
        return PerRank(_SimGradAllReduce.apply(*x))
    if target in C.REDUCTIONS:
        return _sim_reduction(target, x, args, tp)
    if target is C.sequence_dropout:
        p, dim, native = args[1], args[2], args[4] if len(args) > 4 else False
        length = _at(args[5], 0) if len(args) > 5 else None  # a dynamic length: every rank's
        mask = draw_mask(x[0], p, dim, tp, length)  # one draw for the whole value, as every rank
        parts = [dropout_part(x[r], p, dim, r, tp, mask) for r in range(tp)]
        if native:
            return tuple(PerRank(part[i] for part in parts) for i in range(2))
        return PerRank(part[0] for part in parts)
    if target is C.vocab_parallel_embedding:
        weight, ids, padding_idx, vocab = args[0], args[1], args[2], args[3]
        return PerRank(
            local_vocab_embedding(weight[r], _at(ids, r), padding_idx, r, tp, vocab)
            for r in range(tp)
        )
    if target is C.vocab_parallel_cross_entropy:
        logits, target_ids, reduction, ignore, vocab = (
            args[0],
            _at(args[1], 0),
            args[2],
            args[3],
            args[4],
        )
        losses = _SimVocabCrossEntropy.apply(target_ids, ignore, vocab, *logits)
        return PerRank(reduce_loss(loss, target_ids, reduction, ignore) for loss in losses)
    raise KeyError(target)


SIMULATED = set(C.PARALLEL_OPS)


def _at(value, rank: int):
    if isinstance(value, PerRank):
        return value[rank]
    if isinstance(value, (list, tuple)):
        return type(value)(_at(v, rank) for v in value)
    if isinstance(value, dict):
        return {k: _at(v, rank) for k, v in value.items()}
    return value


def simulate_graph(gm: torch.fx.GraphModule, tp: int, per_rank_inputs: list) -> list:
    """Run `gm` for all ranks in lockstep; inputs and outputs are PerRank lists (or shared values).

    Regions marked for recompute run under a checkpoint (`runtime/recompute.py`).
    """
    gm = with_recompute(gm)
    env: dict[torch.fx.Node, object] = {}
    placeholders = iter(per_rank_inputs)
    result = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = next(placeholders)
        elif node.op == "call_function":
            args = torch.fx.node.map_arg(node.args, lambda n: env[n])
            kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env[n])
            if node.target in SIMULATED:
                env[node] = _sim_collective(node.target, args, tp)
            else:
                env[node] = PerRank(node.target(*_at(args, r), **_at(kwargs, r)) for r in range(tp))
        elif node.op == "call_module":
            args = torch.fx.node.map_arg(node.args, lambda n: env[n])
            env[node] = _simulate_recompute(gm.get_submodule(node.target), tp, args)
        elif node.op == "get_attr":
            env[node] = getattr(gm, node.target)
        elif node.op == "output":
            result = torch.fx.node.map_arg(node.args[0], lambda n: env[n])
        # free values no later node reads
    return result


def _simulate_recompute(region: Recompute, tp: int, args: tuple) -> tuple:
    """All ranks' run of one recomputed region under one checkpoint.

    The checkpoint gets every rank's tensors as its own arguments (not inside PerRank lists),
    so it sees their devices and restores their random state for the recompute.
    """
    flat: list = []
    layout: list[int | None] = []  # tp values of a PerRank argument, None for a shared one
    for a in args:
        if isinstance(a, PerRank):
            layout.append(len(a))
            flat.extend(a)
        else:
            layout.append(None)
            flat.append(a)

    def body(*values):
        it = iter(values)
        ins = [PerRank(next(it) for _ in range(n)) if n is not None else next(it) for n in layout]
        return tuple(simulate_graph(region.body, tp, ins))

    return checkpoint(body, *flat, use_reentrant=False)


class _ScatterToRanks(torch.autograd.Function):
    """Full tensor -> per-rank pieces (zero-padded when `padded` is set); backward assembles the full gradient."""

    @staticmethod
    def forward(ctx, full, placement, tp, blocks, padded):
        ctx.placement, ctx.tp, ctx.blocks = placement, tp, blocks
        ctx.size = full.shape[placement.dim] if isinstance(placement, Shard) else None
        return tuple(
            shard_tensor(full, placement, tp, r, blocks, padded).clone() for r in range(tp)
        )

    @staticmethod
    def backward(ctx, *grads):
        if not isinstance(ctx.placement, Shard):
            return torch.stack(grads).mean(0), None, None, None, None
        # the padding rows' gradient is dropped: the parameter has the original full shape
        full = unshard_tensor(list(grads), ctx.placement, ctx.blocks, ctx.size)
        return full, None, None, None, None


def scatter_to_ranks(
    full: torch.Tensor, placement: Placement, tp: int, blocks=1, padded: int | None = None
) -> PerRank:
    """Differentiable split of a full tensor into each rank's piece (replicas share the gradient).

    padded: global size of the shard dim after zero padding (vocab padding), or None.
    """
    return PerRank(_ScatterToRanks.apply(full, placement, tp, blocks, padded))
