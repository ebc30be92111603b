"""torch.compile of every rank's stage programs: one graph each, collectives inside it.

Each gloo rank builds the same model twice, eager and compiled, and compares its own loss and
gradients (the eager road is checked against the unsharded model elsewhere). A recording
backend (aot_eager's pieces) counts the functional collectives in the forward and backward
graphs AOTAutograd hands to a backend, against the collectives the partitioned program calls.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from conftest import config_dict

from nxd_autoshard import autoshard
from nxd_autoshard.ir import ops
from nxd_autoshard.runtime.compiled import compile_options
from nxd_autoshard.tools.hf import build_model, random_batch
from nxd_autoshard.tools.launch import run_ranks


# ------------------------------------------------------------------ helpers run on each rank
def _recording_backend(graphs: dict):
    """aot_eager (its partitioner, no code generation) keeping the graphs it is given."""
    from torch._dynamo.backends.debugging import aot_eager
    from torch._functorch.aot_autograd import make_boxed_func

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs.setdefault(kind, []).append(gm)
            return make_boxed_func(gm.forward)

        return compiler

    def backend(gm, example_inputs):
        return aot_eager(
            gm, example_inputs, fw_compiler=keep("forward"), bw_compiler=keep("backward")
        )

    return backend


def _funcol_counts(gms) -> dict[str, int]:
    counts: dict[str, int] = {}
    for gm in gms:
        for node in gm.graph.nodes:
            name = str(node.target)
            if node.op == "call_function" and name.startswith("_c10d_functional."):
                op = name.split(".")[1]
                if op != "wait_tensor":
                    counts[op] = counts.get(op, 0) + 1
    return counts


def _program_collectives(gms) -> tuple[dict[str, int], dict[str, int]]:
    """The functional collectives (forward, backward) the partitioned programs' ops amount to."""
    n = {f: 0 for f in ops.PARALLEL_OPS}
    for gm in gms:
        for node in gm.graph.nodes:
            if node.target in n:
                n[node.target] += 1
    forward = {
        # vocab-parallel cross-entropy: max, sum of exp and target logit
        "all_reduce": n[ops.all_reduce] + 3 * n[ops.vocab_parallel_cross_entropy],
        "all_gather_into_tensor": n[ops.all_gather],
        "reduce_scatter_tensor": n[ops.reduce_scatter],
    }
    # all_reduce's backward is the identity and all_gather's the local chunk: no communication
    backward = {
        "all_reduce": n[ops.grad_all_reduce],
        "all_gather_into_tensor": n[ops.reduce_scatter] + n[ops.shard],
    }
    drop_zeros = lambda counts: {k: v for k, v in counts.items() if v}  # noqa: E731
    return drop_zeros(forward), drop_zeros(backward)


def _local_grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _assert_same(got_loss, got_grads, want_loss, want_grads, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(got_loss, want_loss, rtol=rtol, atol=atol)
    assert set(got_grads) == set(want_grads)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=rtol, atol=atol, msg=name)


def _llama(layers: int):
    return build_model(config_dict("llama", num_hidden_layers=layers))


# ------------------------------------------------------------------ tp 2: both compile roads
def _tp2_rank(rank, world):
    from torch._dynamo.utils import counters

    model = _llama(2)
    args, kwargs = random_batch(model)
    eager = autoshard(copy.deepcopy(model), 2, example_inputs=args, example_kwargs=kwargs)
    loss = eager(*args, **kwargs).loss
    loss.backward()
    want = loss.detach(), _local_grads(eager)

    out = {}
    torch._dynamo.reset()
    counters.clear()
    graphs: dict = {}
    compiled = autoshard(
        copy.deepcopy(model),
        2,
        example_inputs=args,
        example_kwargs=kwargs,
        compile={"backend": _recording_backend(graphs)},
    )
    for _ in range(2):  # the second step must reuse the graph, not recompile
        compiled.zero_grad(set_to_none=True)
        loss = compiled(*args, **kwargs).loss
        loss.backward()
    _assert_same(loss.detach(), _local_grads(compiled), *want)
    out["graph_breaks"] = sum(counters["graph_break"].values())
    out["unique_graphs"] = counters["stats"]["unique_graphs"]
    out["graphs"] = {k: len(v) for k, v in graphs.items()}
    out["forward_collectives"] = _funcol_counts(graphs["forward"])
    out["backward_collectives"] = _funcol_counts(graphs["backward"])
    out["program_collectives"] = _program_collectives([compiled.graph_module])
    out["ops"] = [
        str(n.target) for g in graphs["forward"] + graphs["backward"] for n in g.graph.nodes
    ]

    # the user's own torch.compile of the whole module (pp = 1), over the eager module
    torch._dynamo.reset()
    counters.clear()
    eager.zero_grad(set_to_none=True)
    whole = torch.compile(eager, backend="aot_eager", fullgraph=True)
    loss = whole(*args, **kwargs).loss
    loss.backward()
    _assert_same(loss.detach(), _local_grads(eager), *want)
    out["whole_graph_breaks"] = sum(counters["graph_break"].values())
    out["whole_unique_graphs"] = counters["stats"]["unique_graphs"]
    # a token id outside the vocabulary still raises inside the compiled module
    bad = args[0].clone()
    bad[0, 0] = model.config.vocab_size
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        whole(bad, **kwargs)
    return out


