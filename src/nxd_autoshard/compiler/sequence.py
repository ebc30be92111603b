"""Sequence parallelism (Megatron-SP, NxD's `sequence_parallel_enabled`): the regions of a
tensor-parallel plan that every rank computes whole (norms, dropout, residual adds, between a
row-parallel output and the next column-parallel input) run on `Shard(seq)` activations.

Found in the graph, not by module names: each value TP all-reduces (a row-parallel output, a
vocab-parallel embedding) is reduce-scattered over its sequence dim instead where its consumer's
rule can take that shard; the shard then flows through every op whose rule keeps it (element-wise
ops, norms over the feature dim, dropout), and a consumer that cannot take it (a column-parallel
linear, attention, a view merging batch and sequence) gets it all-gathered. A replicated weight
read by such a region (a norm's) gets its gradient all-reduced over tp by the partition pass, as
every replicated input of a sharded op. The sequence dim of a value is the one sized like the
last dim of an embedding's ids (the captured dynamic sequence size, or its example size when
static); dropout there draws the whole value's mask and keeps its part (`sequence_dropout`).
A length tp does not divide is padded to a multiple of tp on the shards (copies of the last
row, sliced off at each gather: `_pad_lengths`). Captured at a length tp divides, the program
splits equally, as Megatron-SP, and a call at another length is captured again (padded).

    program, tp=2:  o_proj -> P -> reduce_scatter(dim 1) -> add / rms_norm on S(1) -> all_gather -> q_proj
"""

from __future__ import annotations

import torch
import torch.fx

from nxd_autoshard.compiler.propagate import PropagationResult
from nxd_autoshard.ir import ops
from nxd_autoshard.ir.meta import set_padded, set_placement, set_sequence
from nxd_autoshard.ir.placements import Partial, Replicate, Shard
from nxd_autoshard.ir.program import CapturedProgram
from nxd_autoshard.rules import Decision, Lower, R, hint_int, rule_for, tensor_inputs

__all__ = ["sequence_parallel"]

aten = torch.ops.aten


def _seq_sizes(program: CapturedProgram) -> list:
    """The sequence sizes (SymInt or int): the last dim of every embedding's ids (token ids,
    decoder ids made from labels, position ids)."""
    sizes = []
    for node in program.gm.graph.nodes:
        if getattr(node.target, "overloadpacket", None) is not aten.embedding:
            continue
        ids = node.args[1].meta.get("val")
        if isinstance(ids, torch.Tensor) and ids.dim() >= 1:
            if not any(_same_size(ids.shape[-1], s) for s in sizes):
                sizes.append(ids.shape[-1])
    return sizes


def sequence_dims(program: CapturedProgram, sizes: list) -> list[tuple[int, int]]:
    """(flat user-input index, dim) of the user inputs' dims sized like a dynamic sequence that
    the program splits equally: a call at a length tp does not divide is captured again."""
    inputs = [n for n in program.gm.graph.nodes if n.op == "placeholder"][program.num_state :]
    dynamic = [s for s in sizes if isinstance(s, torch.SymInt)]
    found = []
    for index, node in enumerate(inputs):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            found += [
                (index, d)
                for d, size in enumerate(val.shape)
                if any(_same_size(size, s) for s in dynamic)
            ]
    return found


def _same_size(a, b) -> bool:
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
            return a.node.expr == b.node.expr
        return False
    return int(a) == int(b)


