"""Eager torch.distributed implementations of the ops in `ir.ops`, as Megatron conjugate pairs
with autograd; importing this module binds them.

Gradient convention: the gradient of a Replicate value is the full gradient on every rank,
of a Shard value the rank's chunk of it, of a Partial value the full gradient on every rank.
Each op below keeps that convention in its backward, so autograd of the rewritten forward
gives the right gradients without user code.

| op | forward | backward |
|---|---|---|
| all_reduce | Partial -> Replicate (sum) | identity |
| all_gather | Shard(dim) -> Replicate | local chunk |
| reduce_scatter | Partial -> Shard(dim) | all-gather |
| shard | Replicate -> Shard(dim) (local chunk) | all-gather |
| all_gather_rs | Shard(dim) -> Replicate (sharded consumers) | reduce-scatter |
| grad_all_reduce | identity (Replicate input of a sharded op) | all-reduce |
| amax_all_reduce | local amax/amin, all-reduce max/min | all-reduce (sum) of the tie counts |
| max_dim_all_reduce | local max/min.dim, all-reduce max/min, all-reduce min of the index | local scatter |
| argmax_all_reduce | max_dim_all_reduce's indices | (no gradient) |
| logsumexp_all_reduce | local logsumexp, all-reduce max, all-reduce sum of exp | local |

The graph names a mesh axis ("tp"), never a rank or a group object, so every rank runs the
same program; `axis_groups` binds axes to process groups at run time.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from nxd_autoshard.ir import ops

__all__ = [
    "AmaxAllReduce",
    "LogsumexpAllReduce",
    "MaxDimAllReduce",
    "all_gather",
    "all_reduce",
    "amax_all_reduce",
    "argmax_all_reduce",
    "argmax_forward",
    "axis_groups",
    "bound_groups",
    "grad_all_reduce",
    "logsumexp_all_reduce",
    "max_dim_all_reduce",
    "max_dim_forward",
    "reduce_scatter",
    "shard",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_embedding",
]


_GROUPS: dict[str, object] = {}


@contextlib.contextmanager
def axis_groups(groups: dict[str, object]) -> Iterator[None]:
    """Bind mesh axes (e.g. {"tp": group}) to process groups while the block runs."""
    saved = dict(_GROUPS)
    _GROUPS.update(groups)
    try:
        yield
    finally:
        _GROUPS.clear()
        _GROUPS.update(saved)


def bound_groups() -> dict[str, object]:
    """The axes bound now (a recompute in backward binds them again, see `recompute.py`)."""
    return dict(_GROUPS)


def _group(axis: str):
    try:
        return _GROUPS[axis]
    except KeyError:
        raise RuntimeError(
            f"no process group is bound to mesh axis '{axis}'; run the sharded module's forward "
            "(it binds its groups), or wrap the call in nxd_autoshard.runtime.collectives.axis_groups(...)"
        ) from None


def _size_rank(group) -> tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


# Under torch.compile the same ops trace instead of run: torch's functional collectives are
# graph ops (c10d_functional.all_reduce ... + wait_tensor) that Dynamo and AOTAutograd keep,
# forward and backward, so a backend sees every collective; the in-place torch.distributed
# calls below are what eager runs (no AsyncCollectiveTensor wrapper, no funcol warm-up).
_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
# torch 2.13 renamed all_gather_tensor (deprecated there) to all_gather_single
_all_gather_functional = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
_reduce_scatter_functional = (
    getattr(funcol, "reduce_scatter_single", None) or funcol.reduce_scatter_tensor
)


def _reduce(x: torch.Tensor, group, op: str = "sum") -> torch.Tensor:
    if torch.compiler.is_compiling():
        return funcol.all_reduce(x, op, group)
    x = x.contiguous().clone()
    dist.all_reduce(x, op=_REDUCE_OPS[op], group=group)
    return x


def _gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return _all_gather_functional(x.contiguous(), dim, group)
    size, _ = _size_rank(group)
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return _reduce_scatter_functional(x.contiguous(), "sum", dim, group)
    return _chunk(_reduce(x, group), dim, group)


def _chunk(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    size, rank = _size_rank(group)
    return x.chunk(size, dim=dim)[rank].contiguous()


class GroupLowering:
    """The primitives the conjugate collectives below are written in, for one process
    group: torch.distributed eagerly, functional collectives under torch.compile. The XLA
    runtime supplies its own (`runtime/xla.py`), with the same methods."""

    def __init__(self, group):
        self.group = group

    def reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return _reduce(x, self.group, op)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return _gather(x, dim, self.group)

    def reduce_scatter(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return _reduce_scatter(x, dim, self.group)

    def chunk(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return _chunk(x, dim, self.group)

    def offset(self, n: int, ndim: int):
        """The global index of this rank's first entry along a dim of local size n, to add to
        an index of `ndim` dims."""
        return _size_rank(self.group)[1] * n


# Megatron's conjugate pairs, each an autograd function over a lowering `low`: the forward
# collective, and the one its gradient needs
class AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, low):
        return low.reduce(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, low):
        ctx.dim, ctx.low = dim, low
        return low.gather(x, dim)

    @staticmethod
    def backward(ctx, grad):
        return ctx.low.chunk(grad, ctx.dim), None, None


class AllGatherRS(torch.autograd.Function):
    """An all-gather read by sharded ops: its gradient is partial, reduce-scattered back."""

    @staticmethod
    def forward(ctx, x, dim, low):
        ctx.dim, ctx.low = dim, low
        return low.gather(x, dim)

    @staticmethod
    def backward(ctx, grad):
        return ctx.low.reduce_scatter(grad, ctx.dim), None, None


class ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, low):
        ctx.dim, ctx.low = dim, low
        return low.reduce_scatter(x, dim)

    @staticmethod
    def backward(ctx, grad):
        return ctx.low.gather(grad, ctx.dim), None, None


class Shard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, low):
        ctx.dim, ctx.low = dim, low
        return low.chunk(x, dim)

    @staticmethod
    def backward(ctx, grad):
        return ctx.low.gather(grad, ctx.dim), None, None


class GradAllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, low):
        ctx.low = low
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.low.reduce(grad), None


# reductions over a sharded dim: the local reduction, then an all-reduce of the small result;
# written in the same primitives, so the simulator runs them on all ranks stacked (its own
# lowering reduces over the stacking dim) and XLA traces them with its collectives
def _local_extremum(x: torch.Tensor, dims, op: str) -> torch.Tensor:
    return x.amax(dims, keepdim=True) if op == "max" else x.amin(dims, keepdim=True)


def _without_padding(x: torch.Tensor, padding, fill: str, low) -> torch.Tensor:
    """`x` with the entries past the real size of its vocab-padded shard dim set to the value
    no reduction picks (fill "max": the lowest, "min": the highest); `padding`: (dim, size)."""
    if padding is None:
        return x
    dim, size = padding
    n = x.shape[dim]
    columns = torch.arange(n, device=x.device).view([n if d == dim else 1 for d in range(x.dim())])
    # the global column: every rank runs this, its offset read from its rank (one program)
    past = columns + low.offset(n, x.dim()) >= size
    if x.dtype.is_floating_point:
        value = float("-inf") if fill == "max" else float("inf")
    else:
        info = torch.iinfo(x.dtype)
        value = info.min if fill == "max" else info.max
    return x.masked_fill(past, value)


def _restore_dims(t: torch.Tensor, dims, keepdim: bool) -> torch.Tensor:
    """A reduction's result (or its gradient) with the reduced dims back, of size 1."""
    if keepdim:
        return t
    for d in sorted(dims):
        t = t.unsqueeze(d)
    return t


