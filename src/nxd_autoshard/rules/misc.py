"""Other rules: getitem of a tuple-valued op, and new_zeros-like ops that ignore input values."""

from __future__ import annotations

import operator

from nxd_autoshard.rules.registry import Decision, R, aten, rule

__all__ = ["FRESH", "fresh_rule", "getitem_rule"]

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
