"""propagate, partition and split on small hand-built FX graphs (no capture, no HF model).

Each graph is written node by node with aten ops and meta tensors, as capture would leave it
(state placeholders named, nodes tagged with their module); the passes then run alone, and the
partitioned program runs every rank in the simulator against the unsharded graph.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx
from torch.utils import _pytree as pytree

from nxd_autoshard.compiler.partition import partition
from nxd_autoshard.compiler.plan import CompileSettings, Plan
from nxd_autoshard.compiler.propagate import propagate_placements
from nxd_autoshard.compiler.split import split_stages
from nxd_autoshard.ir import ops
from nxd_autoshard.ir.meta import placement_of, set_state, tp_of
from nxd_autoshard.ir.placements import Partial, Replicate, Shard
from nxd_autoshard.ir.program import CapturedProgram
from nxd_autoshard.runtime.simulator import scatter_to_ranks, simulate_graph

aten = torch.ops.aten


class GraphBuilder:
    """Append aten nodes to a graph, each with its meta value and the module it came from."""

    def __init__(self):
        self.graph = torch.fx.Graph()
        self.state: list[tuple[str, str]] = []
        self.inputs: list[str] = []

    def param(self, name: str, *shape: int) -> torch.fx.Node:
        node = self.graph.placeholder("p_" + name.replace(".", "_"))
        node.meta["val"] = torch.empty(shape, device="meta")
        set_state(node, name, "parameter")
        self.state.append((name, "parameter"))
        return node

    def input(self, name: str, *shape: int) -> torch.fx.Node:
        node = self.graph.placeholder(name)
        node.meta["val"] = torch.empty(shape, device="meta")
        self.inputs.append(name)
        return node

    def op(self, target, *args, module: str = "") -> torch.fx.Node:
        node = self.graph.call_function(target, args)
        meta_args = torch.fx.node.map_arg(args, lambda n: n.meta["val"])
        node.meta["val"] = target(*meta_args)
        if module:
            # capture's nn_module_stack: outermost first, each (qualified path, module class)
            parts = module.split(".")
            node.meta["nn_module_stack"] = {
                f"L__{i}": (".".join(parts[: i + 1]), torch.nn.Module) for i in range(len(parts))
            }
        return node

    def program(self, *outputs: torch.fx.Node) -> CapturedProgram:
        # state placeholders first, then the user inputs: `gm(*state, *inputs)`
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        first_op = next(n for n in self.graph.nodes if n.op != "placeholder")
        for node in sorted(placeholders, key=lambda n: n.target in self.inputs):
            first_op.prepend(node)
        self.graph.output(tuple(outputs))
        gm = torch.fx.GraphModule(torch.nn.Module(), self.graph)
        n_user = len(self.inputs)
        _, in_spec = pytree.tree_flatten(((None,) * n_user, {}))
        _, out_spec = pytree.tree_flatten(tuple(None for _ in outputs))
        return CapturedProgram(
            gm=gm,
            state_names=[n for n, _ in self.state],
            state_kinds=[k for _, k in self.state],
            user_input_names=list(self.inputs),
            in_spec=in_spec,
            out_spec=out_spec,
            training=True,
        )


def mlp_block(b: GraphBuilder, x: torch.fx.Node, prefix: str, width=16, hidden=32):
    """x + down(gelu(up(x * scale))), the up/down pair under `prefix` (scale: a norm's weight)."""
    scale = b.param(f"{prefix}.norm.weight", width)
    up = b.param(f"{prefix}.up.weight", hidden, width)
    down = b.param(f"{prefix}.down.weight", width, hidden)
    normed = b.op(aten.mul.Tensor, x, scale, module=f"{prefix}.norm")
    h = b.op(aten.linear.default, normed, up, module=f"{prefix}.up")
    g = b.op(aten.gelu.default, h, module=prefix)
    y = b.op(aten.linear.default, g, down, module=f"{prefix}.down")
    return b.op(aten.add.Tensor, x, y, module=prefix)


def run_unsharded(program: CapturedProgram, values: dict[str, torch.Tensor], x: torch.Tensor):
    state = [values[n] for n in program.state_names]
    return program.gm(*state, x)


def run_ranks_of(program, result, values, x, tp):
    per_rank = [
        scatter_to_ranks(values[n], result.param_placements.get(n, Replicate()), tp, 1, None)
        for n in program.state_names
    ]
    return simulate_graph(program.gm, tp, per_rank + [x])


def collectives(gm: torch.fx.GraphModule) -> list[str]:
    return [n.target.__name__ for n in gm.graph.nodes if n.target in ops.PARALLEL_OPS]


def _weights(program, seed=0):
    torch.manual_seed(seed)
    return {
        n: torch.randn(ph.meta["val"].shape) * 0.3
        for n, ph in zip(
            program.state_names, [p for p in program.gm.graph.nodes if p.op == "placeholder"]
        )
    }


def test_propagate_pairs_column_and_row_and_leaves_a_partial_sum():
    b = GraphBuilder()
    x = b.input("x", 4, 16)
    out = mlp_block(b, x, "mlp")
    program = b.program(out)
    result = propagate_placements(program, 2, styles={})
    assert result.param_placements["mlp.up.weight"] == Shard(0)
    assert result.param_placements["mlp.down.weight"] == Shard(1)
    up, down = [n for n in program.gm.graph.nodes if n.target is aten.linear.default]
    assert placement_of(up) == Shard(1)  # the column's output, sharded on its features
    (gelu,) = up.users
    assert placement_of(gelu) == Shard(1)  # element-wise: follows its input
    assert placement_of(down) == Partial()  # the row's output: a sum over ranks
    assert result.auto_styles == {"mlp.up": "column", "mlp.down": "row"}


def test_propagate_obeys_the_plan_and_a_veto():
    b = GraphBuilder()
    x = b.input("x", 4, 16)
    program = b.program(mlp_block(b, x, "mlp"))
    replicated = propagate_placements(
        copy.deepcopy(program), 2, styles={}, veto={"mlp.up": "all", "mlp.down": "all"}
    )
    assert all(p == Replicate() for p in replicated.param_placements.values())
    rows = propagate_placements(
        copy.deepcopy(program),
        2,
        styles={"mlp.up.weight": "row", "mlp.down.weight": "replicate"},
        auto=False,
    )
    assert rows.param_placements["mlp.up.weight"] == Shard(1)
    assert rows.param_placements.get("mlp.down.weight", Replicate()) == Replicate()


@pytest.mark.parametrize("tp", [2, 4])
def test_partition_inserts_megatron_collectives_and_equals_the_unsharded_graph(tp):
    b = GraphBuilder()
    x = b.input("x", 4, 16)
    h = mlp_block(b, x, "layers.0")
    program = b.program(mlp_block(b, h, "layers.1"))
    values = _weights(program)
    xin = torch.randn(4, 16)
    (want,) = run_unsharded(program, values, xin)

    result = propagate_placements(program, tp, styles={})
    partition(program, result, tp)
    # per block: the identity-forward / all-reduce-backward into the column (Megatron's f),
    # one all-reduce out of the row (g); no gathers
    assert collectives(program.gm) == ["grad_all_reduce", "all_reduce"] * 2
    assert tp_of(program.gm) == tp
    (outs,) = run_ranks_of(program, result, values, xin, tp)
    for rank_out in outs:
        torch.testing.assert_close(rank_out, want, atol=1e-5, rtol=1e-5)


def test_partition_localises_a_head_count_literal():
    # linear -> view(b, s, heads, head_dim) -> sum over heads' features -> view back -> linear
    b = GraphBuilder()
    x = b.input("x", 2, 3, 16)
    q = b.param("attn.q.weight", 16, 16)
    o = b.param("attn.o.weight", 16, 16)
    h = b.op(aten.linear.default, x, q, module="attn.q")
    v = b.op(aten.view.default, h, [2, 3, 4, 4], module="attn")
    r = b.op(aten.relu.default, v, module="attn")
    back = b.op(aten.view.default, r, [2, 3, 16], module="attn")
    out = b.op(aten.linear.default, back, o, module="attn.o")
    program = b.program(out)
    values = _weights(program, seed=1)
    xin = torch.randn(2, 3, 16)
    (want,) = run_unsharded(program, values, xin)

    result = propagate_placements(program, 2, styles={})
    partition(program, result, 2)
    views = [n.args[1] for n in program.gm.graph.nodes if n.target is aten.view.default]
    assert views == [[2, 3, 2, 4], [2, 3, 8]]  # each rank views its 2 heads, 8 features
    (outs,) = run_ranks_of(program, result, values, xin, 2)
    torch.testing.assert_close(outs[0], want, atol=1e-5, rtol=1e-5)


def test_partition_gathers_what_an_op_without_a_split_needs():
    # a sort over the sharded feature dim has no sharded form: the value is gathered first
    b = GraphBuilder()
    x = b.input("x", 4, 16)
    w = b.param("proj.weight", 32, 16)
    h = b.op(aten.linear.default, x, w, module="proj")
    s = b.op(aten.cumsum.default, h, 1, module="head")
    program = b.program(s)
    values = _weights(program, seed=2)
    xin = torch.randn(4, 16)
    (want,) = run_unsharded(program, values, xin)
    result = propagate_placements(program, 2, styles={"proj.weight": "column"}, auto=False)
    partition(program, result, 2)
    assert "all_gather" in collectives(program.gm)
    (outs,) = run_ranks_of(program, result, values, xin, 2)
    torch.testing.assert_close(outs[1], want, atol=1e-5, rtol=1e-5)


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = (
            torch.nn.Linear(16, 32, bias=False),
            torch.nn.Linear(32, 16, bias=False),
        )


class _Stack(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.layers = torch.nn.ModuleList(_Block() for _ in range(n))


@pytest.mark.parametrize("n_stages", [2, 4])
def test_split_cuts_between_blocks_and_chains_to_the_same_result(n_stages):
    n_blocks = 4
    b = GraphBuilder()
    x = b.input("x", 4, 16)
    h = x
    for i in range(n_blocks):
        h = mlp_block(b, h, f"layers.{i}")
    program = b.program(h)
    values = _weights(program, seed=3)
    xin = torch.randn(4, 16)
    (want,) = run_unsharded(program, values, xin)

    result = propagate_placements(program, 2, styles={})
    partition(program, result, 2)
    plan = Plan(placements=dict(result.param_placements))  # what decide_placements commits
    shapes = {n: tuple(values[n].shape) for n in program.state_names}
    settings = CompileSettings(2, {}, True, "Stack", shapes, n_stages=n_stages)
    stages = split_stages(program, _Stack(n_blocks).to("meta"), settings, plan)
    assert len(stages) == n_stages
    per_stage = n_blocks // n_stages
    for i, stage in enumerate(stages):
        assert stage.blocks == [f"layers.{j}" for j in range(i * per_stage, (i + 1) * per_stage)]
        assert all(name.startswith(tuple(stage.blocks)) for name in stage.state_names)
    assert stages[-1].is_last and not any(s.is_last for s in stages[:-1])

    carried = [xin]
    for stage in stages:
        state = [
            scatter_to_ranks(values[n], result.param_placements.get(n, Replicate()), 2, 1, None)
            for n in stage.state_names
        ]
        carried = simulate_graph(stage.gm, 2, state + list(carried))
        assert len(carried) == 1 or stage.is_last  # one activation crosses each cut
    torch.testing.assert_close(carried[0][0], want, atol=1e-5, rtol=1e-5)


class _HandWrittenNorm(torch.nn.Module):
    """A LayerNorm written with var over a column's whole width, then a row projection."""

    def __init__(self, width=16, hidden=32, op="var"):
        super().__init__()
        self.up, self.down = torch.nn.Linear(width, hidden), torch.nn.Linear(hidden, width)
        self.op = op

    def forward(self, x):
        h = self.up(x)
        if self.op == "var":
            var = h.var(-1, keepdim=True, unbiased=False)
            mean = h.mean(-1, keepdim=True)
        elif self.op == "std":
            var = h.std(-1, keepdim=True) ** 2
            mean = h.mean(-1, keepdim=True)
        else:
            var, mean = torch.var_mean(h, -1, keepdim=True, correction=1)
        return x + self.down((h - mean) / torch.sqrt(var + 1e-5))


@pytest.mark.parametrize("op", ["var", "std", "var_mean"])
def test_a_variance_over_a_sharded_width_reduces_locally(op):
    from nxd_autoshard import autoshard

    torch.manual_seed(0)
    model, x = _HandWrittenNorm(op=op), torch.randn(4, 3, 16)
    want = model(x).square().mean()
    want.backward()
    # the plan asks for the split (auto weighs the statistics' all-reduces against keeping the
    # small projection whole, and may keep it whole)
    plan = {"up": "column", "down": "row"}
    sharded = autoshard(model, tp=2, example_inputs=(x,), plan=plan, auto=False)
    got = sharded(x).square().mean()
    got.backward()
    torch.testing.assert_close(got, want)
    grads = sharded.gather_grads()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name, atol=1e-5, rtol=1e-4)
    assert sharded.plan.placements["up.weight"] == Shard(0)
    # the statistics are all-reduced (small), the activation never gathered
    assert "all_gather" not in collectives(sharded.graph_module)


def test_a_size_read_needs_no_collective_unless_it_is_the_shard_dim():
    b = GraphBuilder()
    x = b.input("x", 4, 16)
    w = b.param("up.weight", 32, 16)
    v = b.param("down.weight", 16, 32)
    h = b.op(aten.linear.default, x, w, module="up")
    rows = b.op(aten.sym_size.int, h, 0, module="up")  # not the shard dim: read locally
    flat = b.op(aten.view.default, h, [rows, -1], module="up")
    out = b.op(aten.linear.default, flat, v, module="down")  # a partial sum
    size = b.op(aten.sym_size.int, out, 1, module="down")  # of a partial: its full shape
    program = b.program(out, size)
    values = _weights(program, seed=4)
    xin = torch.randn(4, 16)
    want, want_size = run_unsharded(program, values, xin)
    result = propagate_placements(program, 2, styles={})
    assert not result.fallbacks
    partition(program, result, 2)
    assert collectives(program.gm) == ["grad_all_reduce", "all_reduce"]
    outs, sizes = run_ranks_of(program, result, values, xin, 2)
    torch.testing.assert_close(outs[0], want, atol=1e-5, rtol=1e-5)
    assert sizes == want_size or list(sizes) == [want_size] * 2
