"""The plan: what the first capture decides for the whole model (parameter placements, vocab
padding, fused blocks, pipeline stages), and the settings compiling reads. No process group."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import torch

from nxd_autoshard.compiler.propagate import PropagationResult, propagate_placements
from nxd_autoshard.ir.errors import DivisibilityError
from nxd_autoshard.ir.placements import Placement, Replicate, Shard
from nxd_autoshard.ir.program import BlockCost, CapturedProgram

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


@dataclass
class Plan:
    """Decided by the first capture, then fixed: every later capture (eval mode, a new shape)
    keeps these placements and puts each pipeline unit on the same stage."""

    placements: dict[str, Placement] = field(default_factory=dict)
    blocks: dict[str, int] = field(default_factory=dict)  # param -> equal blocks (fused qkv)
    padded: dict[str, int] = field(default_factory=dict)  # param -> padded size of its shard dim
    auto_styles: dict[str, str] = field(default_factory=dict)  # module -> style auto chose
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


def decide_placements(program: CapturedProgram, settings: CompileSettings, plan: Plan) -> PropagationResult:
    """Propagate, dropping auto/plan column choices that a later op would have to gather.

    The first capture decides the plan (and commits it); later ones propagate from it.
    """
    first = not plan.decided
    styles = dict(settings.styles)
    veto: set[str] = set()
    for _ in range(16):
        result = propagate_placements(
            program, settings.tp, styles=styles, fixed=plan.placements,
            auto=settings.auto and first, veto=veto, padded=plan.padded,
        )
        # auto choices that end in a gather are undone; a rule the user wrote is kept
        # (and its gather warned about) unless the size simply does not split
        failed = {
            m: why for m, why in result.failed_columns.items()
            if m not in veto and (m in result.auto_styles or "not divisible" in why)
        }
        if not failed or not first:
            break
        _check_divisibility(result, failed, settings)
        veto |= _root_failures(failed)
        styles = {p: s for p, s in styles.items() if p.rsplit(".", 1)[0] not in veto}
    for line in result.fallbacks:
        warnings.warn(f"nxd-autoshard: gathered to replicate (no sharding rule): {line}", stacklevel=4)
    if first:
        _commit(result, settings, plan)
    return result


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _check_divisibility(result: PropagationResult, failed: dict[str, str], settings: CompileSettings) -> None:
    """KV projections that cannot be split are replicated; a layer with no split at all is an error."""
    by_input: dict[str, list[str]] = {}
    for mod, x in result.column_inputs.items():
        by_input.setdefault(x, []).append(mod)
    for mod, why in failed.items():
        if "not divisible" not in why:
            continue
        siblings = by_input.get(result.column_inputs.get(mod, ""), [])
        if any(s not in failed for s in siblings):
            continue  # e.g. k/v with fewer heads than tp beside a sharded q
        size = int(why.split("size ")[1].split(" ")[0])
        raise DivisibilityError(
            f"module '{mod}' of {settings.model_name} cannot be split across tp={settings.tp}: {why} "
            f"(e.g. the number of attention heads). tp values that divide it: "
            f"{', '.join(map(str, _divisors(size)))}."
        )


def _root_failures(failed: dict[str, str]) -> set[str]:
    """Failures to undo now: sizes that do not split, and the first other failure of each layer.

    Later failures in a layer are often caused by the first (a replicated attention makes the
    output projection's choice fail too): they are retried once it is undone.
    """
    roots, seen_layers = set(), set()
    for module, why in failed.items():  # in graph order
        layer = re.match(r"^(.*?\.\d+)(\.|$)", module)
        key = layer.group(1) if layer else ""
        if "not divisible" in why:
            roots.add(module)
        elif key not in seen_layers:
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
        sharded = [plan.placements[n] for n in names if not isinstance(plan.placements[n], Replicate)]
        padded = [plan.padded[n] for n in names if n in plan.padded]
        for n in names:
            if sharded:
                plan.placements[n] = sharded[-1]
            if padded:
                plan.padded[n] = padded[-1]
