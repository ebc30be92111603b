"""Capture a model of many identical blocks by tracing a few and stamping out the rest.

torch.export costs ~0.2 s per decoder layer; 80 or 126 layers of one class trace the same
code 80 or 126 times. `capture_stamped` instead captures the model with its ModuleList of
blocks cut to a short prefix, proves the blocks alike, and copies each block's node region
once per block of the full list (parameters renamed), giving the program the full capture
gives (same ops, shapes, module paths, state order, and node names: both paths number them
with `renumber`). The passes after capture then run as on a full capture.

Identity is proved, not assumed:

* blocks are grouped into classes by a signature: class, parameter and buffer names, shapes,
  dtypes, and every non-tensor attribute of every submodule (a Gemma-style `attention_type`
  or sliding window, a DeepSeek-style dense/MoE choice make blocks of different classes).
  An attribute that holds the block's own position (HF's `layer_idx`) may differ; during the
  short capture it is a watched int, and any use of it in Python sends the model to the
  full capture (its value could steer a branch that no sample shows);
* the prefix holds every (class, class of the block before) pair of the full list and two
  blocks of every class with more than one: the two are traced at different positions, and
  their captured regions must be the same op for op (targets, constants, shapes, dtypes,
  module paths, where each argument comes from). A forward that reads the layer index in a
  way the graph shows (a constant, a branch taken differently) makes them differ;
* a block may read only the values made before the blocks, its own state and the block just
  before it; code after the blocks may read only the last block.

Anything else (no prefix shorter than the list, a capture of the prefix that fails, a
region that is not contiguous, a tensor constant inside a block, a block that writes a buffer
of another module) falls back to the full capture, with the reason in the debug log
(`logging.getLogger("nxd_autoshard.stamp")`). A buffer a block writes (an MoE's token count)
is written by every block of its class: one new value per block, in state order, as export
orders them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.fx

from nxd_autoshard.ir.meta import set_state
from nxd_autoshard.ir.program import CapturedProgram, graph_module, module_path, split_written

__all__ = ["capture_stamped", "full_capture", "renumber", "stamped_lists"]

log = logging.getLogger("nxd_autoshard.stamp")

_ENABLED = [True]


@contextlib.contextmanager
def full_capture() -> Iterator[None]:
    """Capture every block by tracing inside the block (tests compare both paths)."""
    _ENABLED.append(False)
    try:
        yield
    finally:
        _ENABLED.pop()


class _Fallback(Exception):
    """Why this model is captured in full."""


# ---------------------------------------------------------------- which blocks are alike


def _block_lists(model: torch.nn.Module) -> list[tuple[str, torch.nn.ModuleList]]:
    """The ModuleLists of blocks split.find_blocks cuts between (not nested in one another)."""
    lists = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) >= 2 and name:
            kinds = {type(child) for child in mod}
            if len(kinds) == 1 and not isinstance(mod[0], (torch.nn.Linear, torch.nn.Embedding)):
                lists.append((name, mod))
    return [(n, m) for n, m in lists if not any(n.startswith(o + ".") for o, _ in lists)]


def _freeze(value, depth: int = 0):
    """A hashable stand-in for an attribute value: data by value, other objects by identity."""
    if value is None or isinstance(value, (bool, int, float, str, bytes, complex)):
        return (type(value).__name__, value)
    if isinstance(value, (torch.dtype, torch.device, torch.Size)):
        return ("torch", str(value))
    if depth < 4 and isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_freeze(v, depth + 1) for v in value))
    if depth < 4 and isinstance(value, dict):
        return ("dict", tuple((repr(k), _freeze(v, depth + 1)) for k, v in value.items()))
    if depth < 4 and isinstance(value, (set, frozenset)):
        return ("set", tuple(sorted(repr(v) for v in value)))
    if isinstance(value, functools.partial):  # each block's own partial of one function
        return (
            "partial",
            _freeze(value.func, depth + 1),
            _freeze(value.args, depth + 1),
            _freeze(value.keywords, depth + 1),
        )
    if isinstance(value, torch.Tensor):  # a plain tensor attribute: this very tensor
        return ("tensor", id(value))
    return ("object", type(value).__qualname__, id(value))


_SKIP_ATTRS = {"_parameters", "_buffers", "_modules"}


def _items(block: torch.nn.Module) -> list[tuple]:
    """A block's class, parameter and buffer shapes and dtypes, and non-tensor attributes."""
    items: list[tuple] = [("class", type(block).__module__, type(block).__qualname__)]
    for name, p in block.named_parameters(remove_duplicate=False):
        items.append(("param", name, tuple(p.shape), str(p.dtype), p.requires_grad))
    for name, b in block.named_buffers(remove_duplicate=False):
        items.append(("buffer", name, tuple(b.shape), str(b.dtype)))
    for path, mod in block.named_modules(remove_duplicate=False):
        items.append(("module", path, type(mod).__module__, type(mod).__qualname__))
        for attr, value in vars(mod).items():
            if attr in _SKIP_ATTRS:
                continue
            if attr == "_non_persistent_buffers_set":
                value = sorted(value)
            items.append(("attr", path, attr, value))
    return items


