"""Vocab rules: embedding (vocab-parallel or column) and cross entropy over vocab-sharded logits."""

from __future__ import annotations

from nxd_autoshard.ir.ops import vocab_parallel_cross_entropy, vocab_parallel_embedding
from nxd_autoshard.ir.placements import Replicate, Shard
from nxd_autoshard.rules.registry import Decision, Lower, P, R, aten, padded_of, rule, shape_of

__all__ = ["cross_entropy_rule", "embedding_rule"]


@rule(aten.embedding, padding_aware=True)
def embedding_rule(node, placements, tp):
    """embedding: rows sharded (vocab-parallel, a Partial lookup) or columns sharded."""
    weight, ids = node.args[0], node.args[1]
    pw = placements[weight]
    needs = {ids: R} if not isinstance(placements[ids], Replicate) else {}
    if isinstance(pw, Shard) and pw.dim == 0:
        padding_idx = node.args[2] if len(node.args) > 2 else -1
        vocab = shape_of(weight)[0]
        lower = Lower(vocab_parallel_embedding, (padding_idx, vocab, "tp"))
        return Decision(P, needs, localise=(lower,))
    if padded_of(weight):
        return None
    if isinstance(pw, Shard) and pw.dim == 1:
        return Decision(Shard(node.meta["val"].dim() - 1), needs)
    return None


@rule(aten.cross_entropy_loss, padding_aware=True)
def cross_entropy_rule(node, placements, tp):
    """cross_entropy_loss of [N, V] logits sharded on V: Megatron's vocab-parallel cross entropy."""
    logits, target = node.args[0], node.args[1]
    p = placements[logits]
    weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
    smoothing = node.args[5] if len(node.args) > 5 else node.kwargs.get("label_smoothing", 0.0)
    if not isinstance(p, Shard) or p.dim != 1 or logits.meta["val"].dim() != 2:
        return None
    if weight is not None or smoothing:
        return None
    vocab = shape_of(logits)[1]
    reduction = node.args[3] if len(node.args) > 3 else node.kwargs.get("reduction", 1)
    ignore = node.args[4] if len(node.args) > 4 else node.kwargs.get("ignore_index", -100)
    lower = Lower(vocab_parallel_cross_entropy, (reduction, ignore, vocab, "tp"))
    needs = {target: R} if not isinstance(placements[target], Replicate) else {}
    return Decision(R, needs, localise=(lower,))
