"""torch-xla lowering: one rank's local program traced on the XLA device, its collectives XLA
collectives with replica groups built from the mesh, as NxD lowers its parallel layers
(`xm.all_reduce` / `xm.all_gather` / `xm.reduce_scatter` with `groups=`).

The program every tp rank of a stage runs is one graph; here it also becomes one HLO module.
Nothing rank-dependent is a constant of it: the rank's tp coordinate is a tensor input (an HLO
parameter), read where the program keeps its own vocab rows or chunk (vocab-parallel embedding
and loss, `shard`, the local chunk in all-gather's backward). Replica groups list every group
of the axis, so they do not depend on the rank either. `trace_rank` records the lazy graph of
one rank's forward (and backward) without running it; `canonical_hlo` strips what differs
between two traces of one program (module counter, op metadata), so equal text is one program.

torch-xla is imported lazily: without it these functions raise an ImportError that says what to
install (`make test-xla` builds `.venv-xla` with torch 2.9.0 + torch-xla 2.9.0).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from nxd_autoshard.ir import ops
from nxd_autoshard.ir.mesh import Mesh
from nxd_autoshard.runtime.collectives import (
    AllGather,
    AllGatherRS,
    AllReduce,
    AmaxAllReduce,
    GradAllReduce,
    LogsumexpAllReduce,
    MaxDimAllReduce,
    ReduceScatter,
    Shard,
    argmax_forward,
    draw_mask,
    local_vocab_embedding,
    reduce_loss,
    vocab_cross_entropy_backward,
    vocab_cross_entropy_forward,
)
from nxd_autoshard.runtime.recompute import RECOMPUTED_KEY, with_recompute

__all__ = [
    "XLA_HELP",
    "RankTrace",
    "canonical_hlo",
    "hlo_collectives",
    "program_collectives",
    "replica_groups",
    "require_xla",
    "trace_rank",
    "xla_device",
    "xla_ops",
]

XLA_HELP = (
    "the torch-xla lowering needs torch-xla: pip install torch==2.9.0 torch-xla==2.9.0 (PyPI; "
    "run on CPU with PJRT_DEVICE=CPU), or `make test-xla`, which builds .venv-xla with them"
)


def require_xla():
    """torch_xla and its xla_model module, or an ImportError naming the package to install."""
    try:
        import torch_xla
        import torch_xla.core.xla_model as xm
    except ImportError as err:
        raise ImportError(f"{XLA_HELP} (import torch_xla: {err})") from err
    return torch_xla, xm


def xla_device() -> torch.device:
    """The XLA device (starting the runtime; PJRT_DEVICE=CPU when nothing else is set)."""
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    torch_xla, _ = require_xla()
    return torch_xla.device()


def replica_groups(mesh: Mesh) -> dict[str, list[list[int]]]:
    """Every group of global ranks along each mesh axis (NxD's order: tp fastest, then pp, dp)."""
    return {axis: mesh.groups(axis) for axis in ("tp", "pp", "dp")}


# ------------------------------------------------------------------ the collectives as XLA ops
def _local_chunk(x: torch.Tensor, dim: int, size: int, rank: torch.Tensor) -> torch.Tensor:
    """This rank's chunk of `x` along `dim`, picked by the rank tensor (a gather, not a constant slice)."""
    dim = dim % x.dim()
    parts = x.unflatten(dim, (size, x.shape[dim] // size))
    return parts.index_select(dim, rank.reshape(1)).squeeze(dim)


class _Lowering:
    """The ops of `ir.ops` for one rank: XLA collectives over the tp groups of `mesh`."""

    def __init__(self, mesh: Mesh, rank: torch.Tensor):
        _, self.xm = require_xla()
        self.mesh, self.rank = mesh, rank
        self.groups = mesh.groups("tp")
        self.size = mesh.tp

    def _functional(self) -> bool:
        """Under torch.compile, where the tp group is the whole world: torch's functional
        collectives, which Dynamo traces (xm's grouped ones are opaque C++ calls to it) and
        torch-xla lowers to the same XLA collectives (replica groups: all devices)."""
        return torch.compiler.is_compiling() and len(self.groups) == 1

    def reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        kind = {"sum": self.xm.REDUCE_SUM, "max": self.xm.REDUCE_MAX, "min": self.xm.REDUCE_MIN}[op]
        if self._functional():
            return torch.ops._c10d_functional.all_reduce(x.contiguous(), kind, "")
        return self.xm.all_reduce(kind, x.contiguous(), groups=self.groups)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        dim = dim % x.dim()
        if self._functional():
            first = x.movedim(dim, 0).contiguous()
            out = torch.ops._c10d_functional.all_gather_into_tensor(first, self.size, "")
            return out.movedim(0, dim)
        # pin_layout=False: a real all-gather (the pinned one is an all-reduce of a padded
        # buffer), as NxD's gather_from_tensor_model_parallel_region
        return self.xm.all_gather(x.contiguous(), dim, groups=self.groups, pin_layout=False)

    def reduce_scatter(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        dim = dim % x.dim()
        if self._functional():
            first = x.movedim(dim, 0).contiguous()
            out = torch.ops._c10d_functional.reduce_scatter_tensor(first, "sum", self.size, "")
            return out.movedim(0, dim)
        return self.xm.reduce_scatter(
            self.xm.REDUCE_SUM,
            x.contiguous(),
            1.0,
            dim,
            self.size,
            groups=self.groups,
            pin_layout=False,
        )

    def chunk(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return _local_chunk(x, dim, self.size, self.rank)

    def offset(self, n: int, ndim: int) -> torch.Tensor:
        """The global index of this rank's first entry along a dim of local size n (a tensor)."""
        return self.rank * n

    def implementations(self) -> dict[str, Any]:
        low = self

        def sequence_dropout(x, p, dim, axis, native=False, length=None):
            # this rank's part of the whole value's mask, sliced by the rank tensor (one program)
            keep = low.chunk(draw_mask(_on_tp(x, axis), p, dim, low.size, length), dim)
            out = x * keep * (0.0 if p >= 1 else 1.0 / (1.0 - p))
            return (out, keep) if native else out

        class CrossEntropy(torch.autograd.Function):
            @staticmethod
            def forward(ctx, logits, target, ignore_index, vocab_size):
                loss, saved = vocab_cross_entropy_forward(
                    logits, target, ignore_index, vocab_size, low.size, low.rank, low.reduce
                )
                ctx.save_for_backward(*saved)
                return loss

            @staticmethod
            def backward(ctx, grad):
                return vocab_cross_entropy_backward(ctx.saved_tensors, grad), None, None, None

        def cross_entropy(logits, target, reduction, ignore_index, vocab_size, axis):
            loss = CrossEntropy.apply(logits, target, ignore_index, vocab_size)
            return reduce_loss(loss, target, reduction, ignore_index)

        def embedding(weight, ids, padding_idx, vocab_size, axis):
            return local_vocab_embedding(weight, ids, padding_idx, low.rank, low.size, vocab_size)

        return {
            "all_reduce": lambda x, axis: AllReduce.apply(_on_tp(x, axis), low),
            "all_gather": lambda x, dim, axis: AllGather.apply(_on_tp(x, axis), dim, low),
            "all_gather_rs": lambda x, dim, axis: AllGatherRS.apply(_on_tp(x, axis), dim, low),
            "sequence_dropout": sequence_dropout,
            "reduce_scatter": lambda x, dim, axis: ReduceScatter.apply(_on_tp(x, axis), dim, low),
            "shard": lambda x, dim, axis: Shard.apply(_on_tp(x, axis), dim, low),
            "grad_all_reduce": lambda x, axis: GradAllReduce.apply(_on_tp(x, axis), low),
            "amax_all_reduce": lambda x, dims, keepdim, op, padding, axis: AmaxAllReduce.apply(
                _on_tp(x, axis), tuple(dims), keepdim, op, padding, low
            ),
            "max_dim_all_reduce": lambda x, dim, keepdim, op, padding, axis: MaxDimAllReduce.apply(
                _on_tp(x, axis), dim, keepdim, op, padding, low
            ),
            "argmax_all_reduce": lambda x, dim, keepdim, op, padding, axis: argmax_forward(
                _on_tp(x, axis), dim, keepdim, op, padding, low
            ),
            "logsumexp_all_reduce": lambda x, dims, keepdim, padding, axis: (
                LogsumexpAllReduce.apply(_on_tp(x, axis), tuple(dims), keepdim, padding, low)
            ),
            "vocab_parallel_embedding": embedding,
            "vocab_parallel_cross_entropy": cross_entropy,
        }


def _on_tp(x: torch.Tensor, axis: str) -> torch.Tensor:
    if axis != "tp":  # the partitioner only emits tp collectives (pp/dp are the step's, below)
        raise NotImplementedError(f"the XLA lowering has no collective over mesh axis '{axis}'")
    return x


@contextlib.contextmanager
def xla_ops(mesh: Mesh, rank: torch.Tensor) -> Iterator[None]:
    """Inside the block the program's collectives are XLA collectives of the rank whose tp
    coordinate is the 0-d integer tensor `rank` (on the XLA device)."""
    # xm.all_reduce short-circuits to a clone in a world of one device (a trace on one CPU
    # device of a tp 8 program); this makes it emit the collective the program will run
    saved = os.environ.get("XLA_ALWAYS_ALLREDUCE")
    os.environ["XLA_ALWAYS_ALLREDUCE"] = "1"
    try:
        with ops.bound(_Lowering(mesh, rank).implementations()):
            yield
    finally:
        if saved is None:
            os.environ.pop("XLA_ALWAYS_ALLREDUCE", None)
        else:
            os.environ["XLA_ALWAYS_ALLREDUCE"] = saved


# ------------------------------------------------------------------ tracing one rank's program
def on_device(gm: torch.fx.GraphModule, device: torch.device) -> torch.fx.GraphModule:
    """A copy of `gm` whose device constants (arange(..., device=cpu), ...) are `device`."""
    env: dict = {}
    graph = torch.fx.Graph()
    for node in gm.graph.nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])

    def swap(value):
        if isinstance(value, torch.device) and value.type != device.type:
            return device
        if isinstance(value, (list, tuple)):
            return type(value)(swap(v) for v in value)
        return value

    for node in graph.nodes:
        node.args = swap(node.args)
        node.kwargs = {k: swap(v) for k, v in node.kwargs.items()}
    out = torch.fx.GraphModule(gm, graph)
    out.meta.update({k: v for k, v in gm.meta.items() if k != RECOMPUTED_KEY})
    return out


@dataclass
class RankTrace:
    """One rank's traced program: the lazy XLA results (not run) and their HLO."""

    rank: int
    outputs: list[torch.Tensor]
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    input_grads: list[torch.Tensor | None] = field(default_factory=list)
    roles: dict[int, tuple[str, str]] = field(default_factory=dict)  # tensor id -> (role, name)

    def results(self) -> list[torch.Tensor]:
        """Every tensor the program computes, in a fixed order (outputs, then gradients)."""
        out = [t for t in self.outputs if isinstance(t, torch.Tensor)]
        out += [self.grads[n] for n in sorted(self.grads)]
        out += [g for g in self.input_grads if g is not None]
        return out

    def result_roles(self) -> list[tuple[str, str]]:
        """(role, name) of each element of the HLO's result tuple, as `results()` orders them."""
        out = [
            ("output", str(i)) for i, t in enumerate(self.outputs) if isinstance(t, torch.Tensor)
        ]
        out += [("gradient", n) for n in sorted(self.grads)]
        out += [("input_gradient", str(i)) for i, g in enumerate(self.input_grads) if g is not None]
        return out

    def hlo_text(self) -> str:
        torch_xla, _ = require_xla()
        return torch_xla._XLAC._get_xla_tensors_hlo(self.results())

    def parameters(self) -> list[dict]:
        """What feeds each HLO parameter, in parameter order: a state tensor, a program input,
        the rank input, a received gradient, or a scalar torch-xla hoisted out of the program
        (its value given: a launcher feeds it as torch-xla would)."""
        torch_xla, _ = require_xla()
        ids, data = torch_xla._XLAC._get_tensors_xla_device_data_node(self.results())
        out = []
        for index, (tensor_id, tensor) in enumerate(zip(ids, data)):
            role, name = self.roles.get(tensor_id, ("scalar", ""))
            entry = {"index": index, "role": role, "name": name}
            entry.update(shape=list(tensor.shape), dtype=str(tensor.dtype))
            if role == "scalar" and tensor.dim() == 0:
                entry["value"] = tensor.cpu().item()  # a host copy of device data, not a run
            out.append(entry)
        return out

    def hlo_proto(self) -> bytes:
        """The serialized HloModuleProto (what neuronx-cc --framework XLA compiles)."""
        torch_xla, _ = require_xla()
        return torch_xla._XLAC._get_xla_tensors_hlo_proto(self.results())


def trace_rank(
    gm: torch.fx.GraphModule,
    state: Sequence[torch.Tensor],
    inputs: Sequence[Any],
    *,
    mesh: Mesh,
    rank: int,
    state_names: Sequence[str] = (),
    params: Sequence[str] = (),
    backward: bool = True,
    grad_sync: Sequence[tuple[Sequence[str], list[list[int]], float]] = (),
    device: torch.device | None = None,
) -> RankTrace:
    """Record (lazily, nothing runs) global `rank`'s forward of its local program `gm` on the XLA
    device, and with `backward` its backward: from the loss (a 0-d first output) or from a
    cotangent input per float output (a pipeline stage). `state` is the rank's pieces of the
    program's state (named `state_names`; `params` get gradients), `inputs` its user inputs (CPU
    tensors, moved here). `grad_sync` (parameters, replica groups, scale) adds the step's
    gradient all-reduces, one coalesced all-reduce each: over dp (averaged) and across the pp
    ranks that hold a tied weight.
    """
    torch_xla, xm = require_xla()
    device = device or xla_device()
    torch_xla._XLAC._set_all_reduce_token(str(device), None)  # one chain per trace
    local = on_device(with_recompute(gm), device)
    raw_rank = _rank_input(mesh.coords(rank)["tp"], device)
    tp_rank = raw_rank.reshape(()) if isinstance(raw_rank, torch.Tensor) else raw_rank
    names = list(state_names) or [f"state_{i}" for i in range(len(state))]
    wanted = set(params)
    placed = []
    for name, value in zip(names, state):
        value = value.detach().to(device)
        if name in wanted and value.dtype.is_floating_point:
            value.requires_grad_(True)
        placed.append(value)
    moved = [_to_device(x, device, backward) for x in inputs]
    tensor_id = torch_xla._XLAC._xla_get_tensor_id
    roles = {tensor_id(v): ("state", n) for n, v in zip(names, placed)}
    roles.update(
        {
            tensor_id(x): ("input", str(i))
            for i, x in enumerate(moved)
            if isinstance(x, torch.Tensor)
        }
    )
    if isinstance(raw_rank, torch.Tensor):
        roles[tensor_id(raw_rank)] = ("rank", "tp_rank")
    with xla_ops(mesh, tp_rank), torch.enable_grad():
        outputs = list(local(*placed, *moved))
        trace = RankTrace(rank, outputs, roles=roles)
        if backward:
            for i, cotangent in enumerate(_backward(outputs, device)):
                roles[tensor_id(cotangent)] = ("cotangent", str(i))
            trace.grads = {
                n: p.grad
                for n, p in zip(names, placed)
                if n in wanted and p.requires_grad and p.grad is not None
            }
            trace.input_grads = [
                x.grad if isinstance(x, torch.Tensor) and x.requires_grad else None for x in moved
            ]
            for names_, groups, scale in grad_sync:  # one coalesced all-reduce each
                held = [n for n in names_ if n in trace.grads]
                if held:
                    synced = [trace.grads[n] for n in held]
                    xm.all_reduce(xm.REDUCE_SUM, synced, scale=scale, groups=groups)
                    trace.grads.update(zip(held, synced))
    return trace


def _rank_input(coord: int, device: torch.device) -> torch.Tensor:
    """The rank's tp coordinate as device data (an HLO parameter, the same program on every rank)."""
    # shape (1,) (the lowering reshapes it): torch-xla makes a 0-d 0 or 1 an HLO constant
    return torch.tensor([coord], dtype=torch.int64).to(device)


def _to_device(x: Any, device: torch.device, grad: bool) -> Any:
    if not isinstance(x, torch.Tensor):
        return x
    moved = x.detach().to(device)
    if grad and moved.dtype.is_floating_point:
        moved.requires_grad_(True)  # a stage's received activations get their gradient
    return moved


def _backward(outputs: list, device: torch.device) -> list[torch.Tensor]:
    """Backward of the loss (a 0-d float first output), else of every float output with a
    cotangent input of its shape (device data: an HLO parameter, as a received gradient);
    returns those cotangents."""
    first = outputs[0] if outputs else None
    if isinstance(first, torch.Tensor) and first.dim() == 0 and first.requires_grad:
        first.backward()
        return []
    roots, cotangents = [], []
    for out in outputs:
        if isinstance(out, torch.Tensor) and out.requires_grad and out.dtype.is_floating_point:
            roots.append(out)
            cotangents.append(torch.ones(out.shape, dtype=out.dtype).to(device))
    if roots:
        torch.autograd.backward(roots, cotangents)
    return cotangents


# ------------------------------------------------------------------ reading the HLO
_METADATA = re.compile(r", metadata=\{[^}]*\}")
_MODULE = re.compile(r"^HloModule [^,\s]+", re.M)


def canonical_hlo(text: str) -> str:
    """HLO text without what differs between two traces of one program: the module's counter
    name and each op's source metadata."""
    return _MODULE.sub("HloModule program", _METADATA.sub("", text))


_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT )?%\S+ = .*? (all-reduce|all-gather|reduce-scatter|collective-permute)\((.*)$",
    re.M,
)
_GROUPS = re.compile(r"replica_groups=(\{(?:\{[0-9,]*\},?)*\}|\[[^\]]*\][^,]*)")
_APPLY = re.compile(r"to_apply=%?([A-Za-z]+)")


def hlo_collectives(text: str) -> dict[tuple[str, str], int]:
    """Collectives of an HLO module by (kind, replica groups); all-reduce kinds name their
    reduction ("all-reduce/max")."""
    counts: dict[tuple[str, str], int] = {}
    for match in _COLLECTIVE.finditer(text):
        kind, rest = match.group(1), match.group(2)
        groups = _GROUPS.search(rest)
        if kind == "all-reduce":
            applied = _APPLY.search(rest)
            reduction = applied.group(1).lower()[:3] if applied else ""
            if reduction in ("max", "min"):
                kind = f"all-reduce/{reduction}"
        key = (kind, groups.group(1) if groups else "")
        counts[key] = counts.get(key, 0) + 1
    return counts


def hlo_groups(groups: list[list[int]]) -> str:
    """Replica groups as HLO text prints them: {{0,1},{2,3}}."""
    return "{" + ",".join("{" + ",".join(map(str, g)) + "}" for g in groups) + "}"


def program_collectives(
    gm: torch.fx.GraphModule, *, backward: bool = True, grad_inputs: set[int] | None = None
) -> dict[str, int]:
    """The XLA collectives our own partitioned program amounts to, counted from its ops: forward
    all-reduce (sum; the vocab-parallel loss adds a max and two sums), all-gather, reduce-scatter;
    backward, for ops whose input carries a gradient: grad_all_reduce's all-reduce, the all-gather
    of reduce_scatter's and shard's, the reduce-scatter of all_gather_rs's; the sharded
    reductions' all-reduces. `grad_inputs`: indices of the placeholders with a gradient (None:
    every floating one)."""
    grad = _grad_nodes(gm, grad_inputs)
    fwd = {f: 0 for f in ops.PARALLEL_OPS}
    bwd = {f: 0 for f in ops.PARALLEL_OPS}
    for node in gm.graph.nodes:
        if node.target in fwd:
            fwd[node.target] += 1
            bwd[node.target] += bool(node.args) and node.args[0] in grad
    counts = {
        "all-reduce": fwd[ops.all_reduce] + 2 * fwd[ops.vocab_parallel_cross_entropy],
        "all-reduce/max": fwd[ops.vocab_parallel_cross_entropy],
        "all-gather": fwd[ops.all_gather] + fwd[ops.all_gather_rs],
        "reduce-scatter": fwd[ops.reduce_scatter],
    }
    for node in gm.graph.nodes:
        for kind, phase in _reduction_collectives(node):
            if phase == "forward" or (backward and node.args[0] in grad):
                counts[kind] = counts.get(kind, 0) + 1
    if backward:
        counts["all-reduce"] += bwd[ops.grad_all_reduce]
        counts["all-gather"] += bwd[ops.reduce_scatter] + bwd[ops.shard]
        counts["reduce-scatter"] += bwd[ops.all_gather_rs]
    return {k: v for k, v in counts.items() if v}


def _reduction_collectives(node: torch.fx.Node) -> list[tuple[str, str]]:
    """(HLO kind, phase) of each all-reduce a sharded reduction issues (see
    `ops.REDUCTION_ALL_REDUCES`); none for any other node."""
    return [
        ("all-reduce" if reduce == "sum" else f"all-reduce/{reduce}", phase)
        for reduce, phase, _ in ops.reduction_all_reduces(node.target, node.args)
    ]


def _grad_nodes(gm: torch.fx.GraphModule, grad_inputs: set[int] | None) -> set[torch.fx.Node]:
    """Values that carry a gradient: the chosen floating placeholders and what they feed."""
    grad: set[torch.fx.Node] = set()
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        val = node.meta.get("val")
        floating = isinstance(val, torch.Tensor) and val.dtype.is_floating_point
        if floating and (grad_inputs is None or i in grad_inputs):
            grad.add(node)
    for node in gm.graph.nodes:
        if node.op != "call_function" or not any(a in grad for a in node.all_input_nodes):
            continue
        val = node.meta.get("val")
        if isinstance(val, (list, tuple)) or (
            isinstance(val, torch.Tensor) and val.dtype.is_floating_point
        ):
            grad.add(node)
    return grad


# ------------------------------------------------------------------ GSPMD, a second opinion
def partition_spec(placement, ndim: int, axis: str = "tp") -> tuple:
    """torch-xla SPMD partition spec of one of our placements: Shard(d) names the mesh axis at
    dim d, Replicate is all None. A blocked shard (fused q|k|v) maps to a plain shard of the dim:
    GSPMD's layout then differs from ours but its results are still the unsharded ones."""
    from nxd_autoshard.ir.placements import Shard

    spec: list[str | None] = [None] * ndim
    if isinstance(placement, Shard):
        spec[placement.dim % ndim] = axis
    return tuple(spec)


def spmd_step(model: torch.nn.Module, args: tuple, kwargs: dict, placements: dict, devices: int):
    """The loss and gradients (on CPU) of `model` on `devices` XLA SPMD devices, its parameters
    marked with our placements' partition specs. Needs a process started with SPMD on
    (`xr.use_spmd()` before any XLA tensor) and CPU_NUM_DEVICES=devices."""
    import numpy as np
    import torch_xla.distributed.spmd as xs
    import torch_xla.runtime as xr

    torch_xla, _ = require_xla()
    if xr.global_runtime_device_count() != devices:
        raise RuntimeError(
            f"SPMD needs {devices} devices, the runtime has {xr.global_runtime_device_count()}: "
            f"start the process with CPU_NUM_DEVICES={devices}"
        )
    device = torch_xla.device()
    mesh = xs.Mesh(np.arange(devices), (devices,), ("tp",))
    model = model.to(device)
    if hasattr(model, "tie_weights"):  # .to(xla) makes new parameters: HF ties them again
        model.tie_weights()
    names = dict(model.named_parameters())
    for name, param in names.items():
        xs.mark_sharding(param, mesh, partition_spec(placements[name], param.dim()))
    moved = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
    out = model(*[moved(a) for a in args], **{k: moved(v) for k, v in kwargs.items()})
    out.loss.backward()
    torch_xla.sync()
    grads = {n: p.grad.cpu() for n, p in names.items() if p.grad is not None}
    return out.loss.detach().cpu(), grads