class AmaxAllReduce(torch.autograd.Function):
    """amax/amin over dims one of which is sharded; the gradient is torch's: an equal share to
    every tied extremum, the ties counted over all ranks (an all-reduce of the local counts)."""

    @staticmethod
    def forward(ctx, x, dims, keepdim, op, padding, low):
        x = _without_padding(x, padding, op, low)  # saved so: no padding is a tie
        out = low.reduce(_local_extremum(x, dims, op), op)
        ctx.save_for_backward(x, out)
        ctx.dims, ctx.keepdim, ctx.low = dims, keepdim, low
        return out if keepdim else out.squeeze(dims)

    @staticmethod
    def backward(ctx, grad):
        x, out = ctx.saved_tensors
        mask = x == out
        count = ctx.low.reduce(mask.sum(ctx.dims, keepdim=True).to(grad.dtype))
        # torch's order (scale_grad_by_count): grad / count, then the mask
        grad = _restore_dims(grad, ctx.dims, ctx.keepdim)
        return (grad / count) * mask, None, None, None, None, None


def max_dim_forward(x: torch.Tensor, dim: int, op: str, padding, low):
    """(values, global indices, local indices) of max/min.dim over the sharded `dim`, reduced
    dim kept: the extremum, and the lowest index of it over the ranks that hold it, as torch
    picks the first; the local indices are that index in this rank's piece (outside [0, n) where
    another rank holds it)."""
    x = _without_padding(x, padding, op, low)
    values, index = x.max(dim, keepdim=True) if op == "max" else x.min(dim, keepdim=True)
    best = low.reduce(values, op)
    offset = low.offset(x.shape[dim], index.dim())
    index = index + offset
    # a NaN is the extremum wherever it is (as in torch's max); no index beats a held one
    holds = (values == best) | values.isnan()
    index = low.reduce(index.masked_fill(~holds, torch.iinfo(index.dtype).max), "min")
    return best, index, index - offset


