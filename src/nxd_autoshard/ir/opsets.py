"""Families of ATen ops by what they do to a value, named once for the passes that look through
them (a token id found through views and casts, a projection's output through dropout, a weight
read through a cast or `1 + w`). Sets of overload-packet names: `op_name(node) in RESHAPES`."""

from __future__ import annotations

import torch

from nxd_autoshard.ir.meta import is_parameter

__all__ = [
    "ARITHMETIC",
    "CARRIES",
    "CASTS",
    "COPIES",
    "PERMUTES",
    "RESHAPES",
    "SLICES",
    "op_name",
    "parameter_source",
]

# same elements in a new shape
RESHAPES = frozenset({"view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "expand"})
# the same tensor again (a new buffer or a new handle)
COPIES = frozenset({"clone", "contiguous", "alias", "detach"})
# the same values in another dtype or on another device
CASTS = frozenset({"_to_copy", "to", "type_as"})
# dims reordered
PERMUTES = frozenset({"t", "transpose", "permute"})
# a part of the tensor, or the tensor padded
SLICES = frozenset({"slice", "select", "constant_pad_nd", "pad"})
# scalar arithmetic: with one tensor operand, a value read through it stays the same value scaled
ARITHMETIC = frozenset({"add", "sub", "mul", "div", "rsub", "neg"})


def op_name(node) -> str:
    """The overload-packet name of a call_function node (`"add"` for `aten.add.Tensor`), else ""."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return ""
    return getattr(getattr(node.target, "overloadpacket", None), "__name__", "")


# ops that carry one tensor through unchanged in layout meaning (a cast, a transpose, `1 + w`),
# and one expert's slice of stacked expert weights (`weight[i]` in a loop over experts)
CARRIES = CASTS | PERMUTES | RESHAPES | COPIES | ARITHMETIC | {"select"}


def parameter_source(node) -> tuple[torch.fx.Node | None, frozenset[str]]:
    """The parameter a value is read from through CARRIES ops of one tensor input, and the
    names of the ops on the way (a `select` among them: one expert of a stacked weight)."""
    passed: set[str] = set()
    while isinstance(node, torch.fx.Node) and node.op == "call_function":
        tensors = [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
        if op_name(node) not in CARRIES or len(tensors) != 1:
            return None, frozenset(passed)
        passed.add(op_name(node))
        node = tensors[0]
    source = node if isinstance(node, torch.fx.Node) and is_parameter(node) else None
    return source, frozenset(passed)
