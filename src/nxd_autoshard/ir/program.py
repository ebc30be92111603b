"""Capture an unmodified nn.Module into an FX graph with torch.export (non-strict) on fake tensors."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch.utils import _pytree as pytree


@dataclass
class CapturedProgram:
    """A captured forward: `gm(*state, *flat_user_inputs)` returns the flat user outputs.

    `state_names[i]` is the qualified name (`model.layers.0.mlp.up_proj.weight`) of the
    i-th placeholder; the user inputs follow. `in_spec`/`out_spec` rebuild the call's
    (args, kwargs) and the model's output structure (e.g. a `CausalLMOutputWithPast`).
    """

    gm: torch.fx.GraphModule
    state_names: list[str]
    state_kinds: list[str]
    user_input_names: list[str]
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    training: bool
    static_dims: list[tuple[int, ...] | None] = field(default_factory=list)
    history: list = field(default_factory=list)  # history.PassRecord per pass run on `gm`
    constants: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_state(self) -> int:
        return len(self.state_names)

    def accepts(self, flat_inputs: list[Any]) -> bool:
        """Whether flat user inputs fit the shapes this program was specialised to."""
        for value, static in zip(flat_inputs, self.static_dims):
            if static is None:
                continue
            if not isinstance(value, torch.Tensor) or value.dim() != len(static):
                return False
            for size, want in zip(value.shape, static):
                if want >= 0 and size != want:
                    return False
        return True


def module_path(node: torch.fx.Node) -> str:
    """Qualified name of the innermost module a node came from ('' for top level)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return _normalize_module_path(path)


def _normalize_module_path(path: str) -> str:
    # export may spell paths like "L['self'].layers[0].mlp" in some torch versions
    path = path.replace("L['self'].", "").replace("L['self']", "")
    out = []
    for part in path.replace("]", "").replace("[", ".").split("."):
        if part:
            out.append(part.strip("'\""))
    return ".".join(out)


def input_signature(args: tuple, kwargs: dict) -> tuple:
    """Hashable structure of a call: the pytree spec plus the non-tensor leaves."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    marks = tuple(
        ("T", leaf.dtype, leaf.dim()) if isinstance(leaf, torch.Tensor) else ("V", repr(leaf))
        for leaf in leaves
    )
    return (str(spec), marks)


@dataclass
class BlockCost:
    """Forward FLOPs, parameter count and parameter bytes (per rank) of one unit."""

    name: str
    flops: int = 0
    params: int = 0
    param_bytes: int = 0


@dataclass
class StageProgram:
    """One pipeline stage: `gm(*state, *inputs)` returns `outputs` (or the model's outputs if last)."""

    index: int
    gm: torch.fx.GraphModule
    state_names: list[str]
    inputs: list[str]
    outputs: list[str]
    blocks: list[str] = field(default_factory=list)
    units: list[str] = field(default_factory=list)
    is_last: bool = False


_BLOCK = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def block_of(path: str) -> str | None:
    """The repeated block a module path belongs to (`model.layers.3`), or None."""
    match = _BLOCK.match(path)
    return match.group(1) if match else None