def argmax_forward(x: torch.Tensor, dim: int, keepdim: bool, op: str, padding, low):
    """argmax (op "max") or argmin ("min") over the sharded `dim`, no gradient: the global
    indices of `max_dim_forward`."""
    _, index, _ = max_dim_forward(x.detach(), dim, op, padding, low)
    return index if keepdim else index.squeeze(dim)


class MaxDimAllReduce(torch.autograd.Function):
    """max/min.dim over the sharded dim; the values' gradient goes to the element the index
    names (torch's value_selecting_reduction_backward), on the rank that holds it."""

    @staticmethod
    def forward(ctx, x, dim, keepdim, op, padding, low):
        values, index, local = max_dim_forward(x, dim, op, padding, low)
        ctx.save_for_backward(local)
        ctx.dim, ctx.keepdim, ctx.shape = dim, keepdim, x.shape
        if not keepdim:
            values, index = values.squeeze(dim), index.squeeze(dim)
        ctx.mark_non_differentiable(index)
        return values, index

    @staticmethod
    def backward(ctx, grad, _):
        (local,) = ctx.saved_tensors
        n = ctx.shape[ctx.dim]
        here = (local >= 0) & (local < n)
        grad = _restore_dims(grad, (ctx.dim,), ctx.keepdim)
        out = grad.new_zeros(ctx.shape)
        grad = torch.where(here, grad, 0)  # not grad * here: a NaN gradient stays on its rank
        return out.scatter(ctx.dim, local.clamp(0, n - 1), grad), None, None, None, None, None


class LogsumexpAllReduce(torch.autograd.Function):
    """logsumexp over dims one of which is sharded: the global max of the local results, the log
    of the summed exp of their differences to it; the gradient is torch's, exp(x - result)."""

    @staticmethod
    def forward(ctx, x, dims, keepdim, padding, low):
        x = _without_padding(x, padding, "max", low)  # exp(-inf): the padding adds nothing
        local = torch.logsumexp(x, dims, keepdim=True)
        top = low.reduce(local, "max")
        # as torch's logsumexp: an infinite max is not subtracted (inf - inf would be NaN)
        top = top.masked_fill(top.abs() == float("inf"), 0)
        out = low.reduce((local - top).exp()).log() + top
        ctx.save_for_backward(x, out)
        ctx.dims, ctx.keepdim = dims, keepdim
        return out if keepdim else out.squeeze(dims)

    @staticmethod
    def backward(ctx, grad):
        x, out = ctx.saved_tensors
        grad = _restore_dims(grad, ctx.dims, ctx.keepdim) * (x - out).exp()
        return grad, None, None, None, None


def _lowering(axis: str) -> GroupLowering:
    return GroupLowering(_group(axis))


def all_reduce(x: torch.Tensor, axis: str) -> torch.Tensor:
    """Partial -> Replicate: sum over the axis; backward is the identity."""
    return AllReduce.apply(x, _lowering(axis))


def all_gather(x: torch.Tensor, dim: int, axis: str) -> torch.Tensor:
    """Shard(dim) -> Replicate: concatenate the chunks; backward keeps the local chunk."""
    return AllGather.apply(x, dim, _lowering(axis))


def all_gather_rs(x: torch.Tensor, dim: int, axis: str) -> torch.Tensor:
    """Shard(dim) -> Replicate read by sharded ops: backward reduce-scatters the Partial gradient."""
    return AllGatherRS.apply(x, dim, _lowering(axis))


def reduce_scatter(x: torch.Tensor, dim: int, axis: str) -> torch.Tensor:
    """Partial -> Shard(dim): sum, keep the local chunk; backward all-gathers."""
    return ReduceScatter.apply(x, dim, _lowering(axis))


def shard(x: torch.Tensor, dim: int, axis: str) -> torch.Tensor:
    """Replicate -> Shard(dim): keep the local chunk (no communication); backward all-gathers."""
    return Shard.apply(x, dim, _lowering(axis))