def _classes(blocks: torch.nn.ModuleList) -> tuple[list[int], list[tuple[str, str]]]:
    """Class number of each block (equal signatures, first seen first), and the attributes that
    hold each block's own position (an int equal to its index in every block: `layer_idx`)."""
    per_block = [_items(block) for block in blocks]
    index_attrs = None
    for i, items in enumerate(per_block):
        here = {
            (it[1], it[2]) for it in items if it[0] == "attr" and type(it[3]) is int and it[3] == i
        }
        index_attrs = here if index_attrs is None else index_attrs & here
    index_attrs = index_attrs or set()
    seen: dict[tuple, int] = {}
    classes = []
    for items in per_block:
        sig = tuple(
            ("index", it[1], it[2])
            if it[0] == "attr" and (it[1], it[2]) in index_attrs
            else (*it[:3], _freeze(it[3]))
            if it[0] == "attr"
            else it
            for it in items
        )
        classes.append(seen.setdefault(sig, len(seen)))
    return classes, sorted(index_attrs)


def _prefix_length(classes: list[int]) -> int:
    """Shortest prefix holding every (class, class before) pair, two blocks of every class
    that has two, and ending in the class the list ends in."""
    n = len(classes)
    keys = {(classes[j], classes[j - 1] if j else None) for j in range(n)}
    counts = {c: classes.count(c) for c in set(classes)}
    for k in range(2, n):
        pre = classes[:k]
        if {(pre[j], pre[j - 1] if j else None) for j in range(k)} != keys:
            continue
        if any(counts[c] >= 2 and pre.count(c) < 2 for c in counts):
            continue
        if pre[-1] != classes[-1]:
            continue
        return k
    return n


# ---------------------------------------------------------------- watched layer indices


class _Touched:
    uses: list[str] = []


class _WatchedIndex(int):
    """An int that notes every Python-level use (comparison, arithmetic, hashing, printing)."""

    def __reduce_ex__(self, protocol):  # deepcopy (the fake shadow) keeps the watch
        return (_WatchedIndex, (_PLAIN(self),))


_PLAIN = int.__int__  # the int itself, without the watch


def _watch(op: str):
    base = getattr(int, op)

    def method(self, *args):
        _Touched.uses.append(op)
        plain = _PLAIN(self)
        return base(plain, *(_PLAIN(a) if isinstance(a, _WatchedIndex) else a for a in args))

    return method


for _op in (
    "__eq__ __ne__ __lt__ __le__ __gt__ __ge__ __hash__ __bool__ __index__ __int__ __float__ "
    "__add__ __radd__ __sub__ __rsub__ __mul__ __rmul__ __mod__ __rmod__ __floordiv__ "
    "__rfloordiv__ __truediv__ __rtruediv__ __neg__ __pow__ __and__ __or__ __xor__ __str__ "
    "__repr__ __format__"
).split():
    setattr(_WatchedIndex, _op, _watch(_op))