def test_tp2_compiled_equals_eager_with_every_collective_in_one_graph():
    ranks = run_ranks(_tp2_rank, 2, timeout_s=300)
    assert ranks[0]["ops"] == ranks[1]["ops"]  # no rank branches: one program for the tp ranks
    for out in ranks:
        assert out["graph_breaks"] == 0 and out["whole_graph_breaks"] == 0
        assert out["unique_graphs"] == 1 and out["whole_unique_graphs"] == 1
        assert out["graphs"] == {"forward": 1, "backward": 1}
        forward, backward = out["program_collectives"]
        assert forward["all_reduce"] > 0 and backward["all_reduce"] > 0
        # every collective of the program reaches the backend, forward and backward, and no other
        assert out["forward_collectives"] == forward
        assert out["backward_collectives"] == backward


# ------------------------------------------------------------------ each collective alone
def _chain(x):
    """Every op of ir.ops once, on dims other than 0 where they take one (rank-distinct x)."""
    y = ops.grad_all_reduce(x, "tp")
    y = ops.shard(y, 1, "tp")  # [4, 6] -> [4, 3]
    y = ops.all_gather(y * 2.0, 1, "tp")
    y = ops.reduce_scatter(y.sin(), 0, "tp")
    # the sharded reductions, y taken as sharded on dim 1 (ties: rounded to a tenth)
    z = y.mul(10).round().div(10)
    top = ops.amax_all_reduce(z, (1,), True, "max", None, "tp")
    low, index = ops.max_dim_all_reduce(z, 1, False, "min", (1, 5), "tp")  # 5 of 6 columns
    first = ops.argmax_all_reduce(z, 1, False, "max", None, "tp")
    lse = ops.logsumexp_all_reduce(y, (0, 1), False, None, "tp")
    picked = (index + first).to(y.dtype)
    return ops.all_reduce(y.exp(), "tp").sum() + top.sum() + low.sum() + lse + picked.sum()


def _collectives_rank(rank, world):
    from torch._dynamo.utils import counters

    from nxd_autoshard.runtime.collectives import axis_groups

    x = torch.arange(24.0).reshape(4, 6).div(10).add(rank)
    results = []
    for run in (_chain, torch.compile(_chain, backend="aot_eager", fullgraph=True)):
        leaf = x.clone().requires_grad_()
        with axis_groups({"tp": torch.distributed.group.WORLD}):
            loss = run(leaf)
            loss.backward()
        results.append((loss.detach(), leaf.grad))
    (want, want_grad), (got, got_grad) = results
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)
    return sum(counters["graph_break"].values())


def test_every_collective_compiled_equals_eager():
    assert run_ranks(_collectives_rank, 2, timeout_s=300) == [0, 0]