def grad_all_reduce(x: torch.Tensor, axis: str) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient backward (Megatron's `f`)."""
    return GradAllReduce.apply(x, _lowering(axis))


def amax_all_reduce(x: torch.Tensor, dims, keepdim: bool, op: str, padding, axis: str):
    """amax/amin over dims one of which is sharded: local, then all-reduce max/min."""
    return AmaxAllReduce.apply(x, tuple(dims), keepdim, op, padding, _lowering(axis))


def max_dim_all_reduce(x: torch.Tensor, dim: int, keepdim: bool, op: str, padding, axis: str):
    """(values, global indices) of max/min.dim over the sharded dim."""
    return MaxDimAllReduce.apply(x, dim, keepdim, op, padding, _lowering(axis))


def argmax_all_reduce(x: torch.Tensor, dim: int, keepdim: bool, op: str, padding, axis: str):
    """argmax/argmin over the sharded dim (no gradient)."""
    return argmax_forward(x, dim, keepdim, op, padding, _lowering(axis))


def logsumexp_all_reduce(x: torch.Tensor, dims, keepdim: bool, padding, axis: str):
    """logsumexp over dims one of which is sharded: local, then a max and a sum all-reduce."""
    return LogsumexpAllReduce.apply(x, tuple(dims), keepdim, padding, _lowering(axis))


def dropout_part(x: torch.Tensor, p: float, dim: int, rank: int, size: int, mask: torch.Tensor):
    """Rank `rank`'s part of dropout with the whole value's `mask` (see `sequence_dropout`)."""
    n = x.shape[dim]
    keep = mask.narrow(dim, rank * n, n)
    scale = 0.0 if p >= 1 else 1.0 / (1.0 - p)
    return x * keep * scale, keep


def draw_mask(
    x: torch.Tensor, p: float, dim: int, size: int, length: int | None = None
) -> torch.Tensor:
    """The keep-mask of the whole value of which `x` is one of `size` parts along `dim`; with
    `length`, the whole value's real length along `dim` (the rest, padding, is dropped)."""
    shape = list(x.shape)
    padded = shape[dim] * size
    shape[dim] = padded if length is None else length
    mask = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1 - p).bool()
    if shape[dim] < padded:  # the unsharded model draws `length` rows: the same draws
        shape[dim] = padded - shape[dim]
        mask = torch.cat([mask, mask.new_zeros(shape)], dim)
    return mask


def sequence_dropout(
    x: torch.Tensor, p: float, dim: int, axis: str, native: bool = False, length: int | None = None
):
    """Dropout of a sequence shard with this rank's part of the whole value's mask."""
    size, rank = _size_rank(_group(axis))
    out, keep = dropout_part(x, p, dim, rank, size, draw_mask(x, p, dim, size, length))
    return (out, keep) if native else out


def _embedding_mask(ids: torch.Tensor, start: int, local_vocab: int):
    local = ids - start
    outside = (local < 0) | (local >= local_vocab)
    return local.masked_fill(outside, 0), outside


def vocab_parallel_embedding(
    weight: torch.Tensor, ids: torch.Tensor, padding_idx: int, vocab_size: int, axis: str
) -> torch.Tensor:
    """Embedding lookup in this rank's vocab rows; the Partial result is summed by a later all_reduce.

    `weight` may be padded past `vocab_size` rows (to a multiple of tp); padding rows are never read.
    """
    size, rank = _size_rank(_group(axis))
    return local_vocab_embedding(weight, ids, padding_idx, rank, size, vocab_size)


def local_vocab_embedding(
    weight, ids, padding_idx: int, rank: int, size: int, vocab_size: int
) -> torch.Tensor:
    """Lookup of `ids` among rows [rank*V_local, (rank+1)*V_local) of the full table; zeros elsewhere.

    Every rank runs the same ops, only the row offset differs: no branch on the rank, so the
    ranks of a stage compile one program.
    """
    local_vocab = weight.shape[0]
    start = rank * local_vocab
    local_ids, outside = _embedding_mask(ids, start, local_vocab)
    if size * local_vocab > vocab_size:  # a padded table: ids in the padding rows are no token
        outside = outside | (ids >= vocab_size)
        local_ids = local_ids.masked_fill(outside, 0)
    out = torch.nn.functional.embedding(local_ids, weight)
    if padding_idx >= 0:  # as embedding(padding_idx=...): the padding row gets no gradient
        out = torch.where((ids == padding_idx).unsqueeze(-1), out.detach(), out)
    return out.masked_fill(outside.unsqueeze(-1), 0.0)


