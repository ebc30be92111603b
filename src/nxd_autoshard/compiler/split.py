"""Split pass: cut a local program into pipeline stages between repeated blocks, balanced by cost.

A *block* is a child of a ModuleList whose children share one class (decoder layers).
Every node belongs to one unit (one block; code before the first block joins the first,
code after the last joins the last), and each stage is a contiguous run of units. Values
used across a cut (hidden states, rotary cos/sin, masks, labels) are passed along as
stage outputs/inputs; parameters go to every stage that reads them (tied weights).
"""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass

import torch
import torch.fx

from nxd_autoshard.compiler.partition import requires_grad_nodes
from nxd_autoshard.ir.cost import node_flops
from nxd_autoshard.ir.errors import PlanError
from nxd_autoshard.ir.meta import state_kind_of
from nxd_autoshard.ir.program import (
    BlockCost,
    CapturedProgram,
    StageProgram,
    graph_module,
    module_path,
    split_written,
)

__all__ = [
    "BALANCE",
    "check_stage_count",
    "split_stages",
    "find_blocks",
    "assign_units",
    "unit_costs",
    "balance",
    "even_split",
    "split_program",
    "stage_of_units",
    "segment_blocks",
    "Units",
]


def find_blocks(model: torch.nn.Module) -> list[str]:
    """Qualified names of the repeated blocks: children of ModuleLists whose children share a class."""
    blocks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) >= 2:
            kinds = {type(child) for child in mod}
            if len(kinds) == 1 and not isinstance(mod[0], (torch.nn.Linear, torch.nn.Embedding)):
                blocks += [f"{name}.{i}" if name else str(i) for i in range(len(mod))]
    # nested lists (a block holding its own list of experts) are not blocks themselves
    return [b for b in blocks if not any(b.startswith(o + ".") for o in blocks if o != b)]


def _block_index(path: str, index: dict[str, int]) -> int | None:
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        hit = index.get(".".join(parts[:end]))
        if hit is not None:
            return hit
    return None


def assign_units(gm: torch.fx.GraphModule, blocks: list[str]) -> dict[torch.fx.Node, int]:
    """Unit (block index) of every node, never before the units of its inputs."""
    index = {b: i for i, b in enumerate(blocks)}
    unit: dict[torch.fx.Node, int] = {}
    pending: list[torch.fx.Node] = []
    later: list[torch.fx.Node] = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            unit[node] = 0
            continue
        if node.op == "output":
            continue
        own = _block_index(module_path(node), index) if node.op == "call_function" else None
        floor = max((unit[n] for n in node.all_input_nodes if n in unit), default=0)
        if node.target is operator.getitem:
            unit[node] = unit[node.args[0]]
            continue
        if own is None and _reads_only_state(node):
            later.append(node)  # placed with its first reader below
            continue
        if own is None:
            pending.append(node)
            continue
        here = max(own, floor)
        for p in pending:  # code between blocks runs with the block that follows it
            unit[p] = max(here, max((unit[n] for n in p.all_input_nodes if n in unit), default=0))
        pending = []
        unit[node] = here
    last = len(blocks) - 1
    for p in pending:
        unit[p] = max(last, max((unit[n] for n in p.all_input_nodes if n in unit), default=0))
    _with_first_reader(later, unit, last)
    for node in gm.graph.nodes:  # getitems follow their (possibly moved) tuple
        if node.target is operator.getitem and node in unit:
            unit[node] = unit[node.args[0]]
    return unit


def _reads_only_state(node: torch.fx.Node) -> bool:
    """A node of no module that reads only state (a replicated buffer sliced for a sharded op):
    it runs with its first reader, so no stage computes another stage's state and sends it."""
    ins = node.all_input_nodes
    return bool(ins) and all(
        n.op == "placeholder" and state_kind_of(n) not in (None, "input") for n in ins
    )


