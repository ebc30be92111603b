"""Other rules: getitem of a tuple-valued op, new_zeros-like ops that ignore input values, and
size reads."""

from __future__ import annotations

import operator

from nxd_autoshard.ir.placements import Shard
from nxd_autoshard.rules.registry import Decision, R, aten, rule

__all__ = ["FRESH", "fresh_rule", "getitem_rule", "size_rule"]

# ops whose result does not depend on their input's values: it carries no gradient back
FRESH = frozenset(
    {
        aten.new_zeros,
        aten.new_ones,
        aten.new_empty,
        aten.new_full,
        aten.zeros_like,
        aten.ones_like,
        aten.empty_like,
        aten.full_like,
        aten.rand_like,
        aten.randn_like,
    }
)


@rule(operator.getitem)
def getitem_rule(node, placements, tp):
    """getitem: the placement of the chosen piece of a tuple-valued op (split, chunk)."""
    src, index = node.args
    p = placements[src]
    if isinstance(p, tuple):
        return Decision(p[index])
    return Decision(p)


@rule(aten.new_zeros, aten.new_ones, aten.new_empty, aten.new_full)
def fresh_rule(node, placements, tp):
    """new_zeros/new_ones/...: the result does not depend on the input's values."""
    return Decision(R)


@rule(aten.sym_size)
def size_rule(node, placements, tp):
    """sym_size(x, dim): a partial or replicated value has its full shape on every rank, and a
    shard has it on every dim but its shard dim, so the size is read locally, with no collective.
    The shard dim's local size is not the size the code asked for: gathered (no rule)."""
    x, dim = node.args[0], node.args[1]
    p = placements.get(x)
    if isinstance(p, Shard) and p.dim % x.meta["val"].dim() == dim % x.meta["val"].dim():
        return None
    return Decision(R)
