"""The compiled plan: what compiling a model produced, as one read-only value.

`ShardedModule.compiled` gives it: the settings it was compiled with, the plan the first capture
decided (placements, fused blocks, padding, stages), every captured program with its
placements and pipeline stages, and the parameters' names, shapes and dtypes. It holds no
process group, no runtime and no weights, so `explain()`, golden files and the `plan` CLI read
the same value whether the module runs in the simulator, on a process group or nowhere (planned
on meta). The module keeps capturing programs for new call signatures; each `compiled` is the
plan as of that moment.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from nxd_autoshard.compiler.plan import CompileSettings, Plan
from nxd_autoshard.compiler.propagate import PropagationResult
from nxd_autoshard.ir.placements import Placement
from nxd_autoshard.ir.program import CapturedProgram, StageProgram

__all__ = ["CompiledPlan", "CompiledProgram", "ParameterInfo", "read_only_plan"]


@dataclass(frozen=True)
class CompiledProgram:
    """One captured, partitioned program (per call signature and train/eval mode)."""

    program: CapturedProgram
    result: PropagationResult  # the placement of every value
    stages: tuple[StageProgram, ...] = ()  # pipeline stages (none without pipelining)


@dataclass(frozen=True)
class ParameterInfo:
    """A parameter of the model as the plan sees it: full shape, dtype, and the first name of
    the tensor it is tied to (None when it is that name, or untied)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    tied_to: str | None = None


@dataclass(frozen=True)
class CompiledPlan:
    """What compiling produced (see the module docstring); `programs[i]` in capture order."""

    settings: CompileSettings
    plan: Plan  # read-only: its mappings cannot be written (read_only_plan)
    parameters: Mapping[str, ParameterInfo]  # every name, tied aliases included, model order
    programs: tuple[CompiledProgram, ...]
    pp: int = 1

    @property
    def model_name(self) -> str:
        return self.settings.model_name

    @property
    def tp(self) -> int:
        return self.settings.tp

    @property
    def placements(self) -> Mapping[str, Placement]:
        return self.plan.placements

    def program(self, index: int, needed_by: str = "the plan") -> CompiledProgram:
        """Program number `index` (negative counts from the last), or an error naming the range."""
        n = len(self.programs)
        if not -n <= index < n:
            raise IndexError(
                f"{needed_by}: program={index}, but {n} program(s) are captured "
                f"(0 to {n - 1}, see programs())"
            )
        return self.programs[index]

    def full_shape(self, name: str) -> tuple[int, ...]:
        return self.parameters[name].shape

    def local_shape(self, name: str) -> tuple[int, ...]:
        """A parameter's shape on one tp rank (a padded vocab dim counts its padding)."""
        return self.plan.local_shape(name, self.full_shape(name), self.tp)


def read_only_plan(plan: Plan) -> Plan:
    """A copy of `plan` whose mappings cannot be written: what a compiled plan hands out."""
    fields = {}
    for f in dataclasses.fields(plan):
        value = getattr(plan, f.name)
        if isinstance(value, dict):
            value = MappingProxyType(dict(value))
        elif isinstance(value, list):
            value = tuple(value)
        fields[f.name] = value
    return Plan(**fields)
