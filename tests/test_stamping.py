"""Stamped capture (a few blocks traced, the rest copied) gives the full capture's program,
golden text, stages and report; blocks that are not alike are traced, never stamped."""

import logging
import warnings

import pytest
import torch
from conftest import config_dict

from nxd_autoshard import autoshard
from nxd_autoshard.compiler.stamp import full_capture, stamped_lists
from nxd_autoshard.inspect.golden import golden_text
from nxd_autoshard.ir.printer import graph_text
from nxd_autoshard.tools.hf import build_model, random_batch
from nxd_autoshard.tools.verify import verify_config

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
CONFIGS = {
    "llama": config_dict("llama", num_hidden_layers=5),
    "gpt2": config_dict("gpt2", n_layer=4),
    "mixtral": dict(
        model_type="mixtral",
        num_local_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=4,
        **TINY,
    ),
    # Gemma-2: sliding and full attention alternate (`layer_types`): two classes of blocks
    "gemma2": dict(
        model_type="gemma2",
        head_dim=16,
        num_hidden_layers=6,
        sliding_window=8,
        attn_implementation="eager",
        **TINY,
    ),
    # DeepSeek-V3: the first 2 layers dense, the rest MoE
    "deepseek_v3": dict(
        model_type="deepseek_v3",
        num_hidden_layers=6,
        first_k_dense_replace=2,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        moe_intermediate_size=32,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        rope_scaling=None,
        **{**TINY, "num_key_value_heads": 4},
    ),
}


def _model(name: str) -> torch.nn.Module:
    config = dict(CONFIGS[name])
    attn = config.pop("attn_implementation", None)
    model = build_model(config)
    if attn:
        model.config._attn_implementation = attn
    return model