def _with_first_reader(
    later: list[torch.fx.Node], unit: dict[torch.fx.Node, int], default: int
) -> None:
    """Give each node put off (`later`, in graph order: `_reads_only_state`) the lowest unit of
    its readers, `default` where none has one; the last first, so a reader put off too has its
    unit by then."""
    for node in reversed(later):
        unit[node] = min((unit[u] for u in node.users if u in unit), default=default)


@dataclass
class Units:
    """Pipeline units: each block cut at its child modules (attention | MLP ...), in run order.

    `cut_ok[k]`: a stage may start at unit k, i.e. no more activations that carry a gradient
    cross there than cross between two blocks (in a decoder layer: after the attention's
    residual add, but not between a norm and the module it feeds).
    """

    of_node: dict[torch.fx.Node, int]
    names: list[str]
    block: list[int]
    cut_ok: list[bool]

    def first_of_block(self, b: int) -> int:
        return self.block.index(b)


def _unit_name(path: str, block: str) -> str:
    """The child module of `block` that `path` is in; '' for the block's own code (residual adds)."""
    if path == block or not path or block.startswith(path + "."):
        return ""  # the block's own code, or the model's code around it
    if path.startswith(block + "."):
        return f"{block}.{path[len(block) + 1 :].split('.')[0]}"
    return path  # code run with this block but outside it (embedding, final norm, LM head)


def segment_blocks(
    program: CapturedProgram, block_of: dict[torch.fx.Node, int], blocks: list[str]
) -> Units:
    """Cut every block into units at its child modules and mark where a stage may start."""

    gm = program.gm
    by_block: list[list[torch.fx.Node]] = [[] for _ in blocks]
    for node in gm.graph.nodes:  # one pass; each block's nodes stay in graph order
        if node.op == "call_function" and node in block_of:
            by_block[block_of[node]].append(node)
    of_node: dict[torch.fx.Node, int] = {}
    names, block = [], []
    later: list[torch.fx.Node] = []
    for b, (prefix, nodes) in enumerate(zip(blocks, by_block)):
        key = None
        for node in nodes:
            if node.target is operator.getitem:
                of_node[node] = of_node[node.args[0]]
                continue
            if not module_path(node) and _reads_only_state(node):
                later.append(node)  # in its first reader's unit, not a unit of its own
                continue
            here = _unit_name(module_path(node), prefix)
            if key is None or (here and here != key):
                key = here
                names.append(here or prefix)
                block.append(b)
            of_node[node] = len(names) - 1
        if key is None:  # a block the graph never runs still gets a unit
            names.append(prefix)
            block.append(b)
    _with_first_reader(later, of_node, len(names) - 1)
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            of_node[node] = 0
    n = len(names)
    grad = requires_grad_nodes(gm, program)
    state = set(placeholders[: program.num_state])
    # a value defined in unit lo and last read in unit hi crosses every cut lo+1..hi, a user
    # result every cut after lo; the output's use of a buffer's new value counts for nothing
    # here, though split_program sends the value on to the stage that holds the buffer
    # (`_writer_stages`: the one stage that reads the buffer, else the one that makes the value)
    user_results = set(_nodes_in(tuple(_written(program)[1])))
    delta = [0] * (n + 2)
    for node, lo in of_node.items():
        if node not in grad or node in state:
            continue
        hi = max(
            (of_node[u] for u in node.users if u.op != "output"),
            default=lo,
        )
        hi = n if node in user_results else hi
        if hi > lo:
            delta[lo + 1] += 1
            delta[hi + 1] -= 1
    crossing = list(itertools.accumulate(delta))
    starts = [k for k in range(1, n) if block[k] != block[k - 1]]
    floor = min((crossing[k] for k in starts), default=0)
    cut_ok = [True] + [crossing[k] <= floor for k in range(1, n)]
    return Units(of_node, names, block, cut_ok)


_MATMULS = {"mm", "bmm", "addmm", "baddbmm", "matmul", "linear"}


