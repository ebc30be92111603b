"""The programs of one model: captured per call signature and train/eval mode on first use.

`ShardedModule` keeps one `ProgramCache`. The cache owns the model's meta shadow (what is
captured: no weights), the compile settings, the plan the first capture decides (every later
capture keeps it) and the compiled programs; `compiled()` hands them out as one read-only
value. What runs the programs, and whose tensors they read, is the runtime's.
"""

from __future__ import annotations

from types import MappingProxyType

import torch
from torch.utils import _pytree as pytree

from nxd_autoshard.compiler.capture import _default_kwargs, meta_shadow, own_example_inputs
from nxd_autoshard.compiler.compiled import (
    CompiledPlan,
    CompiledProgram,
    ParameterInfo,
    read_only_plan,
)
from nxd_autoshard.compiler.driver import LocalProgram, compile_call
from nxd_autoshard.compiler.plan import CompileSettings, Plan
from nxd_autoshard.compiler.precision import DTYPES
from nxd_autoshard.ir.program import input_signature

__all__ = ["ProgramCache", "model_settings"]


def model_settings(model: torch.nn.Module, **options) -> CompileSettings:
    """Compile settings for `model`: its parameters' full shapes and tied names, the device of
    its tensors, and `options`."""
    named = dict(model.named_parameters(remove_duplicate=False))
    tensors = [*named.values(), *model.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    aliases: dict[int, list[str]] = {}
    for name, full in named.items():
        aliases.setdefault(id(full), []).append(name)
    return CompileSettings(
        model_name=type(model).__name__,
        full_shapes={n: tuple(p.shape) for n, p in named.items()},
        device=device,
        aliases=tuple(tuple(names) for names in aliases.values() if len(names) > 1),
        **options,
    )


class ProgramCache:
    """Captured programs of one model, by call signature and mode; the first capture decides
    the plan."""

    def __init__(self, model: torch.nn.Module, settings: CompileSettings):
        self.settings = settings
        self.plan = Plan()
        self.compute_dtype = DTYPES[settings.precision]
        # captured as the model runs in the compute dtype (`model.to(bfloat16)`), its own upcasts
        # included; the program reads the fp32 masters and casts them (compiler/precision.py)
        shadow = meta_shadow(model)
        self.shadow = shadow.to(self.compute_dtype) if settings.precision != "fp32" else shadow
        self.dtypes = {n: p.dtype for n, p in model.named_parameters(remove_duplicate=False)}
        self._programs: dict[tuple, list[LocalProgram]] = {}

    @property
    def captured(self) -> bool:
        return bool(self._programs)

    def entries(self) -> list[LocalProgram]:
        """Every captured program, in capture order."""
        return [e for entries in self._programs.values() for e in entries]

    def get(self, args: tuple, kwargs: dict, training: bool) -> tuple[LocalProgram, list, bool]:
        """The program for this call (captured now if none fits), the call's flat inputs in its
        order, and whether it was captured now."""
        args, kwargs = self.cast_inputs(args, kwargs)
        kwargs = self.with_defaults(kwargs)
        key = (input_signature(args, {k: kwargs[k] for k in sorted(kwargs)}), training)
        for entry in self._programs.get(key, []):
            flat = _flat_inputs(entry, args, kwargs)
            if entry.program.accepts(flat):
                return entry, flat, False
        if torch.compiler.is_compiling():  # torch.export cannot run inside a Dynamo trace
            raise RuntimeError(
                "torch.compile(sharded) met a call this module has not captured yet (a new "
                "input structure, dtype or shape): call it once without torch.compile on such "
                "inputs first, or pass them to autoshard as example inputs"
            )
        entry = compile_call(
            self.shadow, args, kwargs, training=training, settings=self.settings, plan=self.plan
        )
        self._programs.setdefault(key, []).append(entry)
        return entry, _flat_inputs(entry, args, kwargs), True

    def own_example_call(self, needed_by: str) -> tuple[tuple, dict]:
        """The model's own example call (HF `dummy_inputs`), or an error saying what to pass."""
        own = own_example_inputs(self.shadow)
        if own is None:
            raise ValueError(
                f"{needed_by} needs the captured program, and nothing has been captured yet: "
                f"{self.settings.model_name} is captured at its first call (forward, train_step "
                "or eval_step) and has no example inputs of its own (a Hugging Face model's "
                "dummy_inputs). Pass one step's batch, as train_step will get it (on a pipeline, "
                "one microbatch's is enough), to autoshard: autoshard(model, ..., "
                "example_inputs=(input_ids,), example_kwargs={...}), or run one call first"
            )
        return own

    def cast_inputs(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Floating inputs in the compute dtype, as the model cast to it would need them."""
        if self.compute_dtype is torch.float32:
            return args, kwargs
        dtype = self.compute_dtype
        return pytree.tree_map(
            lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x,
            (tuple(args), dict(kwargs)),
        )

    def flatten(self, entry: LocalProgram, args: tuple, kwargs: dict) -> list:
        """The call's flat inputs in the program's order; token ids outside the vocab raise."""
        return _flat_inputs(entry, *self.cast_inputs(args, kwargs))

    def with_defaults(self, kwargs: dict) -> dict:
        """`kwargs` with the model's defaults for the keyword arguments the call left out."""
        return _default_kwargs(self.shadow, dict(kwargs))

    def compiled(self, pp: int, dtypes: dict[str, torch.dtype] | None = None) -> CompiledPlan:
        """The plan and every program captured so far as one read-only value; `dtypes`: the
        parameters' dtypes now, where they differ from the model's."""
        dtypes = {**self.dtypes, **(dtypes or {})}
        first = {name: group[0] for group in self.settings.aliases for name in group}
        parameters = {
            name: ParameterInfo(
                shape, dtypes[name], None if first.get(name, name) == name else first[name]
            )
            for name, shape in self.settings.full_shapes.items()
        }
        return CompiledPlan(
            settings=self.settings,
            plan=read_only_plan(self.plan),
            parameters=MappingProxyType(parameters),
            programs=tuple(
                CompiledProgram(e.program, e.result, tuple(e.stages or ())) for e in self.entries()
            ),
            pp=pp,
        )


def _flat_inputs(entry: LocalProgram, args: tuple, kwargs: dict) -> list:
    """Inputs already in the compute dtype, flat in the program's order; token ids outside the
    vocab raise."""
    flat = pytree.tree_leaves((args, {k: kwargs[k] for k in entry.kwarg_order}))
    entry.program.check_token_inputs(flat)
    return flat