@contextlib.contextmanager
def _short(model: torch.nn.Module, cuts: dict[str, int], index_attrs: dict[str, list]):
    """The model with each block list cut to its prefix and position attributes watched."""
    lists, attrs = [], []
    try:
        for path, k in cuts.items():
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            full = parent._modules[name]
            lists.append((parent, name, full))
            for block in list(full)[:k]:
                for sub, attr in index_attrs.get(path, []):
                    mod = block.get_submodule(sub) if sub else block
                    value = getattr(mod, attr)
                    attrs.append((mod, attr, value))
                    setattr(mod, attr, _WatchedIndex(value))
            parent._modules[name] = torch.nn.ModuleList(list(full)[:k])
        _Touched.uses = []
        yield
    finally:
        for parent, name, full in lists:
            parent._modules[name] = full
        for mod, attr, value in attrs:
            setattr(mod, attr, _PLAIN(value))


# ---------------------------------------------------------------- regions of the short graph


@dataclass
class _List:
    """One block list: its path, full length, prefix length, class of each block."""

    path: str
    length: int
    prefix: int
    classes: list[int]

    def position(self, path: str) -> int | None:
        """The prefix position of the block a module path is in, or None."""
        if not path.startswith(self.path + "."):
            return None
        head = path[len(self.path) + 1 :].split(".", 1)[0]
        return int(head) if head.isdigit() else None

    def rep(self, j: int) -> int:
        """The prefix block whose region block j copies: same class, same class before it."""
        key = (self.classes[j], self.classes[j - 1] if j else None)
        for r in range(self.prefix):
            if (self.classes[r], self.classes[r - 1] if r else None) == key:
                return r
        raise _Fallback(f"no prefix block of {self.path} like block {j}")


def _state_region(program: CapturedProgram, lists: list[_List]):
    """(list index, position) of each state placeholder of a block, by its qualified name."""
    out = {}
    for i, name in enumerate(program.state_names):
        module = name.rsplit(".", 1)[0] if "." in name else ""
        for li, blist in enumerate(lists):
            r = blist.position(module + ".")
            r = blist.position(name) if r is None else r
            if r is not None:
                out[i] = (li, r)
    return out


def _rename_block(text: str, list_path: str, r: int, j: int) -> str:
    """`model.layers.1.mlp` -> `model.layers.7.mlp` (also inside export's stack keys)."""
    return re.sub(rf"(?<![\w.]){re.escape(list_path)}\.{r}(?=\.|$|')", f"{list_path}.{j}", text)


def _renamed_stack(stack: dict | None, list_path: str, r: int, j: int) -> dict | None:
    if not stack or r == j:
        return stack
    return dict(_renamed_items(tuple(stack.items()), list_path, r, j))


@functools.lru_cache(maxsize=4096)
def _renamed_items(items: tuple, list_path: str, r: int, j: int) -> tuple:
    """A block's nodes share a few module stacks: each is renamed once per stamped copy."""
    return tuple(
        (_rename_block_key(k, list_path, r, j), (_rename_block(v[0], list_path, r, j), *v[1:]))
        for k, v in items
    )


def _rename_block_key(key: str, list_path: str, r: int, j: int) -> str:
    return re.sub(rf"{re.escape(list_path)}\.{r}(?=\.|$)", f"{list_path}.{j}", key)


def _val_key(val) -> object:
    if isinstance(val, torch.Tensor):
        return ("T", tuple(str(s) for s in val.shape), str(val.dtype), val.requires_grad)
    if isinstance(val, (list, tuple)):
        return tuple(_val_key(v) for v in val)
    if isinstance(val, torch.SymInt):
        return ("S", str(val))
    return ("V", type(val).__name__)


@dataclass
class _Regions:
    """Each node of the short graph: in which block region (and where in it), or outside."""

    of: dict[torch.fx.Node, tuple[int, int]]  # node -> (list, position)
    nodes: dict[tuple[int, int], list[torch.fx.Node]]  # region -> its nodes, graph order
    index: dict[torch.fx.Node, int]  # node -> its place in its region
    state: dict[torch.fx.Node, tuple[int, int, str]]  # state placeholder -> (list, pos, rel name)


