"""The rule registry: `Decision`, localisations, the `@rule` decorator and helpers rules share.

A rule is `(node, placements, tp) -> Decision | None`, registered with `@rule(op, ...)` where it
is written; the registry is the only list of ops. A rule only reads the graph: what the local
program must change (a size literal divided by tp, a retarget to a runtime op) is data in
`Decision.localise`, which the partition pass applies.

Vocab padding: a vocab dim that tp does not divide is sharded as `Shard(dim)` over a zero-padded
size (`padded_size`), recorded by propagation (`ir.meta.padded_of`). Only rules registered
with `padding_aware=True` read that mark and say, through `Decision.padded`, whether their output
still carries the padding; propagation gathers a padded input of any other op to Replicate (the
gather slices the padding off), so no rule can mistake padding for data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx
from torch.fx.experimental import symbolic_shapes as _symbolic

from nxd_autoshard.ir.meta import padded_of
from nxd_autoshard.ir.placements import Partial, Placement, Replicate

__all__ = [
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
    "aten",
    "handles_padding",
    "hint_int",
    "is_tensor_node",
    "norm_dim",
    "packet_of",
    "padded_of",
    "rule",
    "rule_for",
    "shape_of",
    "shape_of_val",
    "tensor_inputs",
    "view_groups",
]


aten = torch.ops.aten


R = Replicate()


P = Partial()


@dataclass(frozen=True)
class DivideSize:
    """The size literal at `position` of args[arg] (view and expand: 1, unflatten: 2) becomes
    size/tp, or padded/tp."""

    position: int
    padded: int | None = None
    arg: int = 1


@dataclass(frozen=True)
class SplitSizes:
    """split's size (args[1], an int) or split_with_sizes' sizes (a list) are divided by tp."""


@dataclass(frozen=True)
class SliceBlock:
    """A slice that reads one block of a blocked shard dim reads the rank's piece of that block."""

    dim: int
    start: int
    width: int


@dataclass(frozen=True)
class ScaleInput:
    """The first input is divided by tp: a mean over a sharded dim is each rank's mean of its
    piece over tp, which the later all-reduce of the Partial result sums to the whole mean."""


@dataclass(frozen=True)
class Lower:
    """Retarget the node to runtime op `op` with args (*args[:keep], *extra_args)."""

    op: Callable
    extra_args: tuple
    keep: int = 2


Localisation = DivideSize | SplitSizes | SliceBlock | ScaleInput | Lower


@dataclass
class Decision:
    """Output placement of a node, the placements its tensor inputs need, and its localisations."""

    out: Placement | tuple
    needs: dict[torch.fx.Node, Placement] = field(default_factory=dict)
    localise: tuple[Localisation, ...] = ()
    note: str | None = None
    # vocab padding: the padded global size of the output's shard dim; a Shard this decision
    # needs of an input is then padded to the same size (a replicated [vocab] bias, say)
    padded: int | None = None
    # fused projections: the input's shard dim holds blocks (q|k|v: a count of equal ones, or
    # their sizes), each sharded separately, so the linear producing it slices its weight
    # block by block
    blocks: int | tuple[int, ...] | None = None


Rule = Callable[[torch.fx.Node, dict, int], "Decision | None"]


@dataclass(frozen=True)
class RuleEntry:
    """A registered rule and whether it understands padded shards (vocab padding)."""

    fn: Rule
    padding_aware: bool


REGISTRY: dict[object, RuleEntry] = {}


def rule(*ops, padding_aware: bool = False) -> Callable[[Rule], Rule]:
    """Register the decorated function as the rule of `ops` (overload packets)."""

    def register(fn: Rule) -> Rule:
        for op in ops:
            packet = packet_of(op)
            if packet in REGISTRY:
                raise ValueError(f"op {packet} already has the rule {REGISTRY[packet].fn.__name__}")
            REGISTRY[packet] = RuleEntry(fn, padding_aware)
        return fn

    return register


def rule_for(target) -> Rule | None:
    """The rule of an op (by overload packet), or None; in-place ops (`add_`) follow their
    out-of-place op, whose result they equal."""
    packet = packet_of(target)
    entry = REGISTRY.get(packet)
    name = getattr(packet, "__name__", "")
    if entry is None and name.endswith("_") and not name.startswith("_"):
        entry = REGISTRY.get(getattr(aten, name[:-1], None))
    return entry.fn if entry else None


def handles_padding(target) -> bool:
    """Whether the op's rule understands padded shards (vocab padding)."""
    entry = REGISTRY.get(packet_of(target))
    return entry is not None and entry.padding_aware


def packet_of(target):
    """The overload packet of an op (`aten.add` for `aten.add.Tensor`), or the target itself."""
    return getattr(target, "overloadpacket", target)


def hint_int(size) -> int:
    """Example value of a possibly symbolic size (the name moved between torch 2.9 and 2.13)."""
    if isinstance(size, int):
        return size
    for name in ("hint_int", "optimization_hint", "guarding_hint_or_throw"):
        fn = getattr(_symbolic, name, None)
        if fn is not None:
            return int(fn(size))
    return int(size.node.hint)


def shape_of(node) -> tuple[int, ...]:
    """Example sizes of a node's tensor value (symbolic sizes by their hints)."""
    return shape_of_val(node.meta.get("val"))


def shape_of_val(val) -> tuple[int, ...]:
    """Example sizes of a tensor value (symbolic sizes by their hints)."""
    return tuple(hint_int(s) for s in val.shape)


def is_tensor_node(arg) -> bool:
    """A node whose value is a tensor or a tuple of tensors (split, chunk)."""
    if not isinstance(arg, torch.fx.Node):
        return False
    val = arg.meta.get("val")
    if isinstance(val, (list, tuple)):
        return bool(val) and all(isinstance(v, torch.Tensor) for v in val)
    return isinstance(val, torch.Tensor)


def tensor_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Tensor-valued input nodes in argument order, each once."""
    seen: dict[torch.fx.Node, None] = {}

    def visit(arg):
        if is_tensor_node(arg):
            seen.setdefault(arg, None)
        return arg

    torch.fx.node.map_arg((node.args, node.kwargs), visit)
    return list(seen)


def norm_dim(dim: int, ndim: int) -> int:
    """A dim index made non-negative."""
    return dim + ndim if dim < 0 else dim


def view_groups(in_shape, out_shape):
    """Pair runs of input dims with runs of output dims whose products match."""
    groups, i, j = [], 0, 0
    while i < len(in_shape) or j < len(out_shape):
        if i < len(in_shape) and in_shape[i] == 1 and (j >= len(out_shape) or out_shape[j] != 1):
            groups.append(([i], []))
            i += 1
            continue
        if j < len(out_shape) and out_shape[j] == 1 and (i >= len(in_shape) or in_shape[i] != 1):
            groups.append(([], [j]))
            j += 1
            continue
        if i >= len(in_shape) or j >= len(out_shape):
            return None
        ins, outs, pi, pj = [i], [j], in_shape[i], out_shape[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < len(in_shape):
                pi *= in_shape[i]
                ins.append(i)
                i += 1
            elif pj < pi and j < len(out_shape):
                pj *= out_shape[j]
                outs.append(j)
                j += 1
            else:
                return None
        groups.append((ins, outs))
    return groups