def _seq_dim(node: torch.fx.Node, sizes: list) -> int | None:
    """The value's sequence dim: the last dim before the features sized like a token sequence."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() < 2:
        return None
    dims = [d for d in range(val.dim() - 1) if any(_same_size(val.shape[d], s) for s in sizes)]
    return dims[-1] if dims else None


def _all_shard(out) -> bool:
    if isinstance(out, tuple):
        return bool(out) and all(p is None or isinstance(p, Shard) for p in out)
    return isinstance(out, Shard)


_DROPOUT = (aten.dropout, aten.native_dropout)
_RANDOM = (aten.bernoulli, aten.rand_like, aten.randn_like, aten.normal, aten.uniform)


def _dropout(node, trial: dict, seeds: dict) -> Decision | None:
    """Dropout that draws a mask (training, p > 0) on a sequence shard: lowered to
    `sequence_dropout` (each rank its part of the whole value's mask; the same mask on every
    part would correlate the shards)."""
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
    x = node.args[0]
    placed = trial.get(x)
    if not isinstance(placed, Shard):
        return None
    native = getattr(node.target, "overloadpacket", None) is aten.native_dropout
    out = (placed, placed) if native else placed
    if not (train and p):  # eval: the identity
        return Decision(out, dict(seeds)) if not native else None
    lower = Lower(ops.sequence_dropout, (placed.dim, "tp", native))
    return Decision(out, dict(seeds), localise=(lower,))


def _try_sequence(node, trial: dict, seeds: dict, tp: int) -> Decision | None:
    """The node's decision on sequence-sharded inputs, or None when it would move them (a
    gather, another shard), needs a size rewritten, draws random numbers other than dropout's,
    or does not keep a shard."""
    packet = getattr(node.target, "overloadpacket", None)
    if packet in _DROPOUT:
        return _dropout(node, trial, seeds)
    rule = rule_for(node.target)
    if rule is None or packet in _RANDOM:
        return None
    decision = rule(node, trial, tp)
    if decision is None or decision.localise or decision.blocks or decision.padded:
        return None
    if not _all_shard(decision.out):
        return None
    for value, placed in trial.items():
        need = decision.needs.get(value, placed)
        if isinstance(placed, Shard) and need != placed:
            return None  # a sequence shard gathered or resharded: the region ends here
        if isinstance(placed, Replicate) and not isinstance(need, (Replicate, Shard)):
            return None
    decision.needs = {**seeds, **decision.needs}
    return decision


def sequence_parallel(program: CapturedProgram, result: PropagationResult, tp: int) -> int:
    """Rewrite the decisions of the replicated regions to Shard(seq) (see the module docstring);
    returns the number of ops that now run on a sequence shard."""
    sizes = _seq_sizes(program)
    if not sizes:
        return 0
    sp: dict[torch.fx.Node, object] = {}
    for node in program.gm.graph.nodes:
        decision = result.decisions.get(node)
        if decision is None or node.op != "call_function":
            continue
        ins = tensor_inputs(node)
        have = {n: result.placements.get(n) for n in ins}
        # TP's all-reduces at this node: each could be a reduce-scatter over the sequence
        seeds = {}
        for n in ins:
            dim = _seq_dim(n, sizes)
            if isinstance(have[n], Partial) and decision.needs.get(n) == R and dim is not None:
                seeds[n] = Shard(dim)
        entering = [n for n in ins if n in sp]
        if not entering and not seeds:
            continue
        others = [n for n in ins if n not in sp and n not in seeds]
        mixed = any(not isinstance(have[n], Replicate) for n in others if have[n] is not None)
        trial = {n: sp.get(n, seeds.get(n, have[n])) for n in ins}
        new = None if mixed else _try_sequence(node, trial, seeds, tp)
        if new is None:
            for n in entering:
                decision.needs.setdefault(n, R)  # all-gathered into the tensor-parallel region
            continue
        result.decisions[node] = new
        result.placements[node] = new.out
        set_placement(node, new.out)
        set_sequence(node)
        sp[node] = new.out
    split = _pad_lengths(sp, result, sizes, tp)
    program.sequence_inputs = sequence_dims(program, split)
    program.sequence_tp = tp
    return len(sp)


def _pad_lengths(sp: dict, result: PropagationResult, sizes: list, tp: int) -> list:
    """Sequence shards of a length tp does not divide (at the example) hold it padded to a
    multiple of tp; returns the lengths split equally instead.

    Padding rows exist only on Shard(seq) values, made by `pad_sequence` where a value enters
    the region and sliced off by every gather out of it; each op in between keeps the shard (it
    computes each position from the same position), so a padding row never reaches a real one
    and gets no gradient. Dropout draws the unsharded value's mask (its real length)."""
    split = []
    for node in sp:
        # a node of two outputs (native dropout) has its input's length
        probe = node if isinstance(node.meta.get("val"), torch.Tensor) else node.args[0]
        dim = _seq_dim(probe, sizes)
        size = None if dim is None else probe.meta["val"].shape[dim]
        if size is None:
            continue
        if hint_int(size) % tp == 0:
            split.append(size)
            continue
        padded = size + (-size % tp)  # a SymInt for a dynamic length
        set_padded(node, padded)
        decision = result.decisions[node]
        decision.padded = padded
        decision.localise = tuple(
            Lower(step.op, (*step.extra_args, size)) if step.op is ops.sequence_dropout else step
            for step in decision.localise
        )
    return split