def _regions(program: CapturedProgram, lists: list[_List]) -> _Regions:
    """Block regions of the short graph, each a contiguous run in block order."""
    placeholders = [n for n in program.gm.graph.nodes if n.op == "placeholder"]
    state = {}
    for i, (li, r) in _state_region(program, lists).items():
        prefix = f"{lists[li].path}.{r}."
        state[placeholders[i]] = (li, r, program.state_names[i][len(prefix) :])
        if program.state_kinds[i] == "constant":
            raise _Fallback(f"tensor constant {program.state_names[i]} inside a block")
    of, nodes = {}, {}
    order: list[tuple[int, int] | None] = []
    for node in program.gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "get_attr":
            order.append(None)
            continue
        path = module_path(node)
        where = None
        for li, blist in enumerate(lists):
            r = blist.position(path)
            if r is not None:
                where = (li, r)
        if where is not None:
            of[node] = where
            nodes.setdefault(where, []).append(node)
        if not order or order[-1] != where:
            order.append(where)
    for li, blist in enumerate(lists):
        runs = [w for w in order if w is not None and w[0] == li]
        if runs != [(li, r) for r in range(blist.prefix)]:
            raise _Fallback(
                f"the nodes of {blist.path}'s blocks are not one run per block in order "
                f"(code between the blocks, or a block the forward skips): {runs[:8]}"
            )
        # the run of a list's blocks: nothing outside it in between
        first = order.index((li, 0))
        if order[first : first + blist.prefix] != runs:
            raise _Fallback(f"code outside {blist.path}'s blocks runs between them")
    index = {n: k for region in nodes.values() for k, n in enumerate(region)}
    return _Regions(of, nodes, index, state)


def _source(arg: torch.fx.Node, here: tuple[int, int], regions: _Regions, outputs: dict):
    """Where an argument of a node of region `here` comes from, position-free."""
    if arg in regions.state:
        li, r, rel = regions.state[arg]
        if (li, r) != here:
            raise _Fallback(f"a block reads the state of another block ({rel})")
        return ("state", rel)
    where = regions.of.get(arg)
    if where is None:
        return ("outside", arg)
    if where == here:
        return ("in", regions.index[arg])
    if where == (here[0], here[1] - 1):
        return ("prev", outputs[where].index(arg))
    raise _Fallback(
        f"a node of block {here[1]} reads '{arg.name}' of block {where[1]}, not the block "
        "just before it"
    )


def _outputs(regions: _Regions) -> dict[tuple[int, int], list[torch.fx.Node]]:
    """Each region's nodes read outside it, in graph order (its interface to what follows)."""
    out = {}
    for where, nodes in regions.nodes.items():
        out[where] = [n for n in nodes if any(regions.of.get(u) != where for u in n.users)]
    return out


def _map_args(value, fn):
    return torch.fx.node.map_aggregate(
        value, lambda a: fn(a) if isinstance(a, torch.fx.Node) else a
    )


def _region_key(where, regions: _Regions, outputs, lists: list[_List]) -> list:
    """A region as data: op by op, with every argument's source and the values' shapes."""
    li, r = where
    key = []
    for node in regions.nodes[where]:
        args = _map_args(
            (node.args, node.kwargs), lambda a: _proof_source(a, where, regions, outputs)
        )
        stack = [
            (re.sub(rf"^{re.escape(lists[li].path)}\.{r}(?=\.|$)", "<b>", v[0]), str(v[1]))
            for v in (node.meta.get("nn_module_stack") or {}).values()
        ]
        key.append(
            (node.op, node.target, _key_of_args(args), _val_key(node.meta.get("val")), stack)
        )
    return key


def _proof_source(arg: torch.fx.Node, where, regions: _Regions, outputs) -> tuple:
    """An argument's source for comparing blocks: a value from before the block (made before
    the blocks, or by the block before) by its shape and dtype, so that the block at position
    0 compares with the later ones; stamping re-points each at what its own twin reads."""
    kind, key = _source(arg, where, regions, outputs)
    if kind in ("outside", "prev"):
        return ("external", _val_key(arg.meta.get("val")))
    return (kind, key)