def vocab_cross_entropy_forward(
    logits, target, ignore_index: int, vocab_size: int, size: int, rank, reduce
):
    """Per-token losses of vocab-sharded logits and what the backward keeps.

    `rank` is an int or a 0-d integer tensor (the XLA lowering passes a tensor input, so the
    ranks' programs do not differ by a constant); `reduce(x, op)` sums ("sum") or maxes ("max")
    over the tp group.
    """
    local_vocab = logits.shape[-1]
    start = rank * local_vocab
    logits = logits.float()
    logits = _mask_vocab_padding(logits, start, size, vocab_size)
    global_max = reduce(logits.max(dim=-1).values, "max")
    shifted = logits - global_max.unsqueeze(-1)
    exp = shifted.exp()
    sum_exp = reduce(exp.sum(dim=-1), "sum")
    local_target, outside = _embedding_mask(target, start, local_vocab)
    target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
    target_logit = reduce(target_logit.masked_fill(outside, 0.0), "sum")
    loss = sum_exp.log() - target_logit
    ignored = target == ignore_index
    loss = loss.masked_fill(ignored, 0.0)
    softmax = exp / sum_exp.unsqueeze(-1)
    return loss, (softmax, local_target, outside, ignored)


def vocab_cross_entropy_backward(saved, grad: torch.Tensor) -> torch.Tensor:
    """The logits' gradient (this rank's vocab columns) from `vocab_cross_entropy_forward`'s saved values."""
    softmax, local_target, outside, ignored = saved
    grad_logits = softmax.clone()
    onehot = torch.zeros_like(grad_logits).scatter_(-1, local_target.unsqueeze(-1), 1.0)
    grad_logits -= onehot * (~outside).unsqueeze(-1)
    grad_logits *= (grad * (~ignored)).unsqueeze(-1)
    return grad_logits


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, ignore_index, vocab_size, group):
        size, rank = _size_rank(group)
        loss, saved = vocab_cross_entropy_forward(
            logits,
            target,
            ignore_index,
            vocab_size,
            size,
            rank,
            lambda x, op: _reduce(x, group, op),
        )
        ctx.save_for_backward(*saved)
        return loss

    @staticmethod
    def backward(ctx, grad):
        return vocab_cross_entropy_backward(ctx.saved_tensors, grad), None, None, None, None


def _mask_vocab_padding(logits: torch.Tensor, start, size: int, vocab_size: int) -> torch.Tensor:
    local_vocab = logits.shape[-1]
    if size * local_vocab == vocab_size:  # not padded (the same answer on every rank)
        return logits
    # arange + start, not arange(start, ...): start may be a tensor (the XLA lowering's rank)
    columns = torch.arange(local_vocab, device=logits.device) + start
    return logits.masked_fill(columns >= vocab_size, float("-inf"))


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    reduction: int,
    ignore_index: int,
    vocab_size: int,
    axis: str,
) -> torch.Tensor:
    """Cross-entropy over vocab-sharded logits [N, V/tp] (Megatron's): three small all-reduces, no gather."""
    loss = _VocabParallelCrossEntropy.apply(logits, target, ignore_index, vocab_size, _group(axis))
    return reduce_loss(loss, target, reduction, ignore_index)


def reduce_loss(loss: torch.Tensor, target: torch.Tensor, reduction: int, ignore_index: int):
    """Apply torch's cross_entropy reduction code (0 none, 1 mean over non-ignored, 2 sum)."""
    if reduction == 0:
        return loss
    if reduction == 2:
        return loss.sum()
    count = (target != ignore_index).sum()
    return loss.sum() / count.to(loss.dtype)


ops.bind(
    {
        "all_reduce": all_reduce,
        "all_gather": all_gather,
        "all_gather_rs": all_gather_rs,
        "reduce_scatter": reduce_scatter,
        "shard": shard,
        "grad_all_reduce": grad_all_reduce,
        "amax_all_reduce": amax_all_reduce,
        "max_dim_all_reduce": max_dim_all_reduce,
        "argmax_all_reduce": argmax_all_reduce,
        "logsumexp_all_reduce": logsumexp_all_reduce,
        "vocab_parallel_embedding": vocab_parallel_embedding,
        "sequence_dropout": sequence_dropout,
        "vocab_parallel_cross_entropy": vocab_parallel_cross_entropy,
    }
)