# ------------------------------------------------------------------ pipeline and dp meshes
def _mesh_rank(rank, world, tp, pp, dp, backend):
    from torch._dynamo.utils import counters

    from nxd_autoshard.ir.mesh import Mesh
    from nxd_autoshard.runtime.pipeline import chunk_batch
    from nxd_autoshard.tools.verify import loss_of

    model = _llama(pp)  # a layer per stage
    args, kwargs = random_batch(model, batch=4)
    where = Mesh(dp, pp, tp).coords(rank)
    args, kwargs = chunk_batch(args, kwargs, dp)[where["dp"]]
    micro = 2 if pp > 1 else 1
    step_args, step_kwargs = chunk_batch(args, kwargs, micro)[0]

    def build(compile):
        return autoshard(
            copy.deepcopy(model),
            tp,
            pp=pp,
            dp=dp,
            microbatches=micro,
            schedule="gpipe" if pp > 1 else "1f1b",
            example_inputs=step_args,
            example_kwargs=step_kwargs,
            loss_fn=lambda output, target: loss_of(output),
            compile=compile,
        )

    eager = build(None)
    want = eager.train_step(*args, **kwargs), _local_grads(eager)
    torch._dynamo.reset()
    counters.clear()
    compiled = build(backend)
    for _ in range(2):
        compiled.zero_grad(set_to_none=True)
        got = compiled.train_step(*args, **kwargs)
    _assert_same(got, _local_grads(compiled), *want)
    return {
        "graph_breaks": sum(counters["graph_break"].values()),
        "unique_graphs": counters["stats"]["unique_graphs"],
        "stages": len(eager.runtime.local_stages(eager)),
    }


@pytest.mark.parametrize("tp,pp,dp", [(2, 2, 1), (2, 1, 2)], ids=["tp2xpp2", "dp2xtp2"])
def test_mesh_compiled_equals_eager(tp, pp, dp):
    for out in run_ranks(_mesh_rank, tp * pp * dp, args=(tp, pp, dp, "aot_eager"), timeout_s=400):
        assert out["graph_breaks"] == 0
        assert out["unique_graphs"] == out["stages"] == 1, out  # one graph per local stage


# ------------------------------------------------------------------ inductor on CPU
class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(16, 32)
        self.down = torch.nn.Linear(32, 16)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def _inductor_rank(rank, world):
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model, x, y = _MLP(), torch.randn(4, 16), torch.randn(4, 16)

    def mse(output, target):
        return ((output - target) ** 2).mean()

    def run(compile):
        sharded = autoshard(
            copy.deepcopy(model), 2, example_inputs=(x,), loss_fn=mse, compile=compile
        )
        return sharded.train_step(x, target=y), _local_grads(sharded)

    want = run(None)
    torch._dynamo.reset()
    counters.clear()
    got = run("inductor")
    _assert_same(*got, *want, rtol=1e-4, atol=1e-5)  # inductor fuses: not bit-equal
    return sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]


def test_inductor_cpu_compiled_equals_eager():
    assert run_ranks(_inductor_rank, 2, timeout_s=400) == [(0, 1), (0, 1)]


# ------------------------------------------------------------------ options and errors
def test_compile_options():
    assert compile_options(None) is None and compile_options(False) is None
    assert compile_options(True).options == {
        "backend": "inductor",
        "fullgraph": True,
        "dynamic": False,
    }
    assert compile_options({"backend": "aot_eager", "mode": None}).options["mode"] is None
    with pytest.raises(TypeError, match="not torch.compile options"):
        compile_options({"backend": "aot_eager", "full_graph": True})
    with pytest.raises(ValueError, match="unknown torch.compile backend 'nope'"):
        compile_options("nope")
    with pytest.raises(TypeError, match="compile must be"):
        compile_options(3)


def _neuron_importable() -> bool:
    try:  # PyPI's placeholder is found but raises on import: that is "missing" too
        return importlib.import_module("torch_neuronx") is not None
    except ImportError:
        return False


@pytest.mark.skipif(_neuron_importable(), reason="torch-neuronx is installed")
def test_neuron_backend_names_the_missing_package():
    model = _MLP()
    with pytest.raises(ImportError) as err:
        autoshard(model, 2, example_inputs=(torch.randn(4, 16),), compile="neuron")
    message = str(err.value)
    assert "torch-neuronx" in message and "AWS Neuron pip repository" in message
    assert "compile='inductor'" in message


def test_compile_without_a_process_group_is_refused():
    with pytest.raises(ValueError, match="compile= compiles each rank's program"):
        autoshard(_MLP(), 2, example_inputs=(torch.randn(4, 16),), compile="aot_eager")
