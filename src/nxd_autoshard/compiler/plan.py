"""The plan: what the first capture decides for the whole model (parameter placements, vocab
padding, fused blocks, pipeline stages), and the settings compiling reads. No process group."""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field, replace

import torch

from nxd_autoshard.compiler.propagate import PropagationResult, propagate_placements
from nxd_autoshard.ir.errors import DivisibilityError, PlanError
from nxd_autoshard.ir.meta import state_name_of
from nxd_autoshard.ir.ops import expert_linear, expert_matmul, grouped_linear
from nxd_autoshard.ir.opsets import op_name, parameter_source
from nxd_autoshard.ir.placements import Partial, Placement, Replicate, Shard
from nxd_autoshard.ir.program import BlockCost, CapturedProgram, block_of
from nxd_autoshard.rules import rule_for, shape_of

__all__ = ["CompileSettings", "Plan", "decide_placements"]


@dataclass(frozen=True)
class CompileSettings:
    """What compiling a call needs to know of the model and the mesh (shapes only, no weights)."""

    tp: int
    styles: dict[str, str]  # parameter name -> plan style (user rules)
    auto: bool
    model_name: str
    full_shapes: dict[str, tuple[int, ...]]  # parameter name -> full shape, aliases included
    aliases: tuple[tuple[str, ...], ...] = ()  # names of one tied tensor (wte / lm_head)
    device: torch.device = torch.device("cpu")
    n_stages: int = 1
    cuts: list[str] | None = None
    balance: str = "flops"
    strict: bool = False  # raise instead of warning when a block's matmul stays replicated
    precision: str = "fp32"  # compute dtype name (compiler.precision.DTYPES); masters stay fp32
    reduce_dtype: str | None = None  # "fp32": tp partial sums in fp32 (compiler.precision)
    recompute: str | tuple[str, ...] | None = None  # activation checkpointing (compiler.recompute)
    sequence_parallel: bool = False  # replicated regions on Shard(seq) (compiler.sequence)


