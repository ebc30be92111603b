"""Buffers written in forward (BatchNorm running stats, counters, a per-expert histogram): after
every call the sharded module's buffers hold what the unsharded model's hold, over tp (simulator
and gloo) and pp, in train_step, forward and eval, and in state_dict and checkpoints."""

import copy

import pytest
import torch
from safetensors.torch import load_file

from nxd_autoshard import CaptureError, PlanError, autoshard
from nxd_autoshard.ir import ops as C
from nxd_autoshard.tools.launch import run_ranks

EXPERTS = 4


class StatsNet(torch.nn.Module):
    """Linear -> BatchNorm1d -> ReLU -> Linear, counting samples, an EMA of the hidden features
    (sharded over tp where they are) and a histogram of each sample's top output (index_add_)."""

    def __init__(self, width: int = 8, hidden: int = 16):
        super().__init__()
        self.up = torch.nn.Linear(width, hidden)
        self.bn = torch.nn.BatchNorm1d(hidden)
        self.down = torch.nn.Linear(hidden, EXPERTS)
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("ema", torch.zeros(hidden))
        self.register_buffer("hist", torch.zeros(EXPERTS))

    def forward(self, x):
        self.seen += x.shape[0]
        h = self.up(x)
        self.ema.mul_(0.9).add_(0.1 * h.detach().mean(0))
        out = self.down(torch.relu(self.bn(h)))
        top = out.argmax(-1)
        self.hist.index_add_(0, top, torch.ones_like(top, dtype=torch.float))
        return out


class Block(torch.nn.Module):
    """A residual block with its own BatchNorm and a histogram filled with scatter_add_."""

    def __init__(self, width: int = 8, hidden: int = 16):
        super().__init__()
        self.up = torch.nn.Linear(width, hidden)
        self.bn = torch.nn.BatchNorm1d(hidden)
        self.down = torch.nn.Linear(hidden, width)
        self.register_buffer("routed", torch.zeros(EXPERTS))

    def forward(self, x):
        y = self.down(torch.relu(self.bn(self.up(x))))
        top = y[:, :EXPERTS].argmax(-1)
        self.routed.scatter_add_(0, top, torch.ones_like(top, dtype=torch.float))
        return x + y


class Stack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([Block(), Block()])
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        for layer in self.layers:
            x = layer(x)
        return x


def mse(output, target):
    return ((output - target) ** 2).mean()


def _batches(steps: int, width: int = 8, out: int = EXPERTS):
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randn(6, width, generator=gen), torch.randn(6, out, generator=gen))
        for _ in range(steps)
    ]


def _close(got, want, what):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=what)


def _buffers(module) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in module.named_buffers()}


def _reference(model, batches):
    """The unsharded model's loss, gradients and buffers after each SGD step."""
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    steps = []
    for x, y in batches:
        loss = mse(ref(x), y)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
        opt.step()
        opt.zero_grad()
        steps.append((loss.detach(), grads, _buffers(ref)))
    return ref, steps


def _train(sharded, batches):
    opt = sharded.optimizer(torch.optim.SGD, lr=0.1)
    steps = []
    for x, y in batches:
        loss = sharded.train_step(x, target=y)
        grads = sharded.gather_grads()
        opt.step()
        opt.zero_grad()
        steps.append((loss, grads, _buffers(sharded)))
    return steps


def _assert_steps(got, want, grads_of=None):
    for step, ((loss, grads, bufs), (want_loss, want_grads, want_bufs)) in enumerate(
        zip(got, want)
    ):
        _close(loss, want_loss, f"loss, step {step}")
        for name in grads_of or want_grads:
            _close(grads[name], want_grads[name], f"grad {name}, step {step}")
        for name, buf in bufs.items():
            _close(buf, want_bufs[name], f"buffer {name}, step {step}")


