"""Ops that compiled programs call beyond ATen: collectives over a mesh axis, vocab-parallel
embedding and loss, and the normalised ops that graph passes put in place of model code.

A program names a mesh axis ("tp"), never a rank or a group object, so every rank runs the
same program. What a collective does is bound by a runtime (`bind`): the process-group
runtime talks to its groups, the simulator reads the targets and emulates them, a compiler
backend traces them. The compiler itself imports no runtime.

| op | forward | backward |
|---|---|---|
| all_reduce | Partial -> Replicate (sum) | identity |
| all_gather | Shard(dim) -> Replicate | local chunk |
| reduce_scatter | Partial -> Shard(dim) | all-gather |
| shard | Replicate -> Shard(dim) (local chunk) | all-gather |
| grad_all_reduce | identity (Replicate input of a sharded op) | all-reduce |
| all_gather_rs | Shard(dim) -> Replicate, read by sharded ops | reduce-scatter |
| amax_all_reduce | amax/amin over dims incl. the shard dim -> Replicate: local, then max/min | all-reduce of the tie counts |
| max_dim_all_reduce | max/min.dim over the shard dim -> Replicate (values, global indices) | none |
| argmax_all_reduce | argmax/argmin over the shard dim -> Replicate | (no gradient) |
| logsumexp_all_reduce | logsumexp over dims incl. the shard dim -> Replicate | none |

The reductions over a sharded dim reduce the local piece and all-reduce only the small
result (max, min or sum over the axis), never gathering the activation.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

__all__ = [
    "COLLECTIVES",
    "PARALLEL_OPS",
    "REDUCTIONS",
    "REDUCTION_ALL_REDUCES",
    "all_gather",
    "all_gather_rs",
    "all_reduce",
    "amax_all_reduce",
    "argmax_all_reduce",
    "bind",
    "bound",
    "expert_linear",
    "expert_matmul",
    "grad_all_reduce",
    "logsumexp_all_reduce",
    "max_dim_all_reduce",
    "reduce_scatter",
    "reduction_all_reduces",
    "sequence_dropout",
    "shard",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_embedding",
]

_IMPLEMENTATIONS: dict[str, Callable] = {}


def bind(implementations: dict[str, Callable]) -> None:
    """Make the ops below run `implementations[name]` (a runtime calls this once, at import)."""
    _IMPLEMENTATIONS.update(implementations)


@contextlib.contextmanager
def bound(implementations: dict[str, Callable]) -> Iterator[None]:
    """Run the ops by `implementations` inside the block only (a lowering that traces them, e.g.
    torch-xla's), then as before."""
    saved = dict(_IMPLEMENTATIONS)
    _IMPLEMENTATIONS.update(implementations)
    try:
        yield
    finally:
        _IMPLEMENTATIONS.clear()
        _IMPLEMENTATIONS.update(saved)


def _run(name: str, *args):
    try:
        fn = _IMPLEMENTATIONS[name]
    except KeyError:
        raise RuntimeError(
            f"no runtime implements '{name}': run the program through a ShardedModule, or import "
            "nxd_autoshard.runtime.collectives (it binds the eager torch.distributed ones)"
        ) from None
    return fn(*args)


def all_reduce(x: torch.Tensor, axis: str) -> torch.Tensor:
    """Partial -> Replicate: sum over the axis; backward is the identity."""
    return _run("all_reduce", x, axis)


def all_gather(x: torch.Tensor, dim: int, axis: str) -> torch.Tensor:
    """Shard(dim) -> Replicate: concatenate the chunks; backward keeps the local chunk."""
    return _run("all_gather", x, dim, axis)


def all_gather_rs(x: torch.Tensor, dim: int, axis: str) -> torch.Tensor:
    """Shard(dim) -> Replicate for sharded consumers only (Megatron-SP's gather into a column-
    parallel region): concatenate the chunks; backward reduce-scatters their Partial gradient."""
    return _run("all_gather_rs", x, dim, axis)


def reduce_scatter(x: torch.Tensor, dim: int, axis: str) -> torch.Tensor:
    """Partial -> Shard(dim): sum, keep the local chunk; backward all-gathers."""
    return _run("reduce_scatter", x, dim, axis)


def shard(x: torch.Tensor, dim: int, axis: str) -> torch.Tensor:
    """Replicate -> Shard(dim): keep the local chunk (no communication); backward all-gathers."""
    return _run("shard", x, dim, axis)


def grad_all_reduce(x: torch.Tensor, axis: str) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient backward (Megatron's `f`)."""
    return _run("grad_all_reduce", x, axis)


# padding: (shard dim, its real size) where the shard dim is vocab-padded (a padded LM head's
# logits): the padding entries are no entries of the reduction; None where it is not padded
Padding = tuple[int, int] | None


def amax_all_reduce(
    x: torch.Tensor, dims: tuple[int, ...], keepdim: bool, op: str, padding: Padding, axis: str
) -> torch.Tensor:
    """amax (op "max") or amin ("min") of `x` over `dims`, one of them sharded across the axis:
    the local one, then an all-reduce max/min of it. Backward is torch's (the gradient split
    evenly among ties), the ties counted over every rank by an all-reduce of the local counts."""
    return _run("amax_all_reduce", x, dims, keepdim, op, padding, axis)


def max_dim_all_reduce(
    x: torch.Tensor, dim: int, keepdim: bool, op: str, padding: Padding, axis: str
):
    """(values, indices) of max.dim (op "max") or min.dim ("min") over the sharded `dim`: the
    global index of the first extremum, as torch's; the values' gradient goes to that element."""
    return _run("max_dim_all_reduce", x, dim, keepdim, op, padding, axis)


def argmax_all_reduce(
    x: torch.Tensor, dim: int, keepdim: bool, op: str, padding: Padding, axis: str
):
    """argmax (op "max") or argmin ("min") over the sharded `dim`: max_dim_all_reduce's indices."""
    return _run("argmax_all_reduce", x, dim, keepdim, op, padding, axis)


def logsumexp_all_reduce(
    x: torch.Tensor, dims: tuple[int, ...], keepdim: bool, padding: Padding, axis: str
) -> torch.Tensor:
    """logsumexp over `dims`, one of them sharded: the local one, then the global max of those
    and the log of the summed exp of their differences to it (stable as torch's own)."""
    return _run("logsumexp_all_reduce", x, dims, keepdim, padding, axis)


def vocab_parallel_embedding(
    weight: torch.Tensor, ids: torch.Tensor, padding_idx: int, vocab_size: int, axis: str
) -> torch.Tensor:
    """Embedding lookup in this rank's vocab rows; the Partial result is summed by a later all_reduce.

    `weight` may be padded past `vocab_size` rows (to a multiple of tp); padding rows are never read.
    """
    return _run("vocab_parallel_embedding", weight, ids, padding_idx, vocab_size, axis)


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    reduction: int,
    ignore_index: int,
    vocab_size: int,
    axis: str,
) -> torch.Tensor:
    """Cross-entropy over vocab-sharded logits [N, V/tp] (Megatron's): three small all-reduces, no gather."""
    return _run(
        "vocab_parallel_cross_entropy", logits, target, reduction, ignore_index, vocab_size, axis
    )


def sequence_dropout(
    x: torch.Tensor, p: float, dim: int, axis: str, native: bool = False, length: int | None = None
):
    """Dropout of a value sharded on `dim` (a sequence shard): every rank draws the mask of the
    whole value (the ranks of an axis share the random state, as replicated dropout assumes)
    and keeps its own part, so the ranks' masks are the unsharded dropout's, not one mask
    repeated per shard. native: return (output, mask) as `aten.native_dropout`. length: the
    real sequence length of a value padded to a multiple of tp (`pad_sequence`)."""
    return _run("sequence_dropout", x, p, dim, axis, native, length)


def pad_sequence(x: torch.Tensor, dim: int, tp: int) -> torch.Tensor:
    """`dim` padded up to a multiple of `tp` with copies of its last row, before it is split into
    tp equal shards; the copies are finite wherever the real rows are, so position-wise ops on
    them (norms, residual adds) stay finite, and the gather out of the shards slices them off."""
    extra = -x.shape[dim] % tp
    if not extra:
        return x
    return torch.cat([x] + [x.narrow(dim, x.shape[dim] - 1, 1)] * extra, dim)


def unpad_sequence(x: torch.Tensor, dim: int, length) -> torch.Tensor:
    """The first `length` rows of `dim` (a gathered padded sequence), contiguous for the views after."""
    return x.narrow(dim, 0, length).contiguous()


def expert_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of `x` grouped by expert (group e ends at offsets[e]) times weight[e].T, weight [E, out, in].

    It is transformers' `grouped_mm_fallback(x, weight.transpose(-2, -1), offsets)` with the
    weight itself as an argument, so a column (out) or row (in) shard of the experts is visible.
    """
    return torch.ops.transformers.grouped_mm_fallback(x, weight.transpose(-2, -1), offsets)


def expert_matmul(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """As `expert_linear`, the weight stored [E, in, out] (transformers' experts with
    `is_transposed`, GPT-OSS: `grouped_mm_fallback(x, weight, offsets)`)."""
    return torch.ops.transformers.grouped_mm_fallback(x, weight, offsets)


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, dtype: torch.dtype | None
) -> torch.Tensor:
    """As `expert_linear`, by `torch._grouped_mm` (torchtitan's experts: raw [E, out, in]
    parameters, cast to `dtype` for the product)."""
    weight = weight if dtype is None else weight.to(dtype)
    return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets)


# the ops that move data between ranks, and those with any rank-dependent behaviour
COLLECTIVES = (
    all_reduce,
    all_gather,
    reduce_scatter,
    shard,
    grad_all_reduce,
    all_gather_rs,
    amax_all_reduce,
    max_dim_all_reduce,
    argmax_all_reduce,
    logsumexp_all_reduce,
)
# the sharded reductions: local reduction, then all-reduces of the small result; each one's
# all-reduces in the order it issues them, as (reduce, phase, payload). reduce: "sum", "max",
# "min", or "op": the call's own extremum (its `op` argument, "max" or "min"). phase: "forward",
# or "backward" (only where a gradient reaches the input). payload: what is reduced, of the
# local result's shape with the reduced dims kept: "input" values of the input's dtype, "result"
# values of the result's, "index" the int64 global index of the extremum
REDUCTION_ALL_REDUCES = {
    # the extremum; backward, the tie counts
    amax_all_reduce: (("op", "forward", "input"), ("sum", "backward", "input")),
    # the extremum, then the lowest index that holds it
    max_dim_all_reduce: (("op", "forward", "input"), ("min", "forward", "index")),
    argmax_all_reduce: (("op", "forward", "input"), ("min", "forward", "index")),
    # the max of the local results, then the sum of their exp
    logsumexp_all_reduce: (("max", "forward", "result"), ("sum", "forward", "result")),
}
REDUCTIONS = tuple(REDUCTION_ALL_REDUCES)


def reduction_all_reduces(target, args) -> tuple[tuple[str, str, str], ...]:
    """The all-reduces (reduce, phase, payload) that a call `target(*args)` of a sharded
    reduction issues (`REDUCTION_ALL_REDUCES`), "op" replaced by the call's max or min; ()
    for any other target."""
    return tuple(
        (args[3] if reduce == "op" else reduce, phase, payload)
        for reduce, phase, payload in REDUCTION_ALL_REDUCES.get(target, ())
    )


PARALLEL_OPS = COLLECTIVES + (
    vocab_parallel_embedding,
    vocab_parallel_cross_entropy,
    sequence_dropout,
)
