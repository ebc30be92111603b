"""The one printer: a stable, normalized text form of a program, for goldens, history and notebooks.

The same printer serves goldens, `sharded.history` snapshots and the notebook views. What it
prints, per program (one program serves every rank of the tp axis; pipeline stages, once
they exist, get one section each):

* inputs, by name (state names such as `model.layers.0.mlp.up_proj.weight`, then the user
  inputs), with placement, per-rank shape and dtype;
* one line per op: `%7 = aten.mm(%5, %6)  S(1)  [s0*s1, 64] f32`, grouped under the module
  it came from. Values are renumbered `%0, %1, ...` in graph order; ops print as their ATen
  op packet (`aten.add`, never the overload such as `.Tensor`, whose choice varies across
  torch versions); collectives print with their mesh axis, `all_reduce[tp](%12)`;
* dynamic sizes as `s0, s1, ...` in order of first appearance (torch's own symbol names,
  e.g. `s72`, change between versions and runs);
* devices as `<device>`, so a plan made on meta prints the same as one made on cpu.

Left out on purpose, because they vary across torch 2.9-2.13 and carry no sharding meaning:
node names, stack traces, export's runtime assertion ops (`_assert_scalar`,
`sym_constrain_range*`), and symbol hints (example sizes).
"""

from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
import torch.fx

from nxd_autoshard.ir.meta import placement_of, state_kind_of, state_name_of, tp_of
from nxd_autoshard.ir.placements import Shard, placement_str
from nxd_autoshard.ir.program import module_path

_DTYPES = {
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float64: "f64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "b8",
    torch.complex64: "c64",
}


_SKIPPED_PREFIXES = ("_assert", "sym_constrain_range")


def dtype_str(dtype: torch.dtype) -> str:
    """Short dtype name: f32, bf16, i64, ..."""
    return _DTYPES.get(dtype, str(dtype).replace("torch.", ""))


def target_name(target: Any) -> str:
    """Stable op name: `aten.mm`, a collective's bare name, or `operator.getitem`."""
    if isinstance(target, torch._ops.OpOverload):
        packet = target.overloadpacket
        return f"{packet._qualified_op_name.replace('::', '.')}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.replace("::", ".")
    module = getattr(target, "__module__", "") or ""
    name = getattr(target, "__name__", None) or type(target).__name__
    if module.startswith("nxd_autoshard"):
        return name
    if module in ("_operator", "operator") or getattr(operator, name, None) is target:
        return f"operator.{name}"
    return f"{module}.{name}" if module else name


def _skipped(node: torch.fx.Node) -> bool:
    if node.op != "call_function":
        return False
    leaf = target_name(node.target).rsplit(".", 1)[-1]
    return leaf.startswith(_SKIPPED_PREFIXES)


class _Names:
    """Renumbers values (%0, %1, ...) and dynamic-size symbols (s0, s1, ...) in order of use."""

    def __init__(self):
        self.values: dict[torch.fx.Node, str] = {}
        self.count = 0
        self.symbols: dict[Any, Any] = {}

    def value(self, node: torch.fx.Node) -> str:
        if node not in self.values:
            named = state_name_of(node) if node.op == "placeholder" else None
            if named is None:
                named, self.count = f"%{self.count}", self.count + 1
            self.values[node] = named
        return self.values[node]

    def sym(self, expr) -> str:
        import sympy

        expr = sympy.sympify(expr)
        for symbol in sorted(expr.free_symbols, key=str):
            if symbol not in self.symbols:
                self.symbols[symbol] = sympy.Symbol(
                    f"s{len(self.symbols)}", integer=True, positive=True
                )
        return str(expr.xreplace(self.symbols))


def _size_str(size, names: _Names) -> str:
    if isinstance(size, torch.SymInt):
        return names.sym(size.node.expr)
    return str(size)


def local_shape(val: torch.Tensor, placement, tp: int) -> list:
    """Per-rank shape of a value: its dim `d` divided by tp where it is Shard(d)."""
    shape = list(val.shape)
    if tp > 1 and isinstance(placement, Shard) and placement.dim < len(shape):
        shape[placement.dim] = shape[placement.dim] // tp
    return shape


def _val_str(val, placement, tp: int, names: _Names) -> str:
    if isinstance(val, torch.Tensor):
        dims = ", ".join(_size_str(s, names) for s in local_shape(val, placement, tp))
        return f"[{dims}] {dtype_str(val.dtype)}"
    if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return names.sym(val.node.expr)
    if isinstance(val, (list, tuple)):
        parts = [
            _val_str(v, p, tp, names)
            for v, p in zip(
                val, placement if isinstance(placement, tuple) else [placement] * len(val)
            )
        ]
        return "(" + ", ".join(parts) + ")"
    if val is None:
        return "-"
    return type(val).__name__