def unit_costs(
    program: CapturedProgram,
    unit: dict[torch.fx.Node, int],
    names: list[str],
    local_numel: dict[str, int],
) -> list[BlockCost]:
    """Cost of each unit: FLOPs of its nodes and the (per-rank) parameters first read there."""
    costs = [BlockCost(b) for b in names]
    for node in program.gm.graph.nodes:
        if node.op == "call_function" and node in unit:
            costs[unit[node]].flops += node_flops(node)
    placeholders = [n for n in program.gm.graph.nodes if n.op == "placeholder"]
    seen: set[str] = set()
    for node, name, kind in zip(placeholders, program.state_names, program.state_kinds):
        if kind != "parameter" or name in seen or not node.users:
            continue
        seen.add(name)
        first = min(unit[u] for u in node.users if u in unit)
        val = node.meta.get("val")
        numel = local_numel.get(name, val.numel() if isinstance(val, torch.Tensor) else 0)
        costs[first].params += numel
        costs[first].param_bytes += numel * (
            val.element_size() if isinstance(val, torch.Tensor) else 4
        )
    return costs


def check_stage_count(stages: int, blocks: int, model: str = "the model", note: str = "") -> None:
    """A clear error when there are fewer places to cut (blocks) than pipeline stages."""
    if stages > blocks:
        raise PlanError(
            f"pp={stages} stages need at least {stages} blocks, but {model} has {blocks}; "
            f"use pp <= {blocks}{note}"
        )


def balance(costs: list[float], stages: int, cut_ok: list[bool] | None = None) -> list[int]:
    """Stage index of each unit: contiguous runs minimising the largest stage cost (linear partition
    DP); a stage may only start at a unit k with cut_ok[k]."""
    import numpy as np

    n = len(costs)
    cut_ok = cut_ok or [True] * n
    check_stage_count(stages, sum(cut_ok))
    # the running sum in Python's order, so that sums (and ties between them) are as before
    exact = [0.0]
    for c in costs:
        exact.append(exact[-1] + c)
    prefix = np.array(exact, dtype=np.float64)
    allowed = np.array([True] + [bool(ok) for ok in cut_ok[1:]], dtype=bool)
    inf = float("inf")
    # best[k][i]: smallest max cost of the first i units in k stages; cut[k][i]: start of the last stage
    best = np.full((stages + 1, n + 1), inf)
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n - (stages - k) + 1):
            j = np.arange(k - 1, i)
            values = np.maximum(best[k - 1][k - 1 : i], prefix[i] - prefix[k - 1 : i])
            values = np.where(allowed[k - 1 : i], values, inf)
            low = values.min()
            if low == inf:
                continue
            near = (values > low) & (values <= low + 2e-9 * max(1.0, low))
            # the scan keeps the first j that beats the best so far by more than a rounding
            # error: with no value within that of the minimum, it is the first minimum
            if not near.any():
                best[k][i], cut[k][i] = low, int(j[int(values.argmin())])
                continue
            here = inf
            for jj, worst in zip(j.tolist(), values.tolist()):
                if worst < here - 1e-9 * max(1.0, worst):
                    here, cut[k][i] = worst, jj
            best[k][i] = here
    bounds, i = [], n
    for k in range(stages, 0, -1):
        bounds.append(cut[k][i])
        i = cut[k][i]
    starts = sorted(bounds)
    return [sum(1 for s in starts if s <= u) - 1 for u in range(n)]


def even_split(n: int, stages: int) -> list[int]:
    """Stage of each unit when the blocks are dealt out evenly (NxD's default), extra blocks first."""
    check_stage_count(stages, n)
    base, extra = divmod(n, stages)
    out = []
    for s in range(stages):
        out += [s] * (base + (1 if s < extra else 0))
    return out


BALANCE = ("flops", "memory", "even")


def stage_of_units(
    blocks: list[str],
    units: Units,
    stages: int,
    costs: list[BlockCost],
    cuts: list[str] | None,
    by: str = "flops",
) -> list[int]:
    """Stage of each unit: from the user's cut names (block starts), else balanced by FLOPs or
    parameter bytes (cuts inside blocks allowed), else whole blocks dealt out evenly."""
    check_stage_count(stages, len(blocks))
    if by != "even" and not cuts:
        return balance(
            [c.flops if by == "flops" else c.param_bytes for c in costs], stages, units.cut_ok
        )
    per_block = _block_stages(blocks, stages, cuts)
    return [per_block[b] for b in units.block]