@dataclass
class Plan:
    """Decided by the first capture, then fixed: every later capture (eval mode, a new shape)
    keeps these placements and puts each pipeline unit on the same stage."""

    placements: dict[str, Placement] = field(default_factory=dict)
    blocks: dict[str, int | tuple[int, ...]] = field(default_factory=dict)  # fused qkv blocks
    padded: dict[str, int] = field(default_factory=dict)  # param -> padded size of its shard dim
    auto_styles: dict[str, str] = field(default_factory=dict)  # module -> style auto chose
    # modules of repeated blocks split by rows because their column split was undone (why)
    row_fallbacks: dict[str, str] = field(default_factory=dict)
    # pipeline: units of the first capture, the stage of each, and their costs
    units: object | None = None  # compiler.split.Units
    stage_of_unit: list[int] | None = None
    stage_of_block: list[int] | None = None  # stage where each block starts
    unit_costs: list[BlockCost] = field(default_factory=list)
    block_costs: list[BlockCost] = field(default_factory=list)

    @property
    def decided(self) -> bool:
        return bool(self.placements)

    def local_shape(self, name: str, full_shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
        """A parameter's shape on one rank (a padded vocab dim counts its padding)."""
        shape = list(full_shape)
        p = self.placements.get(name, Replicate())
        if isinstance(p, Shard):
            shape[p.dim] = self.padded.get(name, shape[p.dim]) // tp
        return tuple(shape)


def decide_placements(
    program: CapturedProgram, settings: CompileSettings, plan: Plan
) -> PropagationResult:
    """Propagate, dropping auto/plan column choices that a later op would have to gather.

    The first capture decides the plan (and commits it); later ones propagate from it.
    """
    first = not plan.decided
    veto: dict[str, str] = {}  # module -> "column" (rows instead) or "all" (replicated)
    undone: dict[str, str] = {}  # module -> why its auto/plan split was undone
    twins = _twins(settings.full_shapes)
    minor = _minor_matmuls(program, settings)
    inputs_of: dict[str, str] = {}  # column module -> its input node, in any round
    ideal: dict[str, str] | None = None  # module -> style of the first round (no veto yet)
    for _ in range(16):
        result = _propagate(program, settings, plan, veto, auto=settings.auto and first)
        ideal = dict(result.auto_styles) if ideal is None else ideal
        for module, x in result.column_inputs.items():
            inputs_of.setdefault(module, x)
        # auto choices that end in a gather are undone; a rule the user wrote is kept
        # (and its gather warned about) unless the size simply does not split
        failed = {
            m: why
            for m, why in result.failed_columns.items()
            if m not in veto and (m in result.auto_styles or "not divisible" in why)
        }
        if not failed or not first:
            break
        _check_divisibility(result, failed, settings)
        for root in _root_failures(failed):
            # what undoes a split in one block undoes it in its identical twins: one plan for all
            # inside repeated blocks (where the memory is) an undone column split tries rows;
            # outside them the matmul stays whole, as Megatron keeps its heads' dense layers
            for module in twins.get(root, (root,)):
                if module not in veto:
                    rows = "not divisible" not in failed[root] and block_of(module) is not None
                    rows = rows and module not in minor  # a router is cheaper kept whole
                    veto[module] = "column" if rows else "all"
                    undone[module] = failed[root]
    if first and result.stat_columns:
        result, undone = _without_stat_columns(program, settings, plan, result, veto, undone)
    alike: dict[str, list[str]] = {}  # one warning per op and place, layer indices aside
    for line in result.fallbacks:
        key = _cause_key(line.split(" on ")[0])
        alike.setdefault(key, []).append(line)
    for lines in alike.values():
        more = f" (and {len(lines) - 1} more like it in the other blocks)" if len(lines) > 1 else ""
        warnings.warn(
            f"nxd-autoshard: gathered to replicate (no sharding rule): {lines[0]}{more}",
            stacklevel=4,
        )
    if first:
        _commit(result, settings, plan)
        _report_replicated(program, settings, plan, undone, inputs_of, ideal or {})
    result.write_to_nodes()  # trials (other vetoes, other tp values) wrote theirs
    return result


_LINEAR_OPS = {"linear", "mm", "matmul", "addmm", "bmm", "baddbmm"}
_INDEX = re.compile(r"\.\d+(?=\.|'|$)")


def _cause_key(why: str) -> str:
    """One warning per distinct cause: layer indices and node names differ between layers."""
    return _INDEX.sub(".*", re.sub(r"node '[^']*'", "node", why))


def _module_names(modules) -> str:
    """'layers.*.mlp.up', ...: module paths with their layer indices folded."""
    return ", ".join(repr(n) for n in dict.fromkeys(_INDEX.sub(".*", m) for m in modules))


def _block_matmuls(program: CapturedProgram):
    """(module, weight name, how the weight is read) of every product with a parameter inside a
    repeated block: "select" when read per expert (`weight[i]`), the op's name when it has no
    sharding rule (a library's custom kernel: it runs whole, on the full weight), else ""."""
    for node in program.gm.graph.nodes:
        products = op_name(node) in _LINEAR_OPS or node.target in _EXPERT_OPS
        unruled = (
            not products
            and node.op == "call_function"
            and isinstance(node.target, torch._ops.OpOverload)
            and rule_for(node.target) is None
        )
        if not products and not unruled:
            continue
        for arg in node.args[:3] if products else node.all_input_nodes:
            source, passed = parameter_source(arg)
            if source is not None and source.meta["val"].dim() >= 2:
                weight = state_name_of(source)
                module = weight.rsplit(".", 1)[0]
                if block_of(module) is not None:
                    how = str(node.target) if unruled else "select" if "select" in passed else ""
                    yield module, weight, how
                break


_EXPERT_OPS = (expert_linear, expert_matmul, grouped_linear)


def _report_replicated(
    program: CapturedProgram,
    settings: CompileSettings,
    plan: Plan,
    undone: dict[str, str],
    column_inputs: dict[str, str],
    ideal: dict[str, str],
) -> None:
    """Warn (or raise, strict) once per distinct cause when a block's matmul stays replicated or
    is split by rows for want of its column split, or an undone auto split leaves a matmul
    outside the blocks whole.

    A tp that splits no matmul of any block is a DivisibilityError with the tp values that do.
    """
    found = list(_block_matmuls(program))
    replicated = [
        (m, w)
        for m, w, _ in found
        if isinstance(plan.placements.get(w), Replicate) and settings.styles.get(w) != "replicate"
    ]  # a user's 'replicate' is not a surprise
    if replicated and len(replicated) == len(found):
        _raise_if_another_tp_splits(program, settings, list(dict.fromkeys(w for _, w, _ in found)))
    indexed = {m for m, _, how in found if how == "select"}
    unruled: dict[str, tuple[str, set[str]]] = {}  # module -> (weight, ops with no rule)
    for m, w, how in found:
        if how not in ("", "select"):
            unruled.setdefault(m, (w, set()))[1].add(how)
    weight_of = {m: w for m, w, _ in reversed(found)}  # a module's first weight, for the reason
    # a minor weight (an MoE router) costs no memory to speak of, and Megatron replicates it
    # too: explain() still shows it, no warning
    minor = _minor_matmuls(program, settings)
    degraded = [m for m, w in replicated if m not in minor]
    # an undone column split that found a row split is not reported: it is sharded, and
    # explain() counts its collectives against the optimum. Outside repeated blocks (heads,
    # poolers) a matmul may stay whole as Megatron keeps them; a model without a stack of
    # identical blocks is all "outside", and every undone split of it is reported
    twins = _twins(settings.full_shapes)
    stacked = any(len(group) > 1 for group in twins.values())
    for module in undone if not stacked else ():
        if plan.auto_styles.get(module) == "row" or module in minor:
            continue
        if all(
            isinstance(p, Replicate)
            for n, p in plan.placements.items()
            if n.rsplit(".", 1)[0] == module
        ):
            degraded.append(module)
    sharded_modules = {
        n.rsplit(".", 1)[0] for n, p in plan.placements.items() if isinstance(p, Shard)
    }
    split_inputs = {x for m, x in column_inputs.items() if m in sharded_modules}
    causes: dict[str, list[tuple[str, str]]] = {}  # cause -> (module, why) of each matmul
    for module in dict.fromkeys(degraded):
        why = undone.get(module) or _why_not_split(
            weight_of.get(module, module + ".weight"), settings, module in indexed
        )
        if module in unruled and module not in undone:
            why = _unruled(*unruled[module], settings)
        if why == KEPT_WHOLE:
            continue
        kv = "not divisible" in why and column_inputs.get(module) in split_inputs
        if module in undone and kv:
            continue  # KV heads below tp beside a split query: replicated, as NxD does
        causes.setdefault(_cause_key(why), []).append((module, why))
    problems = [
        f"{_module_names(m for m, _ in found)} ({len(found)} matmul(s)) stay replicated on every "
        f"rank (the full weight, no split): {_with_op(found[0][1], program)}"
        for found in causes.values()
    ]
    # a column split undone inside a block and taken by rows instead: sharded, but what it feeds
    # (an attention core, say) runs whole on every rank and its output is all-reduced, one
    # collective each way more than Megatron's column split. Only a column of the first round,
    # before any veto: a later round's column (an output projection fed by a whole attention)
    # falling back to its rows is where Megatron has it anyway. Identical blocks have one
    # Megatron style: a twin whose first round chose rows (the first block's input can come
    # split from outside the stack, an embedding projection's, say) says the rows are Megatron's
    rows: dict[str, list[str]] = {}
    for module, why in undone.items():
        fallback = plan.auto_styles.get(module) == "row" and all(
            ideal.get(twin) == "column" for twin in twins.get(module, (module,))
        )
        if fallback and block_of(module) is not None:
            plan.row_fallbacks[module] = why
            rows.setdefault(_cause_key(why), []).append(module)
    for modules in rows.values():
        problems.append(
            f"{_module_names(modules)} ({len(modules)} matmul(s)) split by rows, not columns: what they feed runs "
            "whole on every rank and their outputs are all-reduced (a collective each way more "
            f"than the column split): {_with_op(undone[modules[0]], program)}"
        )
    if not problems:
        return
    if settings.strict:
        raise PlanError(
            "autoshard(strict=True): matmuls are not sharded as Megatron shards them:\n  "
            + "\n  ".join(problems)
            + "\nWhat to do: give these modules a style in plan=, or drop strict=True "
            "to accept the replication"
        )
    for line in problems:
        warnings.warn(
            f"nxd-autoshard: {line}; explain() shows the blocks, strict=True makes this an error",
            stacklevel=5,
        )


def _propagate(program, settings, plan, veto: dict[str, str], *, auto: bool) -> PropagationResult:
    """One propagation from the plan so far, without the styles of modules whose split was
    undone."""
    styles = {p: s for p, s in settings.styles.items() if p.rsplit(".", 1)[0] not in veto}
    return propagate_placements(
        program,
        settings.tp,
        styles=styles,
        fixed=plan.placements,
        auto=auto,
        veto=veto,
        padded=plan.padded,
    )


def _without_stat_columns(program, settings, plan, result, veto, undone):
    """Columns whose shard reaches a norm's statistic (a mean over the sharded width) cost an
    all-reduce of that small statistic, which is cheap where the shard then stays (OLMo 2's
    q/k norm before the heads), and not where the sharded width is contracted next (a
    low-rank q_a -> norm -> q_b, DeepSeek's MLA): there the norm's input had better be whole.
    The plan without those column splits is kept when it saves more traffic than the
    statistics' all-reduces themselves."""
    trial_veto = {**veto, **{m: "all" for m in result.stat_columns}}
    trial = _propagate(program, settings, plan, trial_veto, auto=settings.auto)
    converged = not any(m not in trial_veto for m in trial.failed_columns if m in trial.auto_styles)
    ours, stats = _traffic(result)
    theirs, _ = _traffic(trial)
    if not converged or ours - theirs <= 2 * stats:
        return result, undone
    return trial, {**undone, **{m: KEPT_WHOLE for m in result.stat_columns}}


# a choice, not a degradation: no warning (Megatron's MLA keeps linear_q_down_proj whole too)
KEPT_WHOLE = "kept whole: a norm over its output's width feeds a matmul that contracts it"


def _traffic(result: PropagationResult) -> tuple[int, int]:
    """Elements a propagation's conversions move (all-reduces, gathers, reduce-scatters; a
    slice of a replicated value is free), and those of them that are norm statistics."""
    total = stats = 0
    for decision in result.decisions.values():
        for value, need in decision.needs.items():
            have = result.placements.get(value)
            val = value.meta.get("val")
            if have == need or have is None or isinstance(have, Replicate):
                continue
            if not isinstance(val, torch.Tensor):
                continue
            size = math.prod(shape_of(value))
            total += size
            if isinstance(have, Partial) and shape_of(value)[-1:] == (1,):
                stats += size  # a norm's statistic: one element per row, [b, s, 1]
    return total, stats


def _minor_matmuls(program: CapturedProgram, settings: CompileSettings) -> set[str]:
    """Modules of a block whose weights are under 5 % of the block's matrices (an MoE router, a
    low-rank down projection such as MLA's kv_a): kept whole when their split is undone, since
    rows would add an all-reduce to save little memory (Megatron keeps them whole too)."""
    per_module: dict[str, int] = {}
    per_block: dict[str, int] = {}
    for name, shape in settings.full_shapes.items():
        module = name.rsplit(".", 1)[0]
        block = block_of(module)
        if block is None or len(shape) < 2:
            continue
        per_module[module] = per_module.get(module, 0) + math.prod(shape)
        per_block[block] = per_block.get(block, 0) + math.prod(shape)
    return {m for m, size in per_module.items() if size * 20 < per_block[block_of(m)]}


def _why_not_split(weight: str, settings: CompileSettings, indexed: bool = False) -> str:
    shape = settings.full_shapes.get(weight, ())
    sizes = " x ".join(map(str, shape))
    if indexed:
        return (
            f"its weight [{sizes}] is read one expert at a time (`weight[i]`, a select, in a loop "
            "over experts), which no plan splits yet: every expert runs whole on every rank"
        )
    return (
        f"no column or row split fits its weight [{sizes}] at tp={settings.tp} "
        "with the placement its input arrives in"
    )


def _unruled(weight: str, ops: set[str], settings: CompileSettings) -> str:
    """Why a weight read by ops without a sharding rule stays whole, naming them."""
    sizes = " x ".join(map(str, settings.full_shapes.get(weight, ())))
    return (
        f"its weight {weight.rsplit('.', 1)[-1]} [{sizes}] is read by {', '.join(sorted(ops))}, "
        "an op with no sharding rule, which runs whole on every rank"
    )


def _with_op(why: str, program: CapturedProgram) -> str:
    """The reason, with the op of the node it names (`gathered at node 'x' (aten.cat) in ...`)."""
    match = re.search(r"node '([^']+)'", why)
    if not match:
        return why
    node = next((n for n in program.gm.graph.nodes if n.name == match.group(1)), None)
    if node is None:
        return why
    op = getattr(getattr(node.target, "overloadpacket", node.target), "__name__", str(node.target))
    return why.replace(match.group(0), f"{match.group(0)} (op {op})", 1)


def _raise_if_another_tp_splits(
    program: CapturedProgram, settings: CompileSettings, weights: list[str]
) -> None:
    """No matmul of any block splits at this tp: a DivisibilityError naming the tp values that
    would split them, when this tp's sizes are the cause and another tp splits them (otherwise
    the caller warns about the replication and its causes)."""

    works = _tps_that_split(program, settings, weights)
    if not works:
        return
    advice = f"tp values that split them: {', '.join(map(str, works))}"
    example = weights[0].rsplit(".", 1)[0]
    raise DivisibilityError(
        f"{settings.model_name} cannot be split across tp={settings.tp}: no matmul of any repeated "
        f"block divides (e.g. '{example}', weight {list(settings.full_shapes.get(weights[0], ()))}; "
        f"the head counts and feature sizes must be multiples of tp); {advice}."
    )


def _tps_that_split(program, settings, weights: list[str]) -> list[int]:
    """The other tp values at which some block weight splits; none when this tp's sizes split
    (then what undid the splits is warned about, not sizes)."""

    def splits(result: PropagationResult) -> bool:
        """Some block weight is sharded and its split is not failed later in the program."""
        return any(
            isinstance(result.param_placements.get(w), Shard)
            and w.rsplit(".", 1)[0] not in result.failed_columns
            for w in weights
        )

    here = propagate_placements(
        program, settings.tp, styles=dict(settings.styles), auto=settings.auto
    )
    if splits(here):
        return []
    common = 0
    for w in weights:
        if w in settings.full_shapes:
            common = math.gcd(common, settings.full_shapes[w][0])
    works = []
    for tp in [d for d in _divisors(common) if d > 1 and d != settings.tp][:12]:
        trial = propagate_placements(program, tp, styles=dict(settings.styles), auto=settings.auto)
        failed = {m: why for m, why in trial.failed_columns.items() if "not divisible" in why}
        try:
            _check_divisibility(trial, failed, replace(settings, tp=tp))
        except DivisibilityError:
            continue
        if splits(trial):
            works.append(tp)
    return works


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _check_divisibility(
    result: PropagationResult, failed: dict[str, str], settings: CompileSettings
) -> None:
    """KV projections that cannot be split are replicated; a layer with no split at all is an error."""
    by_input: dict[str, list[str]] = {}
    for mod, x in result.column_inputs.items():
        by_input.setdefault(x, []).append(mod)
    for mod, why in failed.items():
        if "not divisible" not in why:
            continue
        siblings = by_input.get(result.column_inputs.get(mod, ""), [])
        if len(siblings) < 2:
            continue  # a fused projection (q|k|v with KV heads below tp): replicated and warned
        if any("not divisible" not in failed.get(s, "") for s in siblings):
            continue  # e.g. k/v with fewer heads than tp beside a q that splits (or failed later)
        size = int(why.split("size ")[1].split(" ")[0])
        raise DivisibilityError(
            f"module '{mod}' of {settings.model_name} cannot be split across tp={settings.tp}: {why} "
            f"(e.g. the number of attention heads). tp values that divide it: "
            f"{', '.join(map(str, _divisors(size)))}."
        )


def _twins(full_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[str, ...]]:
    """Modules at the same place in identical blocks (the same parameter names and shapes
    under the block path), each mapped to all of them."""
    contents: dict[str, list] = {}
    for name, shape in full_shapes.items():
        block = block_of(name.rsplit(".", 1)[0])
        if block is not None:
            contents.setdefault(block, []).append((name[len(block) :], tuple(shape)))
    kind = {b: (_INDEX.sub(".*", b), tuple(sorted(v))) for b, v in contents.items()}
    groups: dict[tuple, set[str]] = {}
    for name in full_shapes:
        module = name.rsplit(".", 1)[0]
        block = block_of(module)
        if block is not None:
            groups.setdefault((kind[block], module[len(block) :]), set()).add(module)
    return {m: tuple(sorted(g)) for g in groups.values() for m in g}


def _layer_of(module: str) -> str:
    layer = re.match(r"^(.*?\.\d+)(\.|$)", module)
    return layer.group(1) if layer else ""


def _root_failures(failed: dict[str, str]) -> set[str]:
    """Failures to undo now: sizes that do not split (and nothing else in their layer), else
    the first failure of each layer.

    Later failures in a layer are often caused by the first (a replicated attention makes the
    output projection's choice fail too; KV heads that do not split make the query's fail):
    they are retried once it is undone.
    """
    roots, seen_layers = set(), set()
    for module, why in failed.items():
        if "not divisible" in why:
            roots.add(module)
            seen_layers.add(_layer_of(module))  # the layer's other failures may follow from it
    for module, why in failed.items():  # in graph order
        key = _layer_of(module)
        if "not divisible" not in why and key not in seen_layers:
            seen_layers.add(key)
            roots.add(module)
    return roots


def _commit(result: PropagationResult, settings: CompileSettings, plan: Plan) -> None:
    """Record the first capture's decisions; tied parameters get one placement for every alias."""
    plan.placements = dict(result.param_placements)
    plan.blocks = dict(result.blocks)
    plan.padded = dict(result.padded)
    plan.auto_styles = dict(result.auto_styles)
    for name in settings.full_shapes:
        plan.placements.setdefault(name, Replicate())
    for names in settings.aliases:
        sharded = [
            plan.placements[n] for n in names if not isinstance(plan.placements[n], Replicate)
        ]
        padded = [plan.padded[n] for n in names if n in plan.padded]
        for n in names:
            if sharded:
                plan.placements[n] = sharded[-1]
            if padded:
                plan.padded[n] = padded[-1]
