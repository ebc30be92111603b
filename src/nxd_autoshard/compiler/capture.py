"""Capture an unmodified nn.Module into an FX graph with torch.export (non-strict) on fake tensors."""

from __future__ import annotations

import copy
import inspect
import sys
from typing import Any

import torch
import torch.fx
from torch.export import Dim, ShapesCollection
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils import _pytree as pytree

from nxd_autoshard.ir.errors import CaptureError
from nxd_autoshard.ir.meta import set_state
from nxd_autoshard.ir.program import CapturedProgram

__all__ = ["capture", "fake_shadow", "functionalize", "meta_shadow", "own_example_inputs"]


def meta_shadow(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose parameters and buffers live on the meta device (no weight is copied)."""
    memo: dict[int, Any] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in memo:
            continue
        empty = torch.empty_like(tensor, device="meta")
        if isinstance(tensor, torch.nn.Parameter):
            empty = torch.nn.Parameter(empty, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = empty
    return copy.deepcopy(model, memo)


def fake_shadow(
    model: torch.nn.Module, mode, device: torch.device | None = None
) -> torch.nn.Module:
    """A copy of `model` whose tensors are fake tensors of `mode` on their real device (no storage).

    Fake tensors keep the device, so model code that branches on `x.device.type` (HF's MoE
    routing does) is captured as it runs there; meta tensors would take the other branch.
    """
    memo: dict[int, Any] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in memo:
            continue
        with mode:
            fake = torch.empty(tensor.shape, dtype=tensor.dtype, device=device or tensor.device)
        if isinstance(tensor, torch.nn.Parameter):
            fake = torch.nn.Parameter(fake, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = fake
    return copy.deepcopy(model, memo)


def _default_kwargs(model: torch.nn.Module, kwargs: dict) -> dict:
    # A cache object in the output cannot be exported (and is not wanted in training).
    params = inspect.signature(model.forward).parameters
    if "use_cache" in params and "use_cache" not in kwargs:
        kwargs = {**kwargs, "use_cache": False}
    return kwargs


def own_example_inputs(model: torch.nn.Module) -> tuple[tuple, dict] | None:
    """The example call a model defines itself, as (args, kwargs): a Hugging Face model's
    `dummy_inputs` (token ids of shape (3, 5), or whatever inputs its forward needs, e.g. an
    encoder-decoder's decoder ids); None when the model has none."""
    try:
        dummy = getattr(model, "dummy_inputs", None)
    except Exception:  # a property that needs real weights or a config the model lacks
        return None
    if not isinstance(dummy, dict) or not dummy:
        return None
    if not all(isinstance(v, torch.Tensor) for v in pytree.tree_leaves(dummy)):
        return None
    params = inspect.signature(model.forward).parameters
    if any(k not in params for k in dummy) and not any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    ):
        return None  # the dummy inputs of a base class the forward does not take
    return (), dict(dummy)


def _dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict):
    shapes = ShapesCollection()
    for leaf in pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            shapes[leaf] = {d: Dim.AUTO for d in range(leaf.dim())}
    return shapes.dynamic_shapes(model, args, kwargs)


class _ModuleTracker:
    """Forward pre/post hooks that remember which module was running when capture failed."""

    def __init__(self, model: torch.nn.Module):
        self.stack: list[str] = []
        self.deepest: list[str] = []
        self.handles = []
        for name, mod in model.named_modules():
            self.handles.append(
                mod.register_forward_pre_hook(self._enter(name or type(model).__name__))
            )
            self.handles.append(mod.register_forward_hook(self._leave))

    def _enter(self, name):
        def hook(mod, args):
            self.stack.append(name)
            self.deepest = list(self.stack)

        return hook

    def _leave(self, mod, args, out):
        if self.stack:
            self.stack.pop()

    def close(self):
        for h in self.handles:
            h.remove()


