"""Golden graphs: a program's stable text (`ir/printer.py` says what is normalized and why),
one section per pipeline stage, and a check against a file that fails with a unified diff."""

from __future__ import annotations

import difflib
from pathlib import Path

import torch
import torch.fx

from nxd_autoshard.compiler.compiled import CompiledPlan
from nxd_autoshard.ir.meta import state_name_of, tp_of
from nxd_autoshard.ir.printer import graph_text

__all__ = [
    "GOLDEN_VERSION",
    "GoldenMismatch",
    "assert_golden",
    "golden_text",
]


GOLDEN_VERSION = 1


UPDATE_HINT = "run pytest with --update-goldens (or NXD_UPDATE_GOLDENS=1) to accept the new text"


class GoldenMismatch(AssertionError):
    """The printed program differs from its golden file (or the file is missing)."""


def golden_text(obj) -> str:
    """Golden text of a compiled plan (or the ShardedModule of one: every captured program), a
    CapturedProgram or a GraphModule."""
    if isinstance(obj, torch.fx.GraphModule):
        return f"# nxd-autoshard golden v{GOLDEN_VERSION}\n" + graph_text(obj)
    if hasattr(obj, "gm") and hasattr(obj, "state_names"):
        return _program_section(obj, 0, 1, model=None, tp=tp_of(obj.gm))
    compiled = obj if isinstance(obj, CompiledPlan) else obj.compiled
    n = len(compiled.programs)
    sections = []
    for i, entry in enumerate(compiled.programs):
        p, model, tp = entry.program, compiled.model_name, compiled.tp
        if not entry.stages:
            sections.append(_program_section(p, i, n, model=model, tp=tp))
        for stage in entry.stages:  # one section per pipeline stage: what that pp rank runs
            sections.append(
                _program_section(
                    p,
                    i,
                    n,
                    model=model,
                    tp=tp,
                    pp=compiled.pp,
                    stage=stage,
                    n_stages=len(entry.stages),
                )
            )
    return "\n".join(sections)


def _program_section(
    program,
    index: int,
    count: int,
    *,
    model: str | None,
    tp: int,
    pp: int = 1,
    stage=None,
    n_stages: int = 1,
) -> str:
    inputs = ", ".join(program.user_input_names)
    mode = "train" if program.training else "eval"
    where = "stage 0 of 1" if stage is None else f"stage {stage.index} of {n_stages}"
    head = [
        f"# nxd-autoshard golden v{GOLDEN_VERSION}",
        (
            f"# model {model or '?'} | tp {tp} | pp {pp} | program {index} of {count} ({mode}; "
            f"inputs {inputs}) | {where}"
        ),
        (
            "# one program for every rank of the tp axis; shapes are per rank; "
            "s0, s1, ... are dynamic sizes"
        ),
    ]
    if stage is not None:
        head.append(f"# units: {', '.join(stage.units)}")
        head.append(
            f"# receives: {_crossing(stage, stage.inputs)}; sends: {_crossing(stage, stage.outputs)}"
        )
    return "\n".join(head) + "\n" + graph_text(program.gm if stage is None else stage.gm)


def _crossing(stage, names: list[str]) -> str:
    """Values crossing a stage boundary without fx's run-dependent names: user inputs by name,
    the rest counted."""
    by_name = {n.name: n for n in stage.gm.graph.nodes}
    named = [state_name_of(by_name[n]) for n in names if n in by_name]
    named = [n for n in named if n] if len(named) == len(names) else []
    rest = len(names) - len(named)
    parts = named + ([f"{rest} activation{'s' if rest != 1 else ''}"] if rest else [])
    return " + ".join(parts) or "-"


def unified_diff(expected: str, actual: str, path: str) -> str:
    """Readable diff of golden (expected) text against what the program prints now."""
    return "\n".join(
        difflib.unified_diff(
            expected.splitlines(),
            actual.splitlines(),
            fromfile=f"{path} (golden)",
            tofile=f"{path} (now)",
            lineterm="",
        )
    )


def assert_golden(obj, path: str | Path, *, update: bool = False) -> str:
    """Compare the golden text of `obj` with the file at `path`; rewrite it only when `update`."""
    path = Path(path)
    text = obj if isinstance(obj, str) else golden_text(obj)
    if update:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        return text
    if not path.exists():
        raise GoldenMismatch(f"golden file {path} does not exist; {UPDATE_HINT}")
    expected = path.read_text()
    if expected != text:
        diff = unified_diff(expected, text, path.name)
        raise GoldenMismatch(f"program differs from golden {path}:\n{diff}\n\n{UPDATE_HINT}")
    return text
