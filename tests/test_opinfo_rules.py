"""Every sharding rule against the op itself, on PyTorch's OpInfo samples (as DTensor checks its
own rules in torch's test_dtensor_ops.py).

For each OpInfo whose captured graph holds an op of the rule registry: its samples (float32 on
CPU, capped per op), each at tp 2 and 4 with bounded combinations of input placements (Shard on
every dim tp divides, Partial, Replicate), go through the compiler's propagate and partition
passes and the simulator; every rank's output and every input gradient must equal the
unsharded op's. Where a rule refuses, the gather-to-Replicate fallback runs and must be right
too. An `AutoshardError` is a loud refusal and passes; a wrong number or any other exception
fails.

Which aten ops an OpInfo exercises is read from its captured graph (a tiny module calling the
op on the sample), not from its name: `nn.functional.softsign` is abs, add and div, `__rdiv__`
is reciprocal and mul. NXD_OPINFO_SAMPLES / NXD_OPINFO_PLACEMENTS raise the caps;
NXD_OPINFO_REPORT=path appends one JSON line per OpInfo (what the RESULTS.md counts come from).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import types

import pytest
import torch
from rulecheck import FALLBACK_NOTE, assert_matches_unsharded, capture_op, run_sharded
from torch.testing._internal.common_methods_invocations import op_db
from torch.utils import _pytree as pytree

from nxd_autoshard.ir.errors import AutoshardError
from nxd_autoshard.ir.placements import Partial, Replicate, Shard
from nxd_autoshard.rules import REGISTRY

MAX_SAMPLES = int(os.environ.get("NXD_OPINFO_SAMPLES", "2"))
MAX_PLACEMENTS = int(os.environ.get("NXD_OPINFO_PLACEMENTS", "5"))
TPS = (2, 4)
PIECES = 4  # floating inputs are this many pieces summed (see _Case.fn); every tp divides it
R = Replicate()

_RULED_NAMES = {getattr(p, "__name__", None) for p in REGISTRY}

# ops whose result is random or uninitialised: no two runs agree, sharded or not
_UNDEFINED_VALUES = {"empty_like", "new_empty", "new_empty_strided", "empty", "empty_strided"}


def _draws_random(program) -> bool:
    """Whether the captured sample draws random numbers (dropout, rrelu, fractional pooling):
    each rank draws its own, so no sharding can equal the unsharded op."""
    for node in program.gm.graph.nodes:
        target = node.target
        if not isinstance(target, torch._ops.OpOverload):
            continue
        if torch.Tag.nondeterministic_seeded not in target.tags:
            continue
        args = {a.name: v for a, v in zip(target._schema.arguments, node.args)} | node.kwargs
        # dropout with p=0 or in eval mode, and attention without dropout, draw nothing
        if args.get("p", args.get("dropout_p")) == 0 or args.get("train") is False:
            continue
        return True
    return False


def _candidate(op) -> bool:
    """Whether the OpInfo can capture to an op with a rule. A torch builtin captures as its own
    aten op (`nn.functional.softplus` as `aten.softplus`); only other callables (Python functions
    such as nn.functional.* and masked.*, the __r*__ lambdas, method descriptors) can build a
    graph of other ops, so those are all captured to see."""
    if op.name in _UNDEFINED_VALUES:
        return False
    own = {op.aten_name, op.name.rsplit(".", 1)[-1]}
    return not isinstance(op.op, types.BuiltinFunctionType) or bool(own & _RULED_NAMES)


CANDIDATES = [op for op in op_db if _candidate(op)]


def _dtype(op):
    """float32, or for integer-only ops (bitwise_and) the first integer or bool dtype they take."""
    supported = op.supported_dtypes("cpu")
    for dtype in (torch.float32, torch.int64, torch.bool):
        if dtype in supported:
            return dtype
    return None


class _Case:
    """A sample as a function of its tensor leaves (input, args and kwargs flattened)."""

    def __init__(self, op, sample):
        leaves, self.spec = pytree.tree_flatten((sample.input, sample.args, sample.kwargs))
        self.leaves = leaves
        self.index = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        self.tensors = [leaves[i].detach().clone() for i in self.index]
        self.op = op

    def __str__(self) -> str:
        def show(x):
            return f"T{tuple(x.shape)}" if isinstance(x, torch.Tensor) else x

        inp, args, kwargs = pytree.tree_unflatten([show(x) for x in self.leaves], self.spec)
        return f"({inp}, *{args}, **{kwargs})"

    def fn(self):
        """The op on the tensors, each floating one given as PIECES pieces summed over a new
        leading dim: placing the pieces Shard(0) makes that input Partial (each rank holds
        some pieces), Shard(d + 1) makes it Shard(d), so one capture serves every placement."""

        def call(*tensors):
            leaves = list(self.leaves)
            for i, t in zip(self.index, tensors):
                leaves[i] = t.sum(0) if t.dtype.is_floating_point else t
            inp, args, kwargs = pytree.tree_unflatten(leaves, self.spec)
            return self.op.op(inp, *args, **kwargs)

        return call

    def pieces(self) -> list[torch.Tensor]:
        """The tensors, floating ones as PIECES random pieces that sum to them."""
        gen = torch.Generator().manual_seed(2)
        out = []
        for t in self.tensors:
            if t.dtype.is_floating_point:
                rest = torch.randn((PIECES - 1, *t.shape), generator=gen, dtype=t.dtype)
                t = torch.cat([rest, (t - rest.sum(0)).unsqueeze(0)])
            out.append(t)
        return out

    def given(self, placements) -> tuple:
        """The placements of the pieces that give the inputs `placements`."""
        out = []
        for t, p in zip(self.tensors, placements):
            if t.dtype.is_floating_point:
                p = (
                    Shard(0)
                    if isinstance(p, Partial)
                    else Shard(p.dim + 1)
                    if isinstance(p, Shard)
                    else p
                )
            out.append(p)
        return tuple(out)


def _options(t: torch.Tensor, tp: int) -> list:
    shards = [Shard(d) for d, size in enumerate(t.shape) if size and size % tp == 0]
    return [R, *shards] + ([Partial()] if t.dtype.is_floating_point else [])


def _placements(case: _Case, tp: int, seed: str) -> list[tuple]:
    """Bounded input placements: shards aligned across inputs (what broadcasting, cat and
    batched matmul need) and all-Partial, each input placed alone, then random combinations
    (a fixed seed); round robin over the three so no kind crowds out the others."""
    options = [_options(t, tp) for t in case.tensors]
    n = len(options)
    groups = []
    for k in range(1, max(t.dim() for t in case.tensors) + 1):
        right = tuple(
            Shard(t.dim() - k) if Shard(t.dim() - k) in o else R
            for t, o in zip(case.tensors, options)
        )
        left = tuple(Shard(k - 1) if Shard(k - 1) in o else R for o in options)
        groups += [c for c in (right, left) if sum(p != R for p in c) > 1]
    partial = tuple(Partial() if Partial() in o else R for o in options)
    if sum(p != R for p in partial) > 1:
        groups.append(partial)
    singles = [
        tuple(p if j == i else R for j in range(n)) for i, o in enumerate(options) for p in o[1:]
    ]
    rng = random.Random(seed)
    rest = [tuple(rng.choice(o) for o in options) for _ in range(MAX_PLACEMENTS)]
    chosen: list[tuple] = []
    for trio in itertools.zip_longest(groups, singles, rest):
        chosen += [c for c in trio if c is not None and c not in chosen and any(p != R for p in c)]
    return chosen[:MAX_PLACEMENTS]


def _mark_pieces_sums(program) -> None:
    """Mark the sums that assemble floating inputs from their pieces: they are not the sample's."""
    for n in program.gm.graph.nodes:
        if n.target is torch.ops.aten.sum.dim_IntList and n.args[0].op == "placeholder":
            n.meta["pieces_sum"] = True