def capture(
    model: torch.nn.Module,
    args: tuple,
    kwargs: dict | None = None,
    *,
    training: bool | None = None,
    dynamic: bool = True,
    device: torch.device | None = None,
) -> CapturedProgram:
    """Export `model` with fake tensors into a flat CapturedProgram; weights are never touched.

    `device`: where the model's tensors live when it runs (default: where they are now).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    kwargs = _default_kwargs(model, dict(kwargs or {}))
    training = model.training if training is None else training
    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())
    shadow = fake_shadow(model, mode, device)
    shadow.train(training)

    def to_fake(value):
        if not isinstance(value, torch.Tensor):
            return value
        with mode:
            fake = torch.empty(value.shape, dtype=value.dtype, device=device or value.device)
        return fake

    meta_args = pytree.tree_map(to_fake, args)
    meta_kwargs = pytree.tree_map(to_fake, kwargs)
    tracker = _ModuleTracker(shadow)
    no_cache = shadow.register_forward_hook(_without_caches)
    try:
        try:
            dyn = _dynamic_shapes(shadow, meta_args, meta_kwargs) if dynamic else None
            ep = torch.export.export(
                shadow, meta_args, meta_kwargs, dynamic_shapes=dyn, strict=False
            )
        except CaptureError:
            raise
        except Exception:
            if not dynamic:
                raise
            # some models specialise a size; a static capture still works (recaptured per shape)
            tracker.deepest = []
            ep = torch.export.export(shadow, meta_args, meta_kwargs, strict=False)
    except Exception as err:
        where = tracker.deepest[-1] if tracker.deepest else type(model).__name__
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: the failure happened inside "
            f"module '{where}': {type(err).__name__}: {first}\n"
            "What to do: make that module's forward traceable (no data-dependent Python control "
            "flow, no .item()/.tolist() on tensors, no unsupported objects in inputs or outputs), "
            "or pass different example inputs; torch.export's own report is chained below."
        ) from err
    finally:
        tracker.close()
        no_cache.remove()
    return _flatten_exported(functionalize(ep), model, training)


def _is_cache(value) -> bool:
    """A Hugging Face inference cache (DynamicCache, ...): no tensors a training step reads."""
    cache_utils = sys.modules.get("transformers.cache_utils")
    return cache_utils is not None and isinstance(value, cache_utils.Cache)


def _without_caches(module, args, output):
    """The model's output with its inference caches as None: some models return one even with
    use_cache=False (GraniteMoe's `cache`), and torch.export cannot carry it out."""
    if isinstance(output, dict) and any(_is_cache(v) for v in output.values()):
        kept = {k: v for k, v in output.items() if not _is_cache(v)}
        return type(output)(**kept) if hasattr(output, "to_tuple") else kept
    if isinstance(output, tuple) and any(_is_cache(v) for v in output):
        return type(output)(None if _is_cache(v) else v for v in output)
    return output


def _mutating_ops(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """Nodes that write into a tensor in place (`copy_`, `index_put_`, `add_`, ...)."""
    return [
        n
        for n in gm.graph.nodes
        if n.op == "call_function"
        and isinstance(n.target, torch._ops.OpOverload)
        and (n.target._schema.is_mutable or _updates_running_stats(n))
    ]


def _updates_running_stats(node: torch.fx.Node) -> bool:
    """`aten.batch_norm` in training with running stats: it writes them, though its schema
    does not say so (F.batch_norm(x, mean, var, training=True) with no other in-place op)."""
    if node.target is not torch.ops.aten.batch_norm.default:
        return False
    args = node.args
    return len(args) > 5 and bool(args[5]) and any(a is not None for a in args[3:5])


def functionalize(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The program without in-place writes, so no rank can read a buffer before it is written.

    export's training IR keeps in-place ops: a buffer made with `new_empty` and filled through
    slices (DeepSeek-V3's keys) would be sharded before the writes and read uninitialised.
    `run_decompositions({})` rewrites them functionally (`copy_` into a slice becomes
    `slice_scatter`); it costs seconds and renames ops, so programs without writes skip it.
    """
    if not _mutating_ops(ep.graph_module):
        return ep
    functional = ep.run_decompositions({})
    left = _mutating_ops(functional.graph_module)
    if left:
        raise CaptureError(
            f"in-place op {left[0].target} (node '{left[0].name}') survived functionalization; "
            "write that update out of place (x = x + y instead of x += y)"
        )
    _differentiable_copies(functional.graph_module)
    _views_as_reshapes(functional.graph_module)
    return functional


def _views_as_reshapes(gm: torch.fx.GraphModule) -> None:
    """`view` as `reshape`: decomposition turns reshapes into views that are valid only for the
    strides seen while tracing; the sharded program may lay values out otherwise, and in a
    program without writes a copy instead of an alias changes no result."""
    aten = torch.ops.aten
    for node in gm.graph.nodes:
        if node.target in (aten.view.default, aten._unsafe_view.default):
            node.target = aten.reshape.default
    gm.recompile()


def _differentiable_copies(gm: torch.fx.GraphModule) -> None:
    """`copy(dst, src)` (what `dst[...] = src` becomes) as `src` cast and broadcast to dst.

    aten.copy has no derivative, and dst is wholly overwritten, so its value is not needed
    (`non_blocking` only orders a device transfer, which the result does not depend on).
    """
    aten = torch.ops.aten
    graph = gm.graph
    for node in list(graph.nodes):
        if node.target is not aten.copy.default:
            continue
        dst, src = node.args[:2]
        dval, sval = dst.meta["val"], src.meta["val"]
        with graph.inserting_before(node):
            out = src
            if sval.dtype != dval.dtype:
                out = graph.call_function(aten._to_copy.default, (out,), {"dtype": dval.dtype})
                out.meta["val"] = sval.to(dval.dtype)
            if [str(d) for d in sval.shape] != [str(d) for d in dval.shape]:
                sizes = [
                    d if isinstance(d, int) else graph.call_function(aten.sym_size.int, (dst, i))
                    for i, d in enumerate(dval.shape)
                ]
                for i, size in enumerate(sizes):
                    if isinstance(size, torch.fx.Node):
                        size.meta["val"] = dval.shape[i]
                out = graph.call_function(aten.expand.default, (out, sizes))
                out.meta["val"] = dval
            if out is src:  # keep a node of its own: a copy never aliases its source
                out = graph.call_function(aten.clone.default, (src,))
                out.meta["val"] = dval
        out.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()


def _mutated_buffers(sig, model: torch.nn.Module) -> list[str]:
    """The buffers the forward writes, in the order of their new values, which export puts
    before the user outputs; any other write (into an input, a parameter) is refused."""
    mutated = []
    for i, spec in enumerate(sig.output_specs):
        if spec.kind == OutputKind.BUFFER_MUTATION and i == len(mutated):
            mutated.append(spec.target)
        elif spec.kind == OutputKind.BUFFER_MUTATION:
            raise CaptureError(
                f"torch.export put the new value of buffer '{spec.target}' of "
                f"{type(model).__name__} after the model's outputs, where capture does not "
                "look for it; please report this model to us"
            )
        elif spec.kind == OutputKind.USER_INPUT_MUTATION:
            raise CaptureError(
                f"{type(model).__name__}.forward writes into its input '{spec.target}' in place "
                "(USER_INPUT_MUTATION); a sharded rank holds its own copy of inputs, so the write "
                "could not reach your tensor. What to do: clone the input inside forward before "
                "writing to it, or return the new value instead."
            )
        elif spec.kind not in (OutputKind.USER_OUTPUT, OutputKind.LOSS_OUTPUT):
            raise CaptureError(
                f"{type(model).__name__} mutates state during forward ({spec.kind.name} of "
                f"'{spec.target}'); only writes to buffers (BatchNorm running stats, counters) "
                "are supported. What to do: register that state as a buffer, or return it."
            )
    return mutated


def _flatten_exported(ep, model: torch.nn.Module, training: bool) -> CapturedProgram:
    sig = ep.graph_signature
    mutated = _mutated_buffers(sig, model)
    buffer_names = {n for n, _ in model.named_buffers(remove_duplicate=False)}
    state_names, state_kinds, user_names = [], [], []
    constants: dict[str, torch.Tensor] = {}
    for spec in sig.input_specs:
        if spec.kind == InputKind.PARAMETER:
            state_names.append(spec.target)
            state_kinds.append("parameter")
        elif spec.kind == InputKind.BUFFER:
            state_names.append(spec.target)
            state_kinds.append("buffer")
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            state_names.append(spec.target)
            if spec.target in buffer_names:
                state_kinds.append("buffer")
                continue
            value = _real_constant(ep.constants.get(spec.target))
            if value is None:
                raise CaptureError(
                    f"{type(model).__name__}.forward creates a tensor constant '{spec.target}' from "
                    "data while tracing, and its value could not be recovered; register it as a buffer."
                )
            state_kinds.append("constant")
            constants[spec.target] = value
        elif spec.kind == InputKind.USER_INPUT:
            user_names.append(spec.arg.name)
        else:
            raise CaptureError(
                f"unsupported exported input kind {spec.kind.name} for '{spec.target}'"
            )
    gm = ep.graph_module
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    # printers (goldens, history) name inputs by what they are, not by export's node names
    kinds = state_kinds + ["input"] * len(user_names)
    for node, name, kind in zip(placeholders, state_names + user_names, kinds):
        set_state(node, name, kind)
    static_dims = []
    for node in placeholders[len(state_names) :]:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            static_dims.append(tuple(int(s) if isinstance(s, int) else -1 for s in val.shape))
        else:
            static_dims.append(None)
    return CapturedProgram(
        gm=gm,
        state_names=state_names,
        state_kinds=state_kinds,
        user_input_names=user_names,
        in_spec=ep.call_spec.in_spec,
        out_spec=ep.call_spec.out_spec,
        training=training,
        static_dims=static_dims,
        constants=constants,
        mutated=mutated,
    )


def _real_constant(value) -> torch.Tensor | None:
    """The data of a lifted constant: fake tensors made from Python data keep it in `.constant`."""
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(value, FakeTensor):
        value = getattr(value, "constant", None)
    if isinstance(value, torch.Tensor) and value.device.type != "meta":
        return value.detach().clone()
    return None
