"""No silent degradation: a block's matmul left replicated is warned about (or refused with
strict=True) and shown by explain(); a tp that splits nothing raises DivisibilityError."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import CONFIGS
from sharded_cache import sharded_family

from nxd_autoshard import DivisibilityError, PlanError, autoshard
from nxd_autoshard.tools.hf import build_model, random_batch


class _Block(torch.nn.Module):
    """up -> cummax -> down, and (mlp=True) a plain MLP after it, which always splits."""

    def __init__(self, width: int, mlp: bool):
        super().__init__()
        self.up = torch.nn.Linear(width, 4 * width, bias=False)
        self.down = torch.nn.Linear(4 * width, width, bias=False)
        self.mlp = (
            torch.nn.Sequential(
                torch.nn.Linear(width, 4 * width),
                torch.nn.ReLU(),
                torch.nn.Linear(4 * width, width),
            )
            if mlp
            else None
        )

    def forward(self, x):
        h = torch.cummax(self.up(x), dim=-1).values  # no sharding rule for cummax
        x = x + self.down(torch.relu(h))
        return x + self.mlp(x) if self.mlp is not None else x


class _Stack(torch.nn.Module):
    def __init__(self, width: int = 16, mlp: bool = False):
        super().__init__()
        self.layers = torch.nn.ModuleList([_Block(width, mlp), _Block(width, mlp)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _warnings_of(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if "nxd-autoshard" in str(w.message)]


def test_a_replicated_block_matmul_is_warned_about_with_its_cause():
    # width 6 at tp 4: up's column split is undone by cummax and its 6 inputs do not split by rows
    torch.manual_seed(0)
    model, x = _Stack(width=6, mlp=True), torch.randn(2, 4, 6)
    messages = _warnings_of(lambda: autoshard(model, 4, example_inputs=(x,)))
    lines = [m for m in messages if "stay replicated" in m]
    assert lines, messages
    # once for both identical layers, naming the module, the node and the op that forced it
    assert len([m for m in lines if "'layers.*.up'" in m]) == 1
    assert any("cummax" in m and "node '" in m for m in lines), lines


def test_an_undone_column_split_splits_by_rows_the_same_in_identical_blocks():
    """cummax needs up's whole output: its column split is undone, in both identical layers
    (not only the first, whose input happens to be replicated), and up splits by rows instead."""
    torch.manual_seed(0)
    model, x = _Stack(), torch.randn(2, 4, 16)
    box = []
    messages = _warnings_of(lambda: box.append(autoshard(model, 2, example_inputs=(x,))))
    placements = {p.name: str(p.placement) for p in box[0].explain().parameters}
    assert placements["layers.0.up.weight"] == placements["layers.1.up.weight"] == "S(1)"
    assert placements["layers.0.down.weight"] == placements["layers.1.down.weight"]
    assert not [m for m in messages if "stay replicated" in m], messages
    torch.testing.assert_close(box[0](x), model(x))


def test_strict_refuses_a_replicated_block_matmul():
    torch.manual_seed(0)
    with pytest.raises(PlanError, match=r"strict=True.*\n.*'layers\.\*\.up'"):
        autoshard(_Stack(6, mlp=True), 4, example_inputs=(torch.randn(2, 4, 6),), strict=True)


def test_the_degraded_plan_is_still_equal_and_shown_as_partly_sharded():
    torch.manual_seed(0)
    model, x = _Stack(width=6, mlp=True), torch.randn(2, 4, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sharded = autoshard(model, 4, example_inputs=(x,))
    torch.testing.assert_close(sharded(x), model(x))
    text = sharded.explain(format="text")
    assert "PARTLY SHARDED" in text or "NOT SHARDED" in text


def test_a_tp_that_splits_no_head_count_raises_with_the_tp_values_that_do():
    model = build_model(CONFIGS / "llama.json")  # 4 heads, 2 KV heads, hidden 64
    args, kwargs = random_batch(model)
    with pytest.raises(DivisibilityError, match=r"tp=3.*tp values that split them: 2, 4\."):
        autoshard(model, 3, example_inputs=args, example_kwargs=kwargs)


def test_kv_heads_below_tp_are_replicated_as_nxd_does_and_shown():
    model, _, args, kwargs = sharded_family("llama", 2)  # 2 KV heads
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the optimum under GQA: no warning
        sharded = autoshard(model, 4, example_inputs=args, example_kwargs=kwargs)
    assert "PARTLY SHARDED: 2 of 7 matmuls replicated" in sharded.explain(format="text")


def test_the_families_in_the_suite_shard_without_a_degradation_warning():
    model, _, args, kwargs = sharded_family("llama", 2)
    messages = _warnings_of(lambda: autoshard(model, 2, example_inputs=args, example_kwargs=kwargs))
    assert not [m for m in messages if "stay replicated" in m]


def test_an_undone_split_outside_any_block_is_warned_about_too():
    torch.manual_seed(0)
    model = _Block(6, mlp=True)  # a lone layer (no repeated blocks); 6 inputs: no row split at tp 4
    x = torch.randn(2, 4, 6)
    messages = _warnings_of(lambda: autoshard(model, 4, example_inputs=(x,)))
    assert any("'up' (1 matmul(s)) stay replicated" in m and "cummax" in m for m in messages), (
        messages
    )


class _Stacked(torch.nn.Module):
    def __init__(self, experts: int, out: int, inp: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(experts, out, inp) * 0.1)


class _ExpertLoop(torch.nn.Module):
    """Experts stacked in [experts, out, in] parameters, each read as `weight[i]` in a loop
    (JetMoE's ParallelExperts), weighted by a router."""

    def __init__(self, width: int = 16, experts: int = 4):
        super().__init__()
        self.router = torch.nn.Linear(width, experts, bias=False)
        self.w_in = _Stacked(experts, 4 * width, width)
        self.w_out = _Stacked(experts, width, 4 * width)

    def forward(self, x):
        gate = torch.softmax(self.router(x), dim=-1)
        out = torch.zeros_like(x)
        for i in range(self.w_in.weight.shape[0]):
            h = torch.relu(torch.nn.functional.linear(x, self.w_in.weight[i]))
            out = out + gate[..., i : i + 1] * torch.nn.functional.linear(h, self.w_out.weight[i])
        return x + out


class _ExpertStack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([_ExpertLoop(), _ExpertLoop()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_experts_read_one_at_a_time_are_warned_about_not_refused():
    """Every big matmul of the blocks reads its weight through a select: nothing splits them,
    which is a warning naming that, not a DivisibilityError advising the tp that was asked."""
    torch.manual_seed(0)
    model, x = _ExpertStack(), torch.randn(2, 4, 16)
    box = []
    messages = _warnings_of(lambda: box.append(autoshard(model, 2, example_inputs=(x,))))
    lines = [m for m in messages if "read one expert at a time" in m]
    assert any("'layers.*.w_in'" in m for m in lines), messages
    assert any("'layers.*.w_out'" in m for m in lines), messages
    torch.testing.assert_close(box[0](x), model(x))
    assert "SHARDED" in box[0].explain(format="text")


def test_a_first_block_fed_by_a_split_projection_has_its_twins_plan_and_optimum():
    """ELECTRA projects its embeddings (32 -> 64) before the first layer: in the first round
    that projection's column split reaches layer 0, whose output projection then looks like a
    column. Its twins say rows are Megatron's style there: no 'split by rows' warning, and both
    layers have one optimum (2 + 2)."""
    config = dict(
        model_type="electra", vocab_size=128, embedding_size=32, hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, type_vocab_size=1, is_decoder=True,
    )  # fmt: skip
    model = build_model(config)
    args, kwargs = random_batch(model, batch=2, seq=8)
    box = []
    messages = _warnings_of(
        lambda: box.append(autoshard(model, 2, example_inputs=args, example_kwargs=kwargs))
    )
    assert not [m for m in messages if "split by rows" in m], messages
    blocks = box[0].explain().blocks
    assert [(b.optimum_forward, b.optimum_backward) for b in blocks] == [(2, 2), (2, 2)]
    assert all(b.forward == {"all_reduce": 2} and b.backward == {"all_reduce": 2} for b in blocks)


class _NothingSplits(torch.nn.Module):
    """linear -> glu -> linear -> cumsum -> linear: glu and cumsum undo the two column splits
    at tp 4, and the last linear's 2 outputs split only at tp 2."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(4, 4, bias=False)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(2, 4, bias=False)])
        self.out = torch.nn.Linear(4, 2, bias=False)

    def forward(self, x):
        h = self.layers[0](torch.nn.functional.glu(self.inp(x), -1))
        return self.out(h.cumsum(-1))


def test_trial_plans_at_other_tps_leave_the_kept_plan_alone():
    """Finding which tp would split a fully replicated model propagates trial plans at other tp
    values (here tp 2, where 'out' splits by columns); the kept all-replicated plan must be what
    partition reads, not the last trial's (an all_gather of 'out' at tp 4: 8 outputs, not 2)."""
    torch.manual_seed(0)
    model, x = _NothingSplits(), torch.randn(1, 2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sharded = autoshard(model, 4, example_inputs=(x,))
    torch.testing.assert_close(sharded(x), model(x))
    assert "all_gather" not in sharded.compiled.program(0).program.gm.code