def _key_of_args(value):
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_key_of_args(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _key_of_args(v)) for k, v in value.items()))
    if isinstance(value, torch.fx.Node):
        return ("node", id(value))
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("sym", str(value))
    if isinstance(value, float) and value != value:
        return ("nan",)
    return (type(value).__name__, value if _hashable(value) else repr(value))


def _hashable(value) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _prove_alike(regions: _Regions, outputs, lists: list[_List]) -> None:
    """Every prefix block of a class captured the same region as the class's first block."""
    for li, blist in enumerate(lists):
        first: dict[int, list] = {}
        for r in range(blist.prefix):
            key = _region_key((li, r), regions, outputs, lists)
            c = blist.classes[r]
            if c not in first:
                first[c] = key
            elif key != first[c]:
                at = next(
                    (k for k, (a, b) in enumerate(zip(key, first[c])) if a != b),
                    min(len(key), len(first[c])),
                )
                raise _Fallback(
                    f"{blist.path}.{r} captured another program than the first block of its "
                    f"class (op {at} of {len(key)} vs {len(first[c])} differs): its forward "
                    "depends on the layer's position"
                )
        for r in range(blist.prefix):  # blocks of one class end in the same interface
            same = [q for q in range(blist.prefix) if blist.classes[q] == blist.classes[r]]
            size = {len(outputs[(li, q)]) for q in same}
            if len(size) != 1:
                raise _Fallback(f"blocks of one class of {blist.path} hand on different values")


# ---------------------------------------------------------------- the stamped graph


def _placeholder_name(kind: str, name: str) -> str:
    prefix = {"parameter": "p_", "buffer": "b_", "constant": "c_"}.get(kind, "")
    return prefix + re.sub(r"[^0-9a-zA-Z_]", "_", name)


_SUFFIX = re.compile(r"_\d+$")


def _copy_node(graph: torch.fx.Graph, node: torch.fx.Node, args, kwargs, meta: dict):
    new = graph.create_node(node.op, node.target, args, kwargs, _SUFFIX.sub("", node.name))
    new.meta = meta
    return new


def renumber(program: CapturedProgram, stamps: dict | None = None) -> CapturedProgram:
    """The program rebuilt with names made in graph order (`linear`, `linear_1`, ...; inputs by
    what they are); with `stamps` (from `capture_stamped`), each block list expanded to full
    length. A full and a stamped capture of one model give the same graph, names included."""
    gm = program.gm
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names, kinds = program.state_names, program.state_kinds
    state_ph = placeholders[: len(names)]
    if stamps is None:
        for node, name, kind in zip(state_ph, names, kinds):
            env[node] = _placeholder(graph, node, name, kind, dict(node.meta))
        new_names, new_kinds = list(names), list(kinds)
        block_state = {}
    else:
        new_names, new_kinds, block_state = _expand_state(program, graph, env, state_ph, stamps)
    for node in placeholders[len(names) :]:
        env[node] = graph.placeholder(node.name, type_expr=node.type)
        env[node].meta = dict(node.meta)
    regions: _Regions | None = stamps["regions"] if stamps else None
    lists: list[_List] = stamps["lists"] if stamps else []
    outputs = stamps["outputs"] if stamps else {}
    last_copy: dict[tuple[int, int], list[torch.fx.Node]] = {}  # (list, full pos) -> copies
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        where = regions.of.get(node) if regions else None
        if where is not None:
            li, r = where
            if r == 0 and regions.index[node] == 0:  # the list's run starts: stamp it whole
                for j in range(lists[li].length):
                    last_copy[(li, j)] = _stamp_block(
                        graph, env, regions, outputs, lists, li, j, block_state, last_copy
                    )
            continue

        def arg(a: torch.fx.Node) -> torch.fx.Node:
            w = regions.of.get(a) if regions else None
            if regions and a in regions.state:
                raise _Fallback(f"code outside the blocks reads '{regions.state[a][2]}' of a block")
            if w is None:
                return env[a]
            li, r = w
            if r != lists[li].prefix - 1:
                raise _Fallback(f"code after {lists[li].path} reads block {r}, not the last")
            return last_copy[(li, lists[li].length - 1)][regions.index[a]]

        if node.op == "output" and regions:
            written, values = _stamped_writes(
                program, node, regions, lists, last_copy, new_names, arg
            )
            user = _map_args(tuple(split_written(program.mutated, node.args[0])[1]), arg)
            env[node] = graph.output((*values, *user), type_expr=node.type)
            env[node].meta = dict(node.meta)
            program.mutated = written
            continue
        args, kwargs = _map_args((node.args, node.kwargs), arg)
        if node.op == "output":
            env[node] = graph.output(args[0], type_expr=node.type)
            env[node].meta = dict(node.meta)
        else:
            env[node] = _copy_node(graph, node, args, kwargs, dict(node.meta))
    new_gm = graph_module(gm, graph)
    program.gm = new_gm
    program.state_names, program.state_kinds = new_names, new_kinds
    return program