def test_batchnorm_counter_and_histogram_tp2_simulator(tmp_path):
    torch.manual_seed(0)
    model = StatsNet().train()
    batches = _batches(3)
    ref, want = _reference(model, batches)
    sharded = autoshard(copy.deepcopy(model), 2, plan={"up": "column", "down": "row"}, loss_fn=mse)
    _assert_steps(_train(sharded, batches), want)
    assert int(sharded.get_buffer("seen")) == 18
    assert int(sharded.get_buffer("bn.num_batches_tracked")) == 3
    # BatchNorm runs on its channel shard: its new running stats and the EMA are per-rank pieces
    # of the replicated buffers, gathered where they are stored
    gm = sharded.programs()[0].gm
    news = gm.graph.output_node().args[0][: len(sharded.programs()[0].mutated)]
    stored = dict(zip(sharded.programs()[0].mutated, news))
    for name in ("bn.running_mean", "bn.running_var", "ema"):
        assert stored[name].target is C.all_gather, (name, stored[name].target)
    assert not [n for n in gm.graph.nodes if n.target is C.all_gather and n not in news]
    # eval reads the updated running stats; checkpoints carry them
    x = batches[0][0]
    _close(sharded.eval()(x), ref.eval()(x), "eval output")
    state = sharded.state_dict()
    for name, buf in ref.named_buffers():
        _close(state[name], buf, f"state_dict {name}")
    sharded.save_checkpoint(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    _close(saved["bn.running_var"], ref.bn.running_var, "saved running_var")
    _close(saved["hist"], ref.hist, "saved hist")


def test_forward_writes_buffers_as_the_model_does():
    """A plain forward (no train_step) writes them too, once per call."""
    torch.manual_seed(0)
    model = StatsNet().train()
    ref = copy.deepcopy(model)
    sharded = autoshard(model, 2, plan={"up": "column", "down": "row"})
    for x, _ in _batches(2):
        _close(sharded(x), ref(x), "output")
    for name, buf in ref.named_buffers():
        _close(sharded.get_buffer(name), buf, name)


def _stack_model():
    torch.manual_seed(1)
    return Stack().train()


def test_batchnorm_counter_and_histogram_tp2_gloo():
    torch.manual_seed(0)
    model = StatsNet().train()
    batches = _batches(3)
    _, want = _reference(model, batches)
    for out in run_ranks(_tp_on_rank, 2, args=(model, batches), timeout_s=300):
        _assert_steps(out["steps"], want)
        assert out["replicated"]


def _tp_on_rank(rank: int, world: int, model, batches) -> dict:
    sharded = autoshard(
        copy.deepcopy(model),
        2,
        plan={"up": "column", "down": "row"},
        loss_fn=mse,
        example_inputs=(batches[0][0],),  # a rank's parameters are its shards: planned now
    )
    steps = _train(sharded, batches)
    # the rank holds half of up's rows, and the whole buffers
    replicated = tuple(sharded.get_parameter("up.weight").shape) == (8, 8) and tuple(
        sharded.get_buffer("bn.running_mean").shape
    ) == (16,)
    return {"steps": steps, "replicated": replicated}


class LastSum(torch.nn.Module):
    """A buffer overwritten with a statistic of a row-parallel output (a partial sum per rank)."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(8, 16)
        self.down = torch.nn.Linear(16, 4, bias=False)
        self.register_buffer("last", torch.zeros(4))

    def forward(self, x):
        y = self.down(torch.relu(self.up(x)))
        self.last.copy_(y.detach().sum(0))
        return y


def test_partial_new_value_is_all_reduced_where_stored():
    torch.manual_seed(0)
    model = LastSum()
    ref = copy.deepcopy(model)
    x = torch.randn(6, 8)
    sharded = autoshard(model, 2, plan={"up": "column", "down": "row"})
    _close(sharded(x), ref(x), "output")
    _close(sharded.get_buffer("last"), ref.last, "last")
    program = sharded.programs()[0]
    (new,) = program.gm.graph.output_node().args[0][: len(program.mutated)]
    assert new.target is C.all_reduce


class FunctionalNorm(torch.nn.Module):
    """F.batch_norm over registered buffers, and no other in-place op: aten.batch_norm's schema
    does not say it writes them, capture must see it anyway."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(8, 16)
        self.register_buffer("mean", torch.zeros(16))
        self.register_buffer("var", torch.ones(16))

    def forward(self, x):
        h = self.up(x)
        return torch.nn.functional.batch_norm(h, self.mean, self.var, training=True, momentum=0.5)


def test_functional_batch_norm_writes_its_running_stats():
    torch.manual_seed(0)
    model = FunctionalNorm()
    ref = copy.deepcopy(model)
    x = torch.randn(6, 8)
    sharded = autoshard(model, 2, plan={"up": "column"})
    _close(sharded(x), ref(x), "output")
    assert sharded.programs()[0].mutated == ["mean", "var"]
    _close(sharded.get_buffer("mean"), ref.mean, "mean")
    _close(sharded.get_buffer("var"), ref.var, "var")


def _dp_on_rank(rank: int, world: int, model, x, y) -> dict:
    mine = slice(3 * rank, 3 * rank + 3)  # this replica's half of the batch
    sharded = autoshard(copy.deepcopy(model), 1, dp=2, loss_fn=mse, example_inputs=(x[mine],))
    loss = sharded.train_step(x[mine], target=y[mine])
    return {"loss": loss, "buffers": _buffers(sharded)}


def test_data_parallel_replicas_keep_their_own_running_stats_gloo():
    """As torch DDP without SyncBatchNorm: each replica's statistics are of its own batch (and
    its counters count its own samples); the loss is the replicas' mean."""
    torch.manual_seed(0)
    model = StatsNet().train()
    (x, y), *_ = _batches(1)
    outs = run_ranks(_dp_on_rank, 2, args=(model, x, y), timeout_s=300)
    losses = []
    for rank, out in enumerate(outs):
        ref = copy.deepcopy(model)
        losses.append(mse(ref(x[3 * rank : 3 * rank + 3]), y[3 * rank : 3 * rank + 3]))
        for name, buf in ref.named_buffers():
            _close(out["buffers"][name], buf, f"rank {rank} {name}")
    for out in outs:
        _close(out["loss"], torch.stack(losses).mean().detach(), "dp loss")


def test_xla_hand_off_refuses_buffer_writes_by_name():
    from nxd_autoshard.tools import neuron

    x = torch.randn(6, 8)
    sharded = autoshard(StatsNet().train(), 2, plan={"up": "column", "down": "row"})
    with pytest.raises(ValueError, match="buffers written in forward yet .*seen"):
        neuron.stage_specs(sharded, (x,), {})


def _stack_batches(steps: int):
    return _batches(steps, width=8, out=8)


def test_buffers_written_in_pipeline_stages_simulator():
    model = _stack_model()
    batches = _stack_batches(2)
    _, want = _reference(model, batches)
    sharded = autoshard(
        copy.deepcopy(model), 2, pp=2, microbatches=1, schedule="gpipe", loss_fn=mse
    )
    _assert_steps(_train(sharded, batches), want)
    stages = sharded.stages()
    # `calls += 1` reads only its own state: it runs where its value is first needed, at the end
    assert set(stages[0].mutated) == {
        "layers.0.bn.running_mean", "layers.0.bn.running_var",
        "layers.0.bn.num_batches_tracked", "layers.0.routed",
    }  # fmt: skip
    assert set(stages[1].mutated) == {
        "calls", "layers.1.bn.running_mean", "layers.1.bn.running_var",
        "layers.1.bn.num_batches_tracked", "layers.1.routed",
    }  # fmt: skip


def test_microbatches_write_buffers_one_after_another():
    """Each microbatch's forward writes the counters before the next reads them (as on a mesh):
    counts equal the unsharded model's; BatchNorm's running stats are those of the microbatches."""
    model = _stack_model()
    (x, y), *_ = _stack_batches(1)
    ref = copy.deepcopy(model)
    ref(x[:3])
    ref(x[3:])
    sharded = autoshard(copy.deepcopy(model), 1, pp=2, microbatches=2, loss_fn=mse)
    sharded.train_step(x, target=y)
    for name, buf in ref.named_buffers():
        if name == "calls":
            continue  # a call per microbatch in the reference, one step here
        _close(sharded.get_buffer(name), buf, name)
    assert int(sharded.get_buffer("calls")) == 2  # the forward ran once per microbatch


def _pp_on_rank(rank: int, world: int, model, batches, directory) -> dict:
    sharded = autoshard(
        copy.deepcopy(model),
        1,
        pp=2,
        microbatches=1,
        schedule="gpipe",
        loss_fn=mse,
        example_inputs=(batches[0][0],),
    )
    steps = _train(sharded, batches)
    sharded.save_checkpoint(directory)  # each stage's writer writes the buffers it holds
    return {"steps": steps, "held": sorted(n for n, _ in sharded.named_buffers())}


def test_buffers_written_in_pipeline_stages_gloo(tmp_path):
    model = _stack_model()
    batches = _stack_batches(2)
    ref, want = _reference(model, batches)
    outs = run_ranks(_pp_on_rank, 2, args=(model, batches, tmp_path), timeout_s=300)
    for rank, out in enumerate(outs):
        mine = [n for n in want[0][1] if n.startswith(f"layers.{rank}.")]
        held = [n for n in want[0][2] if n.startswith(f"layers.{rank}.")]
        assert out["held"] == sorted(held + (["calls"] if rank == 1 else []))
        _assert_steps(out["steps"], want, grads_of=mine)
    saved = {}
    for part in sorted(tmp_path.glob("model-*.safetensors")):
        saved.update(load_file(str(part)))
    for name, buf in ref.named_buffers():
        _close(saved[name], buf, f"saved {name}")


class Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x)


class SharedScale(torch.nn.Module):
    """A buffer read by every block and written after the last one."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([Scaled(), Scaled()])
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x) * self.scale
        self.scale.mul_(0.5)
        return x


def test_buffer_read_by_two_stages_is_refused():
    x = torch.randn(4, 8)
    with pytest.raises(PlanError, match="buffer 'scale' is written by pipeline stage"):
        autoshard(
            SharedScale(),
            1,
            pp=2,
            microbatches=1,
            schedule="gpipe",
            example_inputs=(x,),
            loss_fn=mse,
        )


class WritesInput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        x.mul_(2)
        return self.proj(x)


def test_a_write_into_an_input_is_refused_by_name():
    with pytest.raises(CaptureError, match="writes into its input 'x' in place"):
        autoshard(WritesInput(), 2, example_inputs=(torch.randn(4, 8),))