def _plans(model, caplog, **options):
    """(stamped, full) autoshard of one model and batch, and the stamping log lines."""
    args, kwargs = random_batch(model, batch=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with caplog.at_level(logging.DEBUG, logger="nxd_autoshard.stamp"):
            caplog.clear()
            stamped = autoshard(model, example_inputs=args, example_kwargs=kwargs, **options)
            said = [r.getMessage() for r in caplog.records if r.name == "nxd_autoshard.stamp"]
        with full_capture():
            full = autoshard(model, example_inputs=args, example_kwargs=kwargs, **options)
    return stamped, full, said


def _report(sharded) -> dict:
    data = sharded.explain().to_dict()
    for row in data["history"]:
        row.pop("seconds")  # wall time of each pass: the one figure that differs run to run
    return data


def _assert_same(stamped, full) -> None:
    """Program, node names, state, stages, plan, golden text, history texts and report equal."""
    a, b = stamped.programs()[0], full.programs()[0]
    assert [n.name for n in a.gm.graph.nodes] == [n.name for n in b.gm.graph.nodes]
    assert graph_text(a.gm) == graph_text(b.gm)
    assert a.state_names == b.state_names
    assert a.state_kinds == b.state_kinds
    assert a.gm.code == b.gm.code
    for sa, sb in zip(stamped.stages(), full.stages(), strict=True):
        assert graph_text(sa.gm) == graph_text(sb.gm)
        assert (sa.state_names, sa.inputs, sa.outputs, sa.blocks, sa.units) == (
            sb.state_names,
            sb.inputs,
            sb.outputs,
            sb.blocks,
            sb.units,
        )
    assert stamped.plan.placements == full.plan.placements
    assert stamped.plan.stage_of_unit == full.plan.stage_of_unit
    assert stamped.plan.block_costs == full.plan.block_costs
    assert golden_text(stamped) == golden_text(full)
    assert [r.text for r in stamped.history] == [r.text for r in full.history]
    assert _report(stamped) == _report(full)


@pytest.mark.parametrize(
    "name, tp, pp, traced",
    [
        ("llama", 2, 2, "2 of 5"),
        ("gpt2", 2, 1, "2 of 4"),
        ("mixtral", 2, 2, "2 of 4"),
        ("gemma2", 2, 2, "4 of 6"),
        ("deepseek_v3", 2, 2, "4 of 6"),
    ],
)
def test_stamped_plan_equals_full_plan(name, tp, pp, traced, caplog):
    stamped, full, said = _plans(_model(name), caplog, tp=tp, pp=pp)
    assert any(f"{traced} blocks traced" in line for line in said), said
    _assert_same(stamped, full)


def test_alternating_and_first_dense_layers_are_classes_of_their_own():
    (gemma,), _ = stamped_lists(_model("gemma2"))
    assert gemma.classes == [0, 1, 0, 1, 0, 1]  # sliding / full attention
    (deepseek,), _ = stamped_lists(_model("deepseek_v3"))
    assert deepseek.classes == [0, 0, 1, 1, 1, 1]  # dense MLP / MoE


def test_stamped_program_matches_the_unsharded_model():
    # loss and every gradient of a stamped 5-layer Llama at tp 2 (the simulator)
    checks = verify_config(CONFIGS["llama"], 2, world="sim")
    bad = [c.line() for c in checks if not c.ok]
    assert not bad, "\n".join(bad)
    assert sum(c.name.startswith("grad") for c in checks) >= 5 * 9


def test_a_different_layer_is_traced_not_stamped(caplog):
    # layer 2's MLP is wider: its own class, traced; the others are still stamped
    import copy

    model = _model("llama")
    config = copy.deepcopy(model.config)
    config.intermediate_size = 192
    torch.manual_seed(3)
    model.model.layers[2].mlp = type(model.model.layers[2].mlp)(config)
    (blist,), _ = stamped_lists(model)
    assert blist.classes == [0, 0, 1, 0, 0]
    stamped, full, said = _plans(model, caplog, tp=2)
    # traced: blocks 0-3 (block 3 is the one like the others that follows the wide one)
    assert any("4 of 5 blocks traced" in line for line in said), said
    _assert_same(stamped, full)


class _Block(torch.nn.Module):
    def __init__(self, index: int, use: str):
        super().__init__()
        self.layer_idx, self.use = index, use
        self.proj = torch.nn.Linear(16, 16, bias=False)

    def forward(self, x):
        y = self.proj(x)
        if self.use == "python" and self.layer_idx % 2:  # a branch on the layer's position
            y = -y
        if self.use == "tensor":  # the position read by torch itself, not by Python
            y = y * torch.full_like(y, self.layer_idx)
        return x + torch.relu(y)


class _Stack(torch.nn.Module):
    def __init__(self, use: str, layers: int = 5):
        super().__init__()
        self.layers = torch.nn.ModuleList(_Block(i, use) for i in range(layers))
        self.head = torch.nn.Linear(16, 4, bias=False)
        self.use, self.n = use, layers

    def forward(self, x):
        first = None
        for i in range(self.n) if self.use == "count" else range(len(self.layers)):
            x = self.layers[i](x)  # "count": the loop runs over a count kept beside the list
            if self.use == "first":  # every block after the first also reads the first's output
                first = x if first is None else first
                x = x + first if i else x
        return self.head(x).sum()


@pytest.mark.parametrize(
    "use, why",
    [
        ("python", "position attribute"),
        ("tensor", "depends on the layer's position"),
        ("count", "the prefix did not capture"),
        ("first", "reads block 0, not the last"),
    ],
)
def test_a_forward_that_reads_the_layer_index_is_traced(use, why, caplog):
    torch.manual_seed(0)
    model = _Stack(use)
    x = torch.randn(2, 3, 16)
    with caplog.at_level(logging.DEBUG, logger="nxd_autoshard.stamp"):
        stamped = autoshard(model, 2, example_inputs=(x,))
    said = [r.getMessage() for r in caplog.records if r.name == "nxd_autoshard.stamp"]
    assert any("full capture" in s and why in s for s in said), said
    with full_capture():
        full = autoshard(model, 2, example_inputs=(x,))
    _assert_same(stamped, full)
    assert torch.allclose(stamped(x), model(x), atol=1e-5)


def test_an_unused_layer_index_is_stamped(caplog):
    torch.manual_seed(0)
    model = _Stack("none")
    x = torch.randn(2, 3, 16)
    with caplog.at_level(logging.DEBUG, logger="nxd_autoshard.stamp"):
        stamped = autoshard(model, 2, example_inputs=(x,))
    said = [r.getMessage() for r in caplog.records if r.name == "nxd_autoshard.stamp"]
    assert any("2 of 5 blocks traced" in s for s in said), said
    with full_capture():
        full = autoshard(model, 2, example_inputs=(x,))
    _assert_same(stamped, full)
    assert torch.allclose(stamped(x), model(x), atol=1e-5)


def test_history_printed_when_read_equals_history_printed_after_each_pass(monkeypatch):
    # the history keeps what the printer needs and prints when asked; printing right after
    # each pass, as before, gives the same texts (passes change graphs in place after it)
    from nxd_autoshard.compiler import driver

    model = _model("llama")
    args, kwargs = random_batch(model, batch=4)

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sharded = autoshard(model, 2, pp=2, example_inputs=args, example_kwargs=kwargs)
        return [(r.name, r.ops_before, r.ops_after, r.text) for r in sharded.history]

    lazy = run()

    class Printed:
        def __init__(self, gms):
            self.text = (
                graph_text(gms[0])
                if len(gms) == 1
                else "\n".join(f"# stage {i}\n{graph_text(g)}" for i, g in enumerate(gms))
            )

        def printed(self):
            return self.text

    monkeypatch.setattr(driver, "_Snapshot", Printed)
    eager = run()
    assert [r[0] for r in lazy] == [r[0] for r in eager]
    assert lazy == eager
    assert len({r[3] for r in lazy}) > 3  # the passes did change the program


class _Counting(torch.nn.Module):
    """A block that writes buffers: BatchNorm's running stats and a routing histogram."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(16, 32)
        self.bn = torch.nn.BatchNorm1d(32)
        self.down = torch.nn.Linear(32, 16)
        self.register_buffer("routed", torch.zeros(4))

    def forward(self, x):
        y = self.down(torch.relu(self.bn(self.up(x))))
        top = y[:, :4].argmax(-1)
        self.routed.index_add_(0, top, torch.ones_like(top, dtype=torch.float))
        return x + y


class _CountingStack(torch.nn.Module):
    def __init__(self, layers: int = 5):
        super().__init__()
        self.layers = torch.nn.ModuleList(_Counting() for _ in range(layers))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.steps += 1
        for layer in self.layers:
            x = layer(x)
        return x.square().mean()


def test_blocks_that_write_buffers_are_stamped(caplog):
    """Each block's write is stamped with the block: one new value per block of the full list,
    in the full capture's order, and every buffer as the unsharded model leaves it."""
    import copy

    torch.manual_seed(0)
    model = _CountingStack().train()
    x = torch.randn(6, 16)
    with caplog.at_level(logging.DEBUG, logger="nxd_autoshard.stamp"):
        stamped = autoshard(copy.deepcopy(model), 2, example_inputs=(x,))
    said = [r.getMessage() for r in caplog.records if r.name == "nxd_autoshard.stamp"]
    assert any("2 of 5 blocks traced" in s for s in said), said
    with full_capture():
        full = autoshard(copy.deepcopy(model), 2, example_inputs=(x,))
    _assert_same(stamped, full)
    written = stamped.programs()[0].mutated
    assert written == full.programs()[0].mutated
    assert len(written) == 1 + 5 * 4  # steps; per block running mean, var, batch count, routed
    ref = copy.deepcopy(model)
    torch.testing.assert_close(stamped(x), ref(x))
    for name, buf in ref.named_buffers():
        torch.testing.assert_close(stamped.get_buffer(name), buf, msg=name)