def _stamped_writes(program, output, regions: _Regions, lists, last_copy, names: list[str], arg):
    """The buffers the full program writes and their new values: a write outside the blocks as
    it is, a block's write once per block of the full list (from the copy of its twin's
    region), all in the order of the state, as export orders a full capture's writes."""
    by_block: dict[tuple[int, int], list[tuple[str, torch.fx.Node]]] = {}
    found: list[tuple[str, torch.fx.Node]] = []
    for name, value in zip(program.mutated, output.args[0]):
        where = regions.of.get(value)
        if where is None:
            if any(name.startswith(b.path + ".") for b in lists):
                raise _Fallback(f"code outside the blocks writes '{name}' of a block")
            found.append((name, arg(value)))
            continue
        prefix = f"{lists[where[0]].path}.{where[1]}."
        if not name.startswith(prefix):
            raise _Fallback(f"a block writes '{name}', a buffer outside it")
        by_block.setdefault(where, []).append((name[len(prefix) :], value))
    copied = list(found)
    for li, blist in enumerate(lists):
        for j in range(blist.length):
            for rel, value in by_block.get((li, blist.rep(j)), []):
                copy = last_copy[(li, j)][regions.index[value]]
                copied.append((f"{blist.path}.{j}.{rel}", copy))
    order = {n: i for i, n in enumerate(names)}
    copied.sort(key=lambda item: order[item[0]])
    return [n for n, _ in copied], [v for _, v in copied]


def _placeholder(graph, node, name: str, kind: str, meta: dict) -> torch.fx.Node:
    new = graph.placeholder(_placeholder_name(kind, name), type_expr=node.type)
    new.meta = meta
    set_state(new, name, kind)
    return new


def _expand_state(program, graph, env, state_ph, stamps):
    """State placeholders in full order: each run of a list's block state repeated per block."""
    regions: _Regions = stamps["regions"]
    lists: list[_List] = stamps["lists"]
    names, kinds = program.state_names, program.state_kinds
    out_names, out_kinds = [], []
    block_state: dict[tuple[int, int, str], torch.fx.Node] = {}  # (list, full pos, rel) -> ph
    i = 0
    while i < len(state_ph):
        node = state_ph[i]
        if node not in regions.state:
            env[node] = _placeholder(graph, node, names[i], kinds[i], dict(node.meta))
            out_names.append(names[i])
            out_kinds.append(kinds[i])
            i += 1
            continue
        li = regions.state[node][0]
        run = []
        while i < len(state_ph) and regions.state.get(state_ph[i], (None,))[0] == li:
            run.append(i)
            i += 1
        by_pos: dict[int, list[int]] = {}
        for k in run:
            by_pos.setdefault(regions.state[state_ph[k]][1], []).append(k)
        positions = [regions.state[state_ph[k]][1] for k in run]
        if positions != sorted(positions):
            raise _Fallback(f"the state of {lists[li].path}'s blocks is not in block order")
        blist = lists[li]
        # (a class's blocks hold the same state: a run may skip the blocks of a class with none)
        for j in range(blist.length):
            r = blist.rep(j)
            for k in by_pos.get(r, []):
                rel = regions.state[state_ph[k]][2]
                name = f"{blist.path}.{j}.{rel}"
                meta = dict(state_ph[k].meta)
                block_state[(li, j, rel)] = _placeholder(graph, state_ph[k], name, kinds[k], meta)
                out_names.append(name)
                out_kinds.append(kinds[k])
    return out_names, out_kinds, block_state


