"""Typed accessors for what passes record on nodes and graphs: the only place the keys are spelled.

capture names the state placeholders (`set_state`); split_bias links a bias add to its linear;
propagate numbers nodes and records placements and padded sizes; partition marks the graph as
one rank's (`set_tp`); the recompute pass names regions. Readers (rules, report, printers) use
the getters, which answer None for a node, or a non-node argument, that has no record.
"""

from __future__ import annotations

import torch.fx

from nxd_autoshard.ir.placements import Placement

__all__ = [
    "index_of",
    "is_parameter",
    "padded_of",
    "placement_of",
    "recompute_of",
    "sequence_sharded",
    "set_index",
    "set_padded",
    "set_placement",
    "set_recompute",
    "set_sequence",
    "set_split_bias",
    "set_state",
    "set_tp",
    "split_bias_of",
    "state_kind_of",
    "state_name_of",
    "tp_of",
]

_PLACEMENT = "nxd_placement"  # Placement (or a tuple of them for multi-output nodes)
_PADDED = "nxd_padded"  # padded global size of the shard dim (vocab padding), or None
_NAME = "nxd_name"  # qualified name of a state placeholder (`model.layers.0.mlp.up_proj.weight`)
_KIND = "nxd_kind"  # "parameter", "buffer" or "constant" for state placeholders
_BIAS = "nxd_bias"  # on a linear: the bias node split_bias moved into an add
_INDEX = "nxd_index"  # topological position, for ordered decisions
_RECOMPUTE = "nxd_recompute"  # name of the region recomputed in backward
_SEQUENCE = "nxd_sequence"  # True on a node the sequence-parallel pass put on sequence shards
_TP = "nxd_tp"  # on a graph: the tp degree its local program was partitioned for


def _meta(node) -> dict:
    return node.meta if isinstance(node, torch.fx.Node) else {}


def placement_of(node) -> Placement | tuple | None:
    return _meta(node).get(_PLACEMENT)


def set_placement(node: torch.fx.Node, placement: Placement | tuple | None) -> None:
    node.meta[_PLACEMENT] = placement


def padded_of(node) -> int | None:
    return _meta(node).get(_PADDED)


def set_padded(node: torch.fx.Node, size: int | None) -> None:
    node.meta[_PADDED] = size


def state_name_of(node) -> str | None:
    return _meta(node).get(_NAME)


def state_kind_of(node) -> str | None:
    return _meta(node).get(_KIND)


def is_parameter(node) -> bool:
    return state_kind_of(node) == "parameter"


def set_state(node: torch.fx.Node, name: str, kind: str) -> None:
    node.meta[_NAME], node.meta[_KIND] = name, kind


def split_bias_of(node) -> torch.fx.Node | None:
    return _meta(node).get(_BIAS)


def set_split_bias(node: torch.fx.Node, bias: torch.fx.Node) -> None:
    node.meta[_BIAS] = bias


def index_of(node: torch.fx.Node) -> int:
    return node.meta[_INDEX]


def set_index(node: torch.fx.Node, index: int) -> None:
    node.meta[_INDEX] = index


def recompute_of(node) -> str | None:
    return _meta(node).get(_RECOMPUTE)


def set_recompute(node: torch.fx.Node, region: str | None) -> None:
    """Mark a node as part of a recomputed region, or (None) unmark it."""
    if region is None:
        node.meta.pop(_RECOMPUTE, None)
    else:
        node.meta[_RECOMPUTE] = region


def sequence_sharded(node) -> bool:
    return bool(_meta(node).get(_SEQUENCE))


def set_sequence(node: torch.fx.Node) -> None:
    node.meta[_SEQUENCE] = True


def tp_of(gm: torch.fx.GraphModule) -> int:
    """The tp degree a local program was partitioned for (1 for a global program)."""
    return int(gm.meta.get(_TP, 1))


def set_tp(gm: torch.fx.GraphModule, tp: int) -> None:
    gm.meta[_TP] = tp