def _block_stages(blocks: list[str], stages: int, cuts: list[str] | None) -> list[int]:
    if cuts:
        starts = [0]
        for name in cuts:
            if name not in blocks:
                near = [b for b in blocks if name.split(".")[-1] == b.split(".")[-1]][:3] or blocks[
                    :3
                ]
                raise PlanError(
                    f"pipeline cut '{name}' matches no block; blocks are named like "
                    f"{', '.join(near)}"
                )
            starts.append(blocks.index(name))
        starts = sorted(set(starts))
        if len(starts) != stages:
            raise PlanError(
                f"{len(cuts)} pipeline cuts make {len(starts)} stages, not {stages}; "
                f"give {stages - 1} cut names (the first block of each later stage)"
            )
        return [sum(1 for s in starts if s <= u) - 1 for u in range(len(blocks))]
    return even_split(len(blocks), stages)


def split_program(
    program: CapturedProgram, units: Units, stage_of_unit: list[int], blocks: list[str]
) -> list[StageProgram]:
    """Cut the local program into one GraphModule per stage; crossing values become stage I/O."""
    gm = program.gm
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    state = dict(zip(placeholders, program.state_names))
    user_inputs = [n for n in placeholders[program.num_state :]]
    n_stages = max(stage_of_unit) + 1
    stage: dict[torch.fx.Node, int] = {}
    for node in nodes:
        if node.op == "output":
            stage[node] = n_stages - 1
        elif node in state:
            continue
        elif node.op == "placeholder":
            if node.users and not isinstance(node.meta.get("val"), torch.Tensor):
                raise PlanError(
                    f"input '{node.name}' is not a tensor but the graph reads it; "
                    "pipeline stages can only pass tensors"
                )
            stage[node] = 0
        else:
            stage[node] = stage_of_unit[units.of_node[node]]

    written, results = _written(program)
    owner = _writer_stages(written, state, stage)
    user_results = set(_nodes_in(tuple(results)))

    def last_use(node: torch.fx.Node) -> int:
        uses = [stage[u] for u in node.users if u.op != "output"]
        uses += [owner[name] for name, value in written if value is node]
        if node in user_results:
            uses.append(n_stages - 1)
        return max(uses, default=stage[node])

    stages = []
    carried: list[torch.fx.Node] = [
        n for n in user_inputs if isinstance(n.meta.get("val"), torch.Tensor)
    ]
    for s in range(n_stages):
        graph = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        state_used = [
            p
            for p in placeholders[: program.num_state]
            if any(stage.get(u) == s for u in p.users) or owner.get(state[p]) == s
        ]
        writes = [(name, value) for name, value in written if owner[name] == s]
        for p in state_used:
            env[p] = graph.placeholder(_safe(state[p]))
            env[p].meta = dict(p.meta)
        for v in carried:
            env[v] = graph.placeholder(v.name)
            env[v].meta = dict(v.meta)
        for node in nodes:
            if stage.get(node) != s or node.op == "placeholder":
                continue
            if node.op == "output":
                news = [env[value] for _, value in writes]
                graph.output((*news, *torch.fx.node.map_arg(tuple(results), lambda a: env[a])))
                continue
            env[node] = graph.node_copy(node, lambda a: env[a])
        if s < n_stages - 1:
            live = [
                v
                for v in list(carried)
                + [n for n in nodes if stage.get(n) == s and n.op != "placeholder"]
                if v in env and last_use(v) > s
            ]
            out = list(dict.fromkeys(live))
            for v in out:
                if not isinstance(v.meta.get("val"), torch.Tensor):
                    raise PlanError(
                        f"value '{v.name}' (module '{module_path(v)}') crosses the pipeline "
                        "cut but is not a tensor; choose other cut points"
                    )
            graph.output(tuple([env[value] for _, value in writes] + [env[v] for v in out]))
        else:
            out = []
        stage_gm = graph_module(gm, graph)
        stages.append(
            StageProgram(
                index=s,
                gm=stage_gm,
                state_names=[state[p] for p in state_used],
                inputs=[v.name for v in carried],
                outputs=[v.name for v in out],
                blocks=list(
                    dict.fromkeys(blocks[b] for b, st in zip(units.block, stage_of_unit) if st == s)
                ),
                units=[u for u, st in zip(units.names, stage_of_unit) if st == s],
                is_last=s == n_stages - 1,
                mutated=[name for name, _ in writes],
            )
        )
        carried = out
    return stages


