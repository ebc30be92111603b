"""The plan as DTensor parallel styles: a `parallelize_module` plan for users who stay on DTensor.

DTensor's styles run the module's own code on each rank's local shards: `ColwiseParallel` and
`RowwiseParallel` on `nn.Linear` / `nn.Embedding`, plain tensors in between. That expresses a
column -> row region of our rewrite when nothing between the two needs more than the module's
own code on local tensors. It does not express what the rewrite does to the code in between: a
view with a hard-coded head count (rewritten to heads/tp), KV heads replicated and sliced per
rank (GQA with fewer KV heads than tp), fused q|k|v blocks, vocab padding, a norm statistic
all-reduced over the shard, or a collective anywhere but around the two linears. Such a region
is left out (its modules stay replicated under DTensor, which is correct, only less parallel)
and `skipped` says why, per module, instead of exporting styles that would compute something
else.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.fx

from nxd_autoshard.compiler.compiled import CompiledPlan
from nxd_autoshard.compiler.plan import Plan
from nxd_autoshard.compiler.propagate import PropagationResult
from nxd_autoshard.ir import ops
from nxd_autoshard.ir.placements import Replicate, Shard
from nxd_autoshard.ir.program import module_path
from nxd_autoshard.rules import DivideSize, Lower, tensor_inputs

__all__ = ["DTensorPlan", "dtensor_plan"]

aten = torch.ops.aten


class DTensorPlan(dict):
    """`{module name: ParallelStyle}` for `parallelize_module(model, tp_mesh, plan)`.

    `skipped` maps each module the rewrite shards but this plan leaves replicated to the reason
    DTensor's styles cannot express what the rewrite does there.
    """

    def __init__(self, styles: dict, skipped: dict[str, str]):
        super().__init__(styles)
        self.skipped = dict(skipped)

    def __repr__(self) -> str:
        lines = [f"DTensorPlan({len(self)} modules, {len(self.skipped)} left replicated)"]
        lines += [f"  {name}: {_style_text(style)}" for name, style in self.items()]
        lines += [f"  {name}: replicated ({why})" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _style_text(style) -> str:
    inputs = getattr(style, "input_layouts", None)
    outputs = getattr(style, "output_layouts", None)
    return f"{type(style).__name__}(input_layouts={inputs}, output_layouts={outputs})"


@dataclass
class _Member:
    """A module the rewrite shards, as DTensor would: its style and why it cannot, if it cannot."""

    kind: str  # "colwise" | "rowwise" | "embedding_rowwise" | "embedding_colwise"
    why: str | None = None
    output_replicated: bool = False  # colwise whose output the rewrite gathers (an LM head)
    input_replicated: bool = False  # rowwise whose input the rewrite slices from a replicated one


def _name(target) -> str:
    return getattr(getattr(target, "overloadpacket", target), "__name__", str(target))


def _candidates(
    plan: Plan, model: torch.nn.Module, aliases: tuple[tuple[str, ...], ...]
) -> dict[str, _Member]:
    """Modules with a sharded parameter, with the DTensor style their placements mean."""
    modules = dict(model.named_modules())
    tied = {name: group for group in aliases for name in group}
    members: dict[str, _Member] = {}
    for pname, placement in plan.placements.items():
        if not isinstance(placement, Shard):
            continue
        mod_name, _, leaf = pname.rpartition(".")
        if mod_name in members:
            continue
        mod = modules.get(mod_name)
        weight = plan.placements.get(f"{mod_name}.weight", Replicate())
        bias = plan.placements.get(f"{mod_name}.bias", Replicate())
        if isinstance(mod, torch.nn.Linear):
            kind = "colwise" if weight == Shard(0) else "rowwise"
        elif isinstance(mod, torch.nn.Embedding):
            kind = "embedding_rowwise" if weight == Shard(0) else "embedding_colwise"
        else:
            members[mod_name] = _Member(
                "other",
                f"a {type(mod).__name__} with {leaf} sharded: DTensor's ColwiseParallel and "
                "RowwiseParallel shard nn.Linear and nn.Embedding only",
            )
            continue
        member = _Member(kind)
        expected_bias = Shard(0) if kind == "colwise" else Replicate()
        if weight not in (Shard(0), Shard(1)) or (
            mod_name + ".bias" in plan.placements and bias != expected_bias
        ):
            member.why = f"weight {weight} with bias {bias} is no colwise/rowwise layout"
        for p in (f"{mod_name}.weight", f"{mod_name}.bias"):
            if p in plan.blocks:
                member.why = (
                    f"{p} is sharded block by block (fused {plan.blocks[p]} projections): a "
                    "DTensor Shard is one contiguous piece per rank"
                )
            elif p in plan.padded:
                member.why = (
                    f"{p} is padded to {plan.padded[p]} rows so that tp divides it: DTensor "
                    "shards unpadded dims"
                )
            elif p in tied:
                others = ", ".join(n for n in tied[p] if n != p)
                member.why = f"{p} is tied to {others}: DTensor distributes each module's own"
        members[mod_name] = member
    return members


def _localised_literal(node: torch.fx.Node, result: PropagationResult, tp: int) -> str | None:
    """What the rewrite changed in this node's code that the model's own code would not."""
    decision = result.decisions.get(node)
    for step in decision.localise if decision else ():
        if isinstance(step, Lower):
            continue
        if isinstance(step, DivideSize):
            sizes = node.args[step.arg]
            size = sizes[step.position] if isinstance(sizes, (list, tuple)) else sizes
            if not isinstance(size, int) or size == -1:
                continue  # -1 or a symbolic size: the code computes it from its local input
            source = node.args[0] if node.args else None
            val = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
            if (
                isinstance(val, torch.Tensor)
                and isinstance(sizes, (list, tuple))
                and len(sizes) == val.dim()
                and val.shape[step.position] == size * tp
                and (size != 1 or _name(node.target) != "expand")
            ):
                # the input's own size at that dim (a shape-preserving view, an expand that keeps
                # it): read off the input, so on a local shard the code reads the local size.
                # Never so for an expand to size 1, which would broadcast a hard-coded size.
                continue
            return (
                f"{node.name} ({_name(node.target)}) has the size {size * tp} in the model's "
                f"code, which the rewrite makes {size} per rank; under DTensor the model's own "
                "code runs on the shards and would need the local size"
            )
        return f"{node.name} ({_name(node.target)}) needs {type(step).__name__} from the rewrite"
    return None


def dtensor_plan(
    compiled: CompiledPlan, model: torch.nn.Module, *, program: int = 0
) -> DTensorPlan:
    """DTensor styles for the regions of a partitioned program of `compiled` (of `model`, whose
    modules the styles name) that they express exactly."""
    from torch.distributed.tensor import Replicate as DReplicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    entry = compiled.program(program, "dtensor_plan()")
    result, plan, aliases, tp = entry.result, compiled.plan, compiled.settings.aliases, compiled.tp
    members = _candidates(plan, model, aliases)
    tied = {name: group for group in aliases for name in group}
    gm = entry.program.gm
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = entry.program.state_names
    state_of = {placeholders[i]: names[i] for i in range(entry.program.num_state)}
    sharded_state = {
        node: name
        for node, name in state_of.items()
        if isinstance(plan.placements.get(name), Shard)
    }

    r = _Regions(members, result, state_of, sharded_state, tied, tp)
    for node in gm.graph.nodes:
        mod = r.owner(node)
        if mod is None:
            continue
        member = members[mod]
        if member.kind == "other":
            continue  # already refused, with its reason
        written = _written_in_place(node)
        if written:
            r.fail(
                mod,
                f"the model writes into its output in place ({written}); DTensor forbids that "
                "on the plain tensor a parallel style returns (a view made in autograd.Function)",
            )
        if member.kind == "colwise":
            r.walk_column(node, mod)
        elif member.kind == "rowwise":
            r.reduce_later(node, mod)
            source = node.args[0]
            if isinstance(source, torch.fx.Node) and source.target is ops.shard:
                if source.args[1] in (-1, source.meta["val"].dim() - 1):
                    member.input_replicated = True
                    r.explained.add(source)
        elif member.kind == "embedding_rowwise":
            r.explained.add(node)  # the module's own lookup; what follows it is checked here
            if node.target is ops.vocab_parallel_embedding:
                r.reduce_later(node, mod)
            else:
                r.fail(mod, f"its lookup {node.name} is no vocab-parallel embedding")
        else:  # embedding_colwise: the rewrite gathers its output
            users = list(node.users)
            if [u.target for u in users] == [ops.all_gather]:
                r.explained.add(users[0])
            else:
                r.fail(mod, "its output is used sharded")

    for node in gm.graph.nodes:
        mod = r.owner(node)
        if mod and members[mod].kind == "rowwise" and not members[mod].input_replicated:
            if r.find(mod) == mod and not any(
                r.find(m) == mod for m in members if m != mod
            ):  # no column joined it: its sharded input comes from elsewhere
                r.fail(mod, f"its input {node.args[0]} is sharded by the rewrite, not by a column")

    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in ops.PARALLEL_OPS:
            continue
        if node in r.explained:
            continue
        if node.target is ops.grad_all_reduce and all(
            (mod := r.owner(u)) and members[mod].kind == "colwise" for u in node.users
        ):
            continue  # the replicated input of column linears: ColwiseParallel's own
        where = f"at node '{node.name}' in '{module_path(node) or '<top level>'}'"
        why = (
            f"the rewrite slices a replicated value per rank {where} (KV heads fewer than tp "
            "are replicated and sliced so), which no DTensor style does"
            if node.target is ops.shard
            else f"the rewrite puts {node.target.__name__} {where}"
        )
        touched = r.nearest_members(node)
        for mod in touched:
            r.fail(mod, why)
        if not touched:
            for mod in members:
                r.fail(mod, why + ", next to no module DTensor shards")

    # a region is exported whole or not at all
    bad_roots = {r.find(m) for m in r.failures} | {
        r.find(m) for m, mem in members.items() if mem.why
    }
    reasons: dict[str, str] = {}
    for root in bad_roots:
        region = sorted(m for m in members if r.find(m) == root)
        why = next(
            (members[m].why or r.failures[m] for m in region if members[m].why or m in r.failures),
            "",
        )
        cause = next((m for m in region if members[m].why or m in r.failures), region[0])
        for m in region:
            own = members[m].why or r.failures.get(m)
            reasons[m] = own if own else f"its region is left whole: {cause}: {why}"

    styles = {}
    for mod, member in members.items():
        if mod in reasons:
            continue
        if member.kind == "colwise":
            styles[mod] = (
                ColwiseParallel(output_layouts=DReplicate())
                if member.output_replicated
                else ColwiseParallel()
            )
        elif member.kind == "rowwise":
            styles[mod] = (
                RowwiseParallel(input_layouts=DReplicate())
                if member.input_replicated
                else RowwiseParallel()
            )
        elif member.kind == "embedding_rowwise":
            styles[mod] = RowwiseParallel(input_layouts=DReplicate())
        else:
            styles[mod] = ColwiseParallel(output_layouts=DReplicate())
    return DTensorPlan(styles, reasons)


@dataclass
class _Regions:
    """Column -> row regions of the partitioned program, joined by the sharded values between
    them (union-find over module names), and why a module's region cannot be expressed."""

    members: dict[str, _Member]
    result: PropagationResult
    state_of: dict[torch.fx.Node, str]
    sharded_state: dict[torch.fx.Node, str]
    tied: dict[str, tuple[str, ...]]
    tp: int
    explained: set[torch.fx.Node] = field(default_factory=set)  # collectives a style accounts for
    failures: dict[str, str] = field(default_factory=dict)
    parent: dict[str, str] = field(init=False)

    def owner(self, node: torch.fx.Node) -> str | None:
        """The candidate module whose weight this linear / embedding node reads."""
        if node.op != "call_function":
            return None
        if node.target is aten.linear.default:
            weight = node.args[1]
        elif node.target in (ops.vocab_parallel_embedding, aten.embedding.default):
            weight = node.args[0]
        else:  # an op of a module DTensor cannot shard (experts under a grouped matmul, say)
            for value in tensor_inputs(node):
                mod = self.sharded_state.get(value, "").rpartition(".")[0]
                if mod in self.members and self.members[mod].kind == "other":
                    return mod
            return None
        lookup = node.target is not aten.linear.default
        name = self.state_of.get(weight)
        for tied_name in self.tied.get(name, (name,)):
            mod = tied_name.rpartition(".")[0] if tied_name else None
            if mod in self.members and self.members[mod].kind.startswith("embedding") == lookup:
                return mod  # a tied weight: the module of this use (embedding or LM head)
        return None

    def __post_init__(self) -> None:
        self.parent = {m: m for m in self.members}

    def find(self, m: str) -> str:
        parent = self.parent
        while parent[m] != m:
            parent[m] = parent[parent[m]]
            m = parent[m]
        return m

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)

    def fail(self, module: str, why: str) -> None:
        self.failures.setdefault(module, why)

    def walk_column(self, column: torch.fx.Node, mod: str) -> None:
        """Follow a column linear's sharded output to the row linears (or gather) that end it."""
        member = self.members[mod]
        interior: list[torch.fx.Node] = []
        rows, gathers = [], []

        def step(node: torch.fx.Node) -> list[torch.fx.Node]:
            if node.op == "output":
                self.fail(mod, "its sharded output is returned by the model as it is")
                return []
            # a sharded reduction ends the region as a gather does: under DTensor the model's
            # own reduction runs on the gathered output (correct, if not as cheap as ours)
            if node.target in (ops.all_gather, ops.vocab_parallel_cross_entropy, *ops.REDUCTIONS):
                gathers.append(node)
                return []
            if isinstance(self.result.placements.get(node), Replicate):
                return []  # a size read off the sharded value, not the value itself
            user_mod = self.owner(node)
            if user_mod is not None and self.members[user_mod].kind == "rowwise":
                rows.append(node)
                self.union(mod, user_mod)
                return []
            if node.target in ops.PARALLEL_OPS or user_mod is not None:
                what = node.target.__name__ if node.target in ops.PARALLEL_OPS else user_mod
                self.fail(mod, f"the rewrite feeds its sharded output to {what} at {node.name}")
                return []
            interior.append(node)
            for value in tensor_inputs(node):
                name = self.sharded_state.get(value)
                if name and name != f"{mod}.bias":
                    self.fail(
                        mod,
                        f"{node.name} reads {name}, sharded by the rewrite, in the model's code",
                    )
            return list(node.users)

        _breadth_first(column.users, step)
        if gathers and rows:
            self.fail(mod, "its output is both gathered and used sharded")
            return
        if gathers:
            member.output_replicated = True
            self.explained.update(gathers)
            return  # under DTensor the code after it runs on the gathered value
        for node in interior:
            why = _localised_literal(node, self.result, self.tp)
            if why:
                self.fail(mod, why)
                return

    def nearest_members(self, start: torch.fx.Node) -> set[str]:
        """The sharded modules nearest to a node through sharded values, up and down the graph."""
        found: set[str] = set()
        for way in (lambda n: tensor_inputs(n), lambda n: list(n.users)):

            def step(node: torch.fx.Node, way=way) -> list[torch.fx.Node]:
                if node is start or node.op != "call_function":
                    return []
                if isinstance(self.result.placements.get(node), Replicate):
                    return []  # regions are joined by sharded (or partial) values only
                mod = self.owner(node)
                if mod is not None:
                    found.add(mod)
                    return []
                return way(node)

            _breadth_first(way(start), step)
        return found

    def reduce_later(self, start: torch.fx.Node, mod: str) -> None:
        """Follow a row linear's partial sums to the all-reduces that end them.

        The rewrite may add two partial sums before one all-reduce (an embedding and the first
        attention output); RowwiseParallel all-reduces each at once. Only linear ops touch a
        partial sum, so reducing it first gives the same value.
        """

        def step(node: torch.fx.Node) -> list[torch.fx.Node]:
            if node.target is ops.all_reduce:
                self.explained.add(node)
                return []
            if node.op == "output" or node.target in ops.PARALLEL_OPS:
                what = "the model's output" if node.op == "output" else node.target.__name__
                self.fail(mod, f"its partial sums reach {what} at {node.name}, not an all-reduce")
                return []
            return list(node.users)

        _breadth_first(start.users, step)


def _breadth_first(start, step) -> None:
    """Visit the nodes reachable from `start`, each once, in breadth-first order: `step(node)`
    does the visit and returns the nodes to go on to."""
    queue, seen = deque(start), set()
    while queue:
        node = queue.popleft()
        if node not in seen:
            seen.add(node)
            queue.extend(step(node))


# torch.export names an in-place op's node after the op with its trailing underscore (`add_`,
# `add__1`); functionalized, the node keeps that name in its `from_node` provenance
_IN_PLACE_NAME = re.compile(r"[a-z0-9_]*[a-z0-9]_(_\d+)?")


def _written_in_place(output: torch.fx.Node) -> str | None:
    """The source line of an in-place write into a module's output (or its all-reduce), if any."""
    values = [output] + [u for u in output.users if u.target is ops.all_reduce]
    for value in values:
        for user in value.users:
            if not user.args or user.args[0] is not value:
                continue
            sources = user.meta.get("from_node") or []
            name = getattr(sources[-1], "name", "") if sources else ""
            if _IN_PLACE_NAME.fullmatch(name):
                trace = (user.meta.get("stack_trace") or "").strip().splitlines()
                return trace[-1].strip() if trace else name
    return None
