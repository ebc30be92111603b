"""The rule tests' harness: an op on given inputs, sharded by the compiler's own passes, checked.

`run_sharded` captures a module holding the inputs (parameters, so plans can seed them), gives
them placements, runs propagation and partition as autoshard does, scatters the inputs and runs
every rank in the simulator. `assert_matches_unsharded` compares each rank's outputs and the
input gradients with the unsharded op. Shared by the hand-written rows (test_rules.py) and the
OpInfo sweep (test_opinfo_rules.py).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree

from nxd_autoshard.compiler.capture import capture
from nxd_autoshard.compiler.normalize import expert_linear_from_grouped_mm
from nxd_autoshard.compiler.partition import partition
from nxd_autoshard.compiler.propagate import PropagationResult, propagate_placements
from nxd_autoshard.ir.meta import placement_of
from nxd_autoshard.ir.placements import Replicate
from nxd_autoshard.ir.program import CapturedProgram
from nxd_autoshard.runtime.simulator import scatter_to_ranks, simulate_graph

__all__ = [
    "FALLBACK_NOTE",
    "Holder",
    "Sharded",
    "assert_matches_unsharded",
    "capture_op",
    "run_sharded",
]

FALLBACK_NOTE = "no sharding rule for these placements"


class Holder(torch.nn.Module):
    """The inputs as parameters (floating, or any tensor in `placed`) or buffers (ids, masks)."""

    def __init__(self, fn: Callable, tensors: list, placed=frozenset(), grad: bool = True):
        super().__init__()
        self.fn, self.names = fn, [f"in{i}" for i in range(len(tensors))]
        for i, (name, t) in enumerate(zip(self.names, tensors)):
            if t.dtype.is_floating_point or i in placed:
                param = torch.nn.Parameter(t.detach().clone(), grad and t.dtype.is_floating_point)
                self.register_parameter(name, param)
            else:
                self.register_buffer(name, t.clone())

    def forward(self):
        return self.fn(*(getattr(self, n) for n in self.names))


def capture_op(fn: Callable, tensors: list, placed=frozenset(), grad: bool = True):
    """The captured program of `fn(*tensors)`; `placed`: indices of non-floating inputs that get
    a placement (a sharded mask), which must be parameters for the plan to reach them.
    grad: whether floating inputs require grad (False for ops with no derivative)."""
    program = capture(Holder(fn, tensors, frozenset(placed), grad), (), dynamic=False)
    program.gm = expert_linear_from_grouped_mm(program.gm)
    return program


@dataclass
class Sharded:
    """One sharded run: the program after partition, its decisions, and both results."""

    program: CapturedProgram
    result: PropagationResult
    full: list[torch.Tensor]  # the unsharded inputs (floating ones require grad)
    outs: list  # per flat output: one tensor per rank
    want: list[torch.Tensor]  # flat outputs of the unsharded fn
    ops: dict  # node -> its op's overload packet as propagation saw it (partition retargets some)
    placed_in: dict  # node -> the placements its input nodes had, before partition

    def decision_of(self, packet):
        """The first node whose op is `packet`, and its decision."""
        node = next(n for n, p in self.ops.items() if p is packet)
        return node, self.result.decisions[node]


def _packet(node):
    return getattr(node.target, "overloadpacket", node.target)


def _padded_size(size: int, tp: int) -> int:
    return -(-size // tp) * tp


def run_sharded(
    fn: Callable,
    tensors: list[torch.Tensor],
    placements: tuple,
    tp: int,
    *,
    padded: tuple[int, ...] = (),
    program: CapturedProgram | None = None,
    grad: bool = True,
) -> Sharded:
    """Shard `fn(*tensors)` with the inputs placed as given and run every rank.

    padded: indices of inputs whose shard dim 0 is vocab-padded to a multiple of tp.
    program: a capture of the same fn and inputs to reuse (it is copied, not rewritten).
    grad: whether floating inputs require grad (False for ops with no derivative).
    """
    placed = frozenset(i for i, p in enumerate(placements) if not isinstance(p, Replicate))
    if program is None:
        program = capture_op(fn, tensors, placed, grad)
    else:
        program = copy.deepcopy(program)
    names = [f"in{i}" for i in range(len(tensors))]
    params = {n for n, k in zip(program.state_names, program.state_kinds) if k == "parameter"}
    fixed = {n: p for n, p in zip(names, placements) if n in params}
    missing = [n for n, p in zip(names, placements) if n not in params and p != Replicate()]
    assert not missing, f"inputs {missing} are buffers: a placement cannot reach them"
    pads = {names[i]: _padded_size(tensors[i].shape[0], tp) for i in padded}
    result = propagate_placements(program, tp, styles={}, fixed=fixed, auto=False, padded=pads)
    calls = [n for n in program.gm.graph.nodes if n.op == "call_function"]
    ops = {n: _packet(n) for n in calls}
    placed_in = {n: [placement_of(a) for a in n.all_input_nodes] for n in calls}
    partition(program, result, tp)

    full = [t.detach().clone().requires_grad_(grad and t.is_floating_point()) for t in tensors]
    per_rank = []
    for name in program.state_names:
        if name in program.constants:  # a tensor the op made (lifted by export): every rank's
            per_rank.append(program.constants[name])
            continue
        i = names.index(name)
        if name not in fixed:
            per_rank.append(full[i])
            continue
        blocks = result.blocks.get(name, 1)
        per_rank.append(
            scatter_to_ranks(full[i], placements[i], tp, blocks, result.padded.get(name))
        )
    outs = pytree.tree_leaves(simulate_graph(program.gm, tp, per_rank))
    want = pytree.tree_leaves(fn(*full))
    return Sharded(program, result, full, outs, want, ops, placed_in)


def assert_matches_unsharded(run: Sharded, tp: int, *, msg: str = "", **tolerances) -> None:
    """Every rank's outputs equal the unsharded op's, and so do the gradients of the inputs
    (of a random weighting of the floating outputs); NaN matches NaN."""
    tol = {"equal_nan": True, **tolerances}
    assert len(run.outs) == len(run.want), msg
    tensors = [(got, ref) for got, ref in zip(run.outs, run.want) if isinstance(ref, torch.Tensor)]
    for k, (got, ref) in enumerate(tensors):
        for r in range(tp):  # every rank ends with the whole output
            torch.testing.assert_close(
                got[r], ref, msg=lambda m, k=k, r=r: f"{msg}\noutput {k} rank {r}: {m}", **tol
            )
    differentiable = [
        (got, ref) for got, ref in tensors if ref.dtype.is_floating_point and ref.requires_grad
    ]
    inputs = [t for t in run.full if t.requires_grad]
    if not differentiable or not inputs:
        return
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(ref.shape, generator=gen, dtype=ref.dtype) for _, ref in differentiable]
    # NaN outputs (log of a negative input) would make every gradient NaN: they are left out
    weights = [w.masked_fill(ref.isnan(), 0) for w, (_, ref) in zip(weights, differentiable)]
    ref_loss = sum((ref.nan_to_num() * w).sum() for (_, ref), w in zip(differentiable, weights))
    try:
        ref_grads = torch.autograd.grad(ref_loss, inputs, allow_unused=True)
    except RuntimeError as error:
        if "is not implemented" in str(error):
            return  # the op itself has no derivative here (scatter with reduce=): values only
        raise
    loss = sum(
        (got[r].nan_to_num() * w).sum()
        for (got, _), w in zip(differentiable, weights)
        for r in range(tp)
    )
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    for k, (g, ref) in enumerate(zip(grads, ref_grads)):
        if ref is None:
            assert g is None or not g.abs().sum(), f"{msg}\ninput {k}: a gradient where none is due"
        else:
            assert g is not None, f"{msg}\ninput {k}: no gradient"
            torch.testing.assert_close(
                g, ref, msg=lambda m, k=k: f"{msg}\ngrad of input {k}: {m}", **tol
            )
