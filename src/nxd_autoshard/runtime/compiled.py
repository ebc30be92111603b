"""`autoshard(..., compile=...)`: every stage program of this rank handed to `torch.compile`.

A rank's program is plain ATen code plus the ops of `ir.ops`; under Dynamo those ops reach
torch's functional collectives (see `collectives.py`), which stay in the graph forward and
backward, so one graph per stage program reaches the backend with every collective in it.
Shapes are static (`dynamic=False`: a new input shape is compiled again, never into a
symbolic graph) and `fullgraph=True` makes any graph break an error instead of a silent
fallback to eager.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["CompileOptions", "compile_options"]

# what compile=True means: the backend torch.compile itself defaults to
DEFAULT_BACKEND = "inductor"
NEURON_HELP = (
    "compile='neuron' needs torch-neuronx (TorchNeuron, which registers the 'neuron' "
    "torch.compile backend); it comes from the AWS Neuron pip repository "
    "(pip install torch-neuronx --extra-index-url https://pip.repos.neuron.amazonaws.com) "
    "and runs on Trainium/Inferentia hosts. PyPI's torch-neuronx is an empty placeholder. "
    "Without it use compile='inductor' (CPU/GPU) or compile='aot_eager' (no code generation)."
)


class CompileOptions:
    """`torch.compile` keyword arguments for every stage program, and a cache of what was compiled."""

    def __init__(self, options: dict[str, Any]):
        self.options = options
        self._compiled: dict[int, tuple[torch.fx.GraphModule, Callable]] = {}

    @property
    def backend(self):
        return self.options["backend"]

    def __call__(self, gm: torch.fx.GraphModule) -> Callable:
        """The compiled callable of `gm` (made once; torch.compile itself is lazy)."""
        hit = self._compiled.get(id(gm))
        if hit is None or hit[0] is not gm:
            # a GraphModule that writes its code when first run (ir.program.graph_module)
            # writes it now: torch.compile must trace the real forward, not the stub
            realize = getattr(gm, "real_recompile", None)
            if realize is not None:
                realize()
            # gm.forward, not gm: a compiled nn.Module would be registered as a submodule
            # wherever the callable is stored (e.g. on a pipeline StageModule)
            hit = (gm, torch.compile(gm.forward, **self.options))
            self._compiled[id(gm)] = hit
        return hit[1]


def compile_options(spec: bool | str | Mapping[str, Any] | None) -> CompileOptions | None:
    """Check `autoshard(compile=...)` before anything is captured: None/False (eager), True
    (inductor), a backend name, or a dict of torch.compile keyword arguments with "backend"."""
    if spec is None or spec is False:
        return None
    if spec is True:
        options: dict[str, Any] = {"backend": DEFAULT_BACKEND}
    elif isinstance(spec, str) or callable(spec):
        options = {"backend": spec}
    elif isinstance(spec, Mapping):
        options = dict(spec)
        options.setdefault("backend", DEFAULT_BACKEND)
    else:
        raise TypeError(
            "compile must be True, a torch.compile backend name ('inductor', 'aot_eager', "
            f"'neuron', ...) or a dict of torch.compile options; got {spec!r}"
        )
    # one graph per stage program and no recompiling for new shapes: a graph break is an error
    options.setdefault("fullgraph", True)
    options.setdefault("dynamic", False)
    try:
        inspect.signature(torch.compile).bind(None, **options)
    except TypeError as err:
        raise TypeError(f"compile={spec!r}: not torch.compile options ({err})") from None
    if options["backend"] == "neuron":
        _require_neuron()
    elif isinstance(options["backend"], str):
        from torch._dynamo import list_backends

        known = set(list_backends(exclude_tags=()))
        if options["backend"] not in known:
            raise ValueError(
                f"compile: unknown torch.compile backend {options['backend']!r}; this torch "
                f"has {', '.join(sorted(known))}"
            )
    return CompileOptions(options)


def _require_neuron() -> None:
    """Import torch-neuronx (it registers the backend), or say what is missing and what to use."""
    try:
        import torch_neuronx  # noqa: F401
    except ImportError as err:  # absent, or PyPI's placeholder ("WRONG PACKAGE ...")
        raise ImportError(f"{NEURON_HELP} (import torch_neuronx: {err})") from err
