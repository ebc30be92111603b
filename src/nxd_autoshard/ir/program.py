"""Capture an unmodified nn.Module into an FX graph with torch.export (non-strict) on fake tensors."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch.utils import _pytree as pytree


def check_token_ids(ids: torch.Tensor, vocab_size: int, *, ignore_index: int | None = None) -> None:
    """Raise as the unsharded embedding / cross-entropy would on an id outside the vocabulary.

    A rank masks ids outside its vocab shard, so without this an id past the vocabulary would
    quietly embed to zeros (or add no loss) instead of failing as in the original model. It runs
    on the user's inputs (`CapturedProgram.token_inputs`), not inside the op, whose pipeline
    warm-up runs see uninitialised buffers.
    """
    if ids.device.type == "meta" or ids.numel() == 0:
        return
    if torch.compiler.is_compiling():  # no .item() in a graph: an assert op the backend keeps
        inside = (ids >= 0) & (ids < vocab_size)
        if ignore_index is not None:
            inside = inside | (ids == ignore_index)
        torch._assert_async(
            inside.all(),
            f"a token id is outside the vocabulary of {vocab_size} (ids must be in "
            f"[0, {vocab_size})); the unsharded model raises here too",
        )
        return
    real = ids if ignore_index is None else ids[ids != ignore_index]
    if real.numel() == 0:
        return
    low, high = int(real.min()), int(real.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise IndexError(
            f"token id {bad} is outside the vocabulary of {vocab_size} (ids must be in "
            f"[0, {vocab_size})); the unsharded model raises here too"
        )


@dataclass
class CapturedProgram:
    """A captured forward: `gm(*state, *flat_user_inputs)` returns the new values of the
    `mutated` buffers, then the flat user outputs.

    `state_names[i]` is the qualified name (`model.layers.0.mlp.up_proj.weight`) of the
    i-th placeholder; the user inputs follow. `in_spec`/`out_spec` rebuild the call's
    (args, kwargs) and the model's output structure (e.g. a `CausalLMOutputWithPast`).
    `mutated` names the buffers the forward writes (BatchNorm running stats, a counter), in
    the order of their new values at the front of the outputs; each is replicated, and a
    runtime stores it into the buffer after the call, as the unsharded forward would.
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
    # (flat user-input index, vocab size, ignore index or None) of token ids a vocab-parallel
    # op reads: checked against the vocabulary at every call, as the unsharded ops would
    token_inputs: list[tuple[int, int, int | None]] = field(default_factory=list)
    # sequence parallelism: (flat user-input index, dim) of the sequences split into tp equal
    # parts (a length tp does not divide needs the padded program: captured again)
    sequence_inputs: list[tuple[int, int]] = field(default_factory=list)
    sequence_tp: int = 1
    mutated: list[str] = field(default_factory=list)

    def check_token_inputs(self, flat_inputs: list[Any]) -> None:
        """IndexError when a token id input is outside the vocabulary (see `check_token_ids`)."""
        for index, vocab, ignore in self.token_inputs:
            value = flat_inputs[index] if index < len(flat_inputs) else None
            if isinstance(value, torch.Tensor):
                check_token_ids(value, vocab, ignore_index=ignore)

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
        for index, dim in self.sequence_inputs:
            value = flat_inputs[index] if index < len(flat_inputs) else None
            if isinstance(value, torch.Tensor) and value.dim() > dim:
                if value.shape[dim] % self.sequence_tp:
                    return False
        return True


def split_written(mutated: list[str], outs) -> tuple[list, list]:
    """A program's outputs (values, or the output node's arguments) cut in two: the new values
    of the `mutated` buffers, which come first, and the rest (the user's or a stage's outputs)."""
    n = len(mutated)
    return list(outs[:n]), list(outs[n:])


def graph_module(root: torch.nn.Module, graph: torch.fx.Graph) -> torch.fx.GraphModule:
    """A GraphModule whose Python code is generated at its first call (or `.code`), not at
    every `recompile()`: the passes recompile after each change, and generating the code of a
    70B model's program costs ~0.4 s a time, for a program that planning never runs."""
    try:
        from torch.fx._lazy_graph_module import _LazyGraphModule
    except ImportError:  # an older torch: generate it now
        return torch.fx.GraphModule(root, graph)
    return _LazyGraphModule(root, graph)


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
    """One pipeline stage: `gm(*state, *inputs)` returns the new values of the `mutated`
    buffers (the ones this stage holds and the forward writes), then `outputs` (or the model's
    outputs if last)."""

    index: int
    gm: torch.fx.GraphModule
    state_names: list[str]
    inputs: list[str]
    outputs: list[str]
    blocks: list[str] = field(default_factory=list)
    units: list[str] = field(default_factory=list)
    is_last: bool = False
    mutated: list[str] = field(default_factory=list)


_BLOCK = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def block_of(path: str) -> str | None:
    """The repeated block a module path belongs to (`model.layers.3`), or None."""
    match = _BLOCK.match(path)
    return match.group(1) if match else None
