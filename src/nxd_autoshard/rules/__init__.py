"""Sharding rules keyed by ATen op: from input placements, the output placement and input needs.

A rule returns a `Decision`, or None when the op cannot run on the given placements; the
propagation pass then gathers every input to Replicate and warns, naming node and module.
Rules live one file per op family and register themselves with `@rule` (see `registry`);
importing this package loads every family, so `REGISTRY` is complete.
"""

from nxd_autoshard.rules import (  # noqa: F401  (each module registers its rules on import)
    attention,
    embedding,
    joins,
    matmul,
    misc,
    pointwise,
    reductions,
    scatters,
    views,
)
from nxd_autoshard.rules.misc import FRESH
from nxd_autoshard.rules.registry import (
    REGISTRY,
    Decision,
    DivideSize,
    Localisation,
    Lower,
    P,
    R,
    RuleEntry,
    ScaleInput,
    SliceBlock,
    SplitSizes,
    handles_padding,
    hint_int,
    is_tensor_node,
    padded_of,
    rule,
    rule_for,
    shape_of,
    tensor_inputs,
    view_groups,
)

__all__ = [
    "FRESH",
    "REGISTRY",
    "Decision",
    "DivideSize",
    "Localisation",
    "Lower",
    "P",
    "R",
    "RuleEntry",
    "ScaleInput",
    "SliceBlock",
    "SplitSizes",
    "handles_padding",
    "hint_int",
    "is_tensor_node",
    "padded_of",
    "rule",
    "rule_for",
    "shape_of",
    "tensor_inputs",
    "view_groups",
]