def _written(program: CapturedProgram) -> tuple[list[tuple[str, torch.fx.Node]], list]:
    """(buffer, new value) of each buffer the forward writes, and the user outputs."""
    new, results = split_written(program.mutated, program.gm.graph.output_node().args[0])
    return list(zip(program.mutated, new)), results


def _nodes_in(values) -> list[torch.fx.Node]:
    """The nodes in a (nested) argument value."""
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg(values, lambda a: found.append(a) or a)
    return found


def _writer_stages(written: list, state: dict[torch.fx.Node, str], stage: dict) -> dict[str, int]:
    """The stage that holds and writes each written buffer: the one stage that reads it, else the
    one that computes its new value. A buffer read by two stages, or read before its new value
    exists, has no such stage: each pp rank holds its own copy, and one copy would go stale."""
    placeholder = {name: p for p, name in state.items()}
    owner = {}
    for name, value in written:
        made = stage.get(value, 0)
        readers = {stage[u] for u in placeholder[name].users if u.op != "output"}
        if len(readers) > 1 or (readers and min(readers) < made):
            raise PlanError(
                f"buffer '{name}' is written by pipeline stage {made} and read by stage(s) "
                f"{sorted(readers)}: every stage holds its own copy, so a reader on another "
                "stage would see a stale value. What to do: choose cuts (autoshard(..., pipeline_"
                "cuts=[...])) that keep the code reading and writing it in one stage, or pp=1"
            )
        owner[name] = readers.pop() if readers else made
    return owner


def _safe(name: str) -> str:
    return name.replace(".", "_")


def split_stages(
    program: CapturedProgram, model: torch.nn.Module, settings, plan
) -> list[StageProgram]:
    """Cut the local program into stages; the first capture fixes which units each stage holds."""
    blocks = find_blocks(model)
    if len(blocks) < 2:
        raise PlanError(
            f"{settings.model_name} has no repeated blocks (a ModuleList of layers of one "
            "class) to cut between, so it cannot be pipelined; use pp=1"
        )
    units = segment_blocks(program, assign_units(program.gm, blocks), blocks)
    local = {
        n: int(torch.Size(plan.local_shape(n, shape, settings.tp)).numel())
        for n, shape in settings.full_shapes.items()
    }
    costs = unit_costs(program, units.of_node, units.names, local)
    if plan.stage_of_unit is not None:
        return split_program(program, units, _same_stages(plan, units), blocks)
    plan.units, plan.unit_costs = units, costs
    plan.block_costs = [BlockCost(b) for b in blocks]
    for cost, b in zip(costs, units.block):
        for key in ("flops", "params", "param_bytes"):
            setattr(
                plan.block_costs[b], key, getattr(plan.block_costs[b], key) + getattr(cost, key)
            )
    plan.stage_of_unit = stage_of_units(
        blocks, units, settings.n_stages, costs, settings.cuts, settings.balance
    )
    plan.stage_of_block = [plan.stage_of_unit[units.first_of_block(b)] for b in range(len(blocks))]
    return split_program(program, units, plan.stage_of_unit, blocks)


def _same_stages(plan, units: Units) -> list[int]:
    """Stages for a later capture's units (eval mode drops dropout-only units): by unit name."""
    first = dict(zip(plan.units.names, plan.stage_of_unit))
    stages, current = [], 0
    for name in units.names:
        current = max(current, first.get(name, current))
        stages.append(current)
    return stages