def _arg_str(arg, names: _Names) -> str:
    if isinstance(arg, torch.fx.Node):
        return names.value(arg)
    if isinstance(arg, (list, tuple)):
        inner = ", ".join(_arg_str(a, names) for a in arg)
        return f"[{inner}]" if isinstance(arg, list) else f"({inner}{',' if len(arg) == 1 else ''})"
    if isinstance(arg, dict):
        return "{" + ", ".join(f"{k}: {_arg_str(v, names)}" for k, v in arg.items()) + "}"
    if isinstance(arg, torch.device):
        return "<device>"
    if isinstance(arg, torch.dtype):
        return dtype_str(arg)
    if isinstance(arg, (torch.SymInt, torch.SymFloat)):
        return names.sym(arg.node.expr)
    if isinstance(arg, float):
        return repr(arg)
    if isinstance(arg, (int, bool, str, type(None))):
        return repr(arg) if isinstance(arg, str) else str(arg)
    if isinstance(arg, (torch.memory_format, torch.layout)):
        return str(arg).replace("torch.", "")
    return type(arg).__name__


def _collective_call(node: torch.fx.Node, names: _Names) -> str:
    """`all_gather[tp](%5, dim=2)`: the mesh axis in brackets, options by parameter name."""
    params = list(inspect.signature(node.target).parameters)
    bound = dict(zip(params, node.args))
    bound.update(node.kwargs)
    axis = bound.pop("axis", "?")
    first, *rest = params
    parts = [_arg_str(bound.pop(first), names)] if first in bound else []
    parts += [f"{k}={_arg_str(bound[k], names)}" for k in rest if k in bound]
    return f"{target_name(node.target)}[{axis}]({', '.join(parts)})"


def _is_ours(node: torch.fx.Node) -> bool:
    return (getattr(node.target, "__module__", "") or "").startswith("nxd_autoshard")


def node_label(node: torch.fx.Node, names: _Names | None = None) -> str:
    """The call part of a node's line: `aten.mm(%5, %6)` or `all_reduce[tp](%7)`."""
    names = names or _Names()
    if _is_ours(node):
        return _collective_call(node, names)
    args = [_arg_str(a, names) for a in node.args]
    args += [f"{k}={_arg_str(v, names)}" for k, v in sorted(node.kwargs.items())]
    return f"{target_name(node.target)}({', '.join(args)})"


def display_module(node: torch.fx.Node) -> str:
    """The module a node came from, `<top>` for the model's own forward (or no module)."""

    path = module_path(node)
    # export marks nodes with no module stack by the name of one of its own hooks
    if not path or path.startswith("_empty_nn_module_stack"):
        return "<top>"
    return path


def printed(node: torch.fx.Node) -> bool:
    """Whether the printer shows this node (placeholders, ops other than assertions, attributes)."""
    return node.op in ("placeholder", "get_attr") or (
        node.op == "call_function" and not _skipped(node)
    )


def value_names(gm: torch.fx.GraphModule) -> _Names:
    """The printer's names of a graph's values: inputs by name, every other value %0, %1, ..."""
    names = _Names()
    for node in gm.graph.nodes:
        if printed(node):
            names.value(node)
    return names


def graph_text(gm: torch.fx.GraphModule) -> str:
    """The normalized text of a graph: inputs, then one line per op grouped by module, then outputs."""
    tp = tp_of(gm)
    names = value_names(gm)
    lines = ["inputs:"]
    body: list[str] = []
    module = None
    for node in gm.graph.nodes:
        placement = placement_str(placement_of(node))
        if node.op == "placeholder":
            kind = state_kind_of(node) or "input"
            lines.append(
                f"  {names.value(node)}: {placement} "
                f"{_val_str(node.meta.get('val'), placement_of(node), tp, names)}"
                f" ({kind})"
            )
        elif node.op == "output":
            body.append(f"output: {_arg_str(node.args[0], names)}")
        elif node.op == "call_function" and not _skipped(node):
            where = display_module(node)
            if where != module:
                body.append(f"  [{where}]")
                module = where
            call = node_label(node, names)
            body.append(
                f"    {names.value(node)} = {call}  {placement}  "
                f"{_val_str(node.meta.get('val'), placement_of(node), tp, names)}"
            )
        elif node.op == "get_attr":
            body.append(f"    {names.value(node)} = get_attr({node.target!r})")
    return "\n".join(lines + ["graph:"] + body) + "\n"