def _stamp_block(graph, env, regions, outputs, lists, li, j, block_state, last_copy):
    """Block j of list li: the region of its prefix twin, arguments re-pointed."""
    blist = lists[li]
    r = blist.rep(j)
    where = (li, r)
    copies: list[torch.fx.Node] = []

    def arg(a: torch.fx.Node) -> torch.fx.Node:
        kind, key = _source(a, where, regions, outputs)
        if kind == "in":
            return copies[key]
        if kind == "state":
            return block_state[(li, j, key)]
        if kind == "outside":
            return env[a]
        prev = last_copy[(li, j - 1)]  # the block before, whose twin's interface a is in
        twin = (li, blist.rep(j - 1))
        return prev[regions.index[outputs[twin][key]]]

    for node in regions.nodes[where]:
        args, kwargs = _map_args((node.args, node.kwargs), arg)
        meta = dict(node.meta)
        meta["nn_module_stack"] = _renamed_stack(meta.get("nn_module_stack"), blist.path, r, j)
        copies.append(_copy_node(graph, node, args, kwargs, meta))
    return copies


# ---------------------------------------------------------------- entry point


def stamped_lists(model: torch.nn.Module) -> tuple[list[_List], dict[str, list]]:
    """The block lists worth stamping (a prefix shorter than the list) and their position attrs."""
    lists, index_attrs = [], {}
    for path, blocks in _block_lists(model):
        classes, attrs = _classes(blocks)
        k = _prefix_length(classes)
        if k < len(blocks):
            lists.append(_List(path, len(blocks), k, classes))
            index_attrs[path] = attrs
    return lists, index_attrs


def capture_stamped(model: torch.nn.Module, capture_fn) -> CapturedProgram:
    """`capture_fn(model)` on the model cut to its block prefixes, stamped to full length; the
    full capture (renumbered the same way) where stamping is not proved sound."""
    if not _ENABLED[-1]:
        return renumber(capture_fn(model))
    lists, index_attrs = stamped_lists(model)
    if not lists:
        return renumber(capture_fn(model))
    if _shared_tensors(model, lists):
        log.debug("full capture: blocks share a parameter or buffer object")
        return renumber(capture_fn(model))
    try:
        with _short(model, {b.path: b.prefix for b in lists}, index_attrs):
            try:
                short = capture_fn(model)
            except Exception as err:  # the prefix alone does not capture; the full model may
                first = (str(err).strip().splitlines() or [""])[0]
                raise _Fallback(
                    f"the prefix did not capture ({type(err).__name__}: {first})"
                ) from err
            touched = list(_Touched.uses)
        if touched:
            raise _Fallback(f"the forward uses a block's position attribute ({touched[0]})")
        regions = _regions(short, lists)
        outputs = _outputs(regions)
        _prove_alike(regions, outputs, lists)
        stamps = {"lists": lists, "regions": regions, "outputs": outputs}
        program = renumber(short, stamps)
    except _Fallback as why:
        log.debug("full capture of %s: %s", type(model).__name__, why)
        return renumber(capture_fn(model))
    log.debug(
        "stamped %s", ", ".join(f"{b.path}: {b.prefix} of {b.length} blocks traced" for b in lists)
    )
    return program


def _shared_tensors(model: torch.nn.Module, lists: list[_List]) -> bool:
    """Whether a tensor of a block is also held elsewhere (tied across blocks or with the model)."""
    owners: dict[int, int] = {}
    for _, t in model.named_parameters(remove_duplicate=False):
        owners[id(t)] = owners.get(id(t), 0) + 1
    for _, t in model.named_buffers(remove_duplicate=False):
        owners[id(t)] = owners.get(id(t), 0) + 1
    for blist in lists:
        blocks = model.get_submodule(blist.path)
        for block in blocks:
            for _, t in list(block.named_parameters(remove_duplicate=False)) + list(
                block.named_buffers(remove_duplicate=False)
            ):
                if owners.get(id(t), 0) > 1:
                    return True
    return False