def _op_nodes(nodes):
    """The sample's own nodes: not the sums that assemble floating inputs from their pieces."""
    return [n for n in nodes if n.op == "call_function" and not n.meta.get("pieces_sum")]


def _ruled_nodes(run):
    """Nodes of ops with a rule whose inputs reached them sharded or Partial (so the rule, not
    the all-Replicate shortcut, decided)."""
    out = []
    for node in _op_nodes(run.ops):
        packet = run.ops[node]
        if packet not in REGISTRY or node not in run.result.decisions:
            continue
        if all(p == R or p is None for p in run.placed_in[node]):
            continue
        out.append((node, packet))
    return out


def _report(line: dict) -> None:
    path = os.environ.get("NXD_OPINFO_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")


@pytest.mark.filterwarnings("ignore")  # fallbacks warn by design; the numbers are checked
@pytest.mark.parametrize(
    "op", CANDIDATES, ids=[f"{o.name}.{o.variant_test_name}".rstrip(".") for o in CANDIDATES]
)
def test_opinfo_samples_match_unsharded(op):
    dtype = _dtype(op)
    if dtype is None:
        pytest.skip("no float32, integer or bool dtype on CPU")
    grad = op.supports_autograd and dtype.is_floating_point
    checked: dict[str, list[int]] = {}  # op -> [placements the rule took, placements refused]
    samples = placements_seen = loud = 0
    tries = 0  # samples captured: the op's graph is known after a few
    for k, sample in enumerate(op.sample_inputs("cpu", dtype, requires_grad=False)):
        if samples >= MAX_SAMPLES or tries - samples >= 2 or k >= MAX_SAMPLES + 6:
            break
        case = _Case(op, sample)
        if not case.tensors or any(
            t.numel() == 0 or t.layout != torch.strided for t in case.tensors
        ):
            continue  # nothing to shard in empty tensors; sparse ones are not supported
        tensors = case.pieces()
        try:
            program = capture_op(case.fn(), tensors, range(len(tensors)), grad)
        except Exception:  # data-dependent or untraceable samples: nothing to shard
            continue
        tries += 1
        _mark_pieces_sums(program)
        nodes = _op_nodes(program.gm.graph.nodes)
        packets = {getattr(n.target, "overloadpacket", n.target) for n in nodes}
        if not packets & REGISTRY.keys() or _draws_random(program):
            continue
        samples += 1
        for tp in TPS:
            for placements in _placements(case, tp, f"{op.name}/{k}/{tp}"):
                where = f"{op.name} sample {k} {case} at tp={tp}, inputs placed {placements}"
                try:
                    run = run_sharded(
                        case.fn(), tensors, case.given(placements), tp, program=program, grad=grad
                    )
                except AutoshardError:
                    loud += 1
                    continue
                placements_seen += 1
                decided = _ruled_nodes(run)
                for node, packet in decided:
                    taken = run.result.decisions[node].note != FALLBACK_NOTE
                    checked.setdefault(str(packet), [0, 0])[0 if taken else 1] += 1
                notes = "\n".join(
                    f"  {node.name} ({packet}): {run.result.decisions[node]}"
                    for node, packet in decided
                )
                assert_matches_unsharded(
                    run, tp, msg=f"{where}\ndecisions:\n{notes}", rtol=1e-4, atol=1e-4
                )
    _report(
        {
            "opinfo": f"{op.name}.{op.variant_test_name}",
            "samples": samples,
            "placements": placements_seen,
            "loud": loud,
            "rules": checked,
        }
    )
    if not samples:
        pytest.skip("no sample captures to an op with a rule")
