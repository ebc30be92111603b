"""What each pass did to a program: name, time, op-count change and the printed graph after it.

Every pass that `autoshard` runs appends one `PassRecord` to its program's history; the
text is the golden printer's output (`golden.graph_text`), so any two steps can be diffed:

    sharded.history.diff("split_bias", "partition")
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.fx

from nxd_autoshard.compiler.propagate import PropagationResult
from nxd_autoshard.ir.program import CapturedProgram, StageProgram

_LISTENERS: list[Callable[[PassRecord], None]] = []


class PassRecord(NamedTuple):
    """One pass: its name, op counts before and after, wall seconds, and the program after it."""

    name: str
    ops_before: int
    ops_after: int
    seconds: float
    text: str


def count_ops(gm: torch.fx.GraphModule) -> int:
    """Number of operations (call_function nodes) of a graph."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function")


def record_pass(history: list, name: str, gm: torch.fx.GraphModule | list[torch.fx.GraphModule],
                ops_before: int, started: float) -> PassRecord:
    """Append the state of `gm` (or of every stage's graph) after pass `name` (started at
    perf_counter `started`) to history."""
    from nxd_autoshard.ir.printer import graph_text

    gms = gm if isinstance(gm, list) else [gm]
    text = graph_text(gms[0]) if len(gms) == 1 else "\n".join(
        f"# stage {i}\n{graph_text(g)}" for i, g in enumerate(gms))
    record = PassRecord(name, ops_before, sum(count_ops(g) for g in gms),
                        time.perf_counter() - started, text)
    history.append(record)
    for listener in _LISTENERS:
        listener(record)
    return record


@contextlib.contextmanager
def on_pass(callback: Callable[[PassRecord], None]) -> Iterator[None]:
    """Call `callback(record)` after every pass run inside the block (progress bars use it)."""
    _LISTENERS.append(callback)
    try:
        yield
    finally:
        _LISTENERS.remove(callback)


def run_pass(history: list, fn, gm: torch.fx.GraphModule, *args, **kwargs) -> torch.fx.GraphModule:
    """Run one pass and append its PassRecord (name, op counts, seconds, graph after) to `history`."""
    before, started = count_ops(gm), time.perf_counter()
    out = fn(gm, *args, **kwargs)
    record_pass(history, fn.__name__, out, before, started)
    return out


@dataclass
class LocalProgram:
    """One captured and partitioned program (per call signature and train/eval mode)."""

    program: CapturedProgram
    result: PropagationResult
    kwarg_order: list[str]
    stages: list[StageProgram] | None = None
    runtime: Any = None  # the torch pipelining schedule of this rank, built at the first train_step
