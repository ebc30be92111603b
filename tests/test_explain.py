"""explain(): the report's numbers are the program's (counted nodes, traced collectives)."""

import json
from collections import Counter

import pytest
from conftest import FAMILIES
from sharded_cache import sharded_family

from nxd_autoshard import autoshard
from nxd_autoshard.ir import ops as C
from nxd_autoshard.runtime.simulator import trace_collectives
from nxd_autoshard.tools.hf import build_model, random_batch

COMMUNICATING = {
    C.all_reduce: "all_reduce",
    C.all_gather: "all_gather",
    C.reduce_scatter: "reduce_scatter",
    C.shard: "shard",
    C.grad_all_reduce: "grad_all_reduce",
    C.vocab_parallel_cross_entropy: "vocab_parallel_cross_entropy",
}


def _graph_collectives(sharded) -> Counter:
    return Counter(
        COMMUNICATING[n.target]
        for n in sharded.graph_module.graph.nodes
        if n.op == "call_function" and n.target in COMMUNICATING
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_reported_collectives_are_the_graphs_and_the_traced_ones(family):
    model, sharded, args, kwargs = sharded_family(family, 2)
    report = sharded.explain()
    assert Counter(c.op for c in report.collectives) == _graph_collectives(sharded)
    assert report.totals["collective_nodes"] == sum(_graph_collectives(sharded).values())
    with trace_collectives() as log:
        out = sharded(*args, **kwargs)
        out.loss.backward()
    model.zero_grad(set_to_none=True)
    traced = Counter((kind, phase, tuple(shape), size) for kind, phase, shape, size in log)
    reported = Counter((e.kind, e.phase, tuple(e.shape), e.bytes) for e in report.events())
    assert reported == traced
    for phase, key in (("forward", "bytes_forward"), ("backward", "bytes_backward")):
        assert report.totals[key] == sum(size for _, p, _, size in log if p == phase)


def _assert_report_matches_trace(sharded, model, args, kwargs):
    report = sharded.explain()
    with trace_collectives() as log:
        sharded(*args, **kwargs).loss.backward()
    model.zero_grad(set_to_none=True)
    traced = Counter((kind, phase, tuple(shape), size) for kind, phase, shape, size in log)
    assert Counter((e.kind, e.phase, tuple(e.shape), e.bytes) for e in report.events()) == traced
    return report


def test_backward_collectives_are_counted_only_where_a_gradient_arrives():
    # T5 shards the position bias added to every attention's scores (`shard`); in cross-attention
    # that bias is only a mask, with no gradient, so its shard's conjugate all-gather never runs
    config = {
        "model_type": "t5",
        "vocab_size": 128,
        "d_model": 64,
        "d_kv": 16,
        "d_ff": 128,
        "num_layers": 2,
        "num_heads": 4,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
    }
    model = build_model(config)
    args, kwargs = random_batch(model)
    sharded = autoshard(model, 2, example_inputs=args, example_kwargs=kwargs)
    report = _assert_report_matches_trace(sharded, model, args, kwargs)
    shards = [c for c in report.collectives if c.op == "shard"]
    assert shards and any(not c.backward for c in shards)


def test_a_block_with_nothing_sharded_is_called_out():
    model, _, args, kwargs = sharded_family("llama", 2)
    replicated = {
        "model.layers.*.self_attn.(q|k|v|o)_proj": "replicate",
        "model.layers.*.mlp.(gate|up|down)_proj": "replicate",
    }
    sharded = autoshard(model, 2, example_inputs=args, example_kwargs=kwargs, plan=replicated)
    report = _assert_report_matches_trace(sharded, model, args, kwargs)
    assert [b.replicated for b in report.blocks] == [True, True]
    assert report.totals["replicated_blocks"] == 2
    assert "not sharded (0 of 7 matmuls)" in report.to_text()
    assert "2 of 2 blocks are not sharded" in report.to_html()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_block_hits_the_megatron_optimum(family):
    report = sharded_family(family, 2)[1].explain()
    assert len(report.blocks) == 2
    for block in report.blocks:
        assert (block.optimum_forward, block.optimum_backward) == (2, 2), block
        assert block.forward == {"all_reduce": 2} and block.backward == {"all_reduce": 2}, block
    assert report.blocks[1].same_as == report.blocks[0].name
    assert report.totals["extra_over_optimum"] == 0 and report.totals["replicated_blocks"] == 0


def test_parameters_have_placement_local_shape_and_bytes():
    _, sharded, _, _ = sharded_family("llama", 2)
    report = sharded.explain()
    rows = {p.name: p for p in report.parameters}
    assert set(rows) == set(sharded.placements)
    q = rows["model.layers.0.self_attn.q_proj.weight"]
    assert (q.placement, q.full_shape, q.local_shape, q.bytes_per_rank) == (
        "S(0)",
        [64, 64],
        [32, 64],
        32 * 64 * 4,
    )
    assert rows["model.norm.weight"].placement == "R"
    local = sum(p.numel() * p.element_size() for p in sharded.parameters()) // 1
    full_total = report.totals["param_bytes_full"]
    assert full_total == local  # without a process group the module holds the full weights
    assert report.totals["param_bytes_per_rank"] < full_total


def test_tied_parameters_are_counted_once():
    report = sharded_family("gpt2", 2)[1].explain()
    tied = [p for p in report.parameters if p.tied_to]
    assert [(p.name, p.tied_to) for p in tied] == [("lm_head.weight", "transformer.wte.weight")]
    assert report.stages[0].params == report.totals["parameters"] == len(report.parameters) - 1


def test_single_stage_holds_every_block_until_pipelines_exist():
    report = sharded_family("llama", 2)[1].explain()
    assert report.pp == 1 and len(report.stages) == 1
    stage = report.stages[0]
    assert stage.blocks == ["model.layers.0", "model.layers.1"]
    assert stage.param_bytes == report.totals["param_bytes_per_rank"]
    # 2 * tokens * (local weights of every matmul) is a floor for the matmul FLOPs
    assert stage.matmul_flops > 2 * 32 * sum(
        p.local_shape[0] * p.local_shape[1]
        for p in report.parameters
        if p.name.endswith("proj.weight")
    )
    assert "<table>" in stage._repr_html_()


def test_json_text_and_html_forms_carry_the_same_report():
    _, sharded, _, _ = sharded_family("llama", 2)
    data = sharded.explain(format="json")
    assert json.loads(json.dumps(data)) == data
    assert data["totals"]["forward"] == {"all_reduce": 7, "all_gather": 1, "all_reduce(max)": 1}
    assert data["sizes"] == {"s0": 2, "s1": 16, "s2": 2, "s3": 16}
    assert [s["index"] for s in data["stages"]] == [0]
    text = sharded.explain(format="text")
    assert "all_reduce[tp](" in text and "x 1 more identical blocks" in text and "= optimum" in text
    html = sharded._repr_html_()
    assert "<svg" in html and "all_reduce[tp]" in html and "x 1 more identical blocks" in html
    assert "captured (global)" in html  # the before/after of one block
    with pytest.raises(ValueError, match="format"):
        sharded.explain(format="yaml")


def test_history_lists_each_pass_and_diffs_two_steps():
    _, sharded, _, _ = sharded_family("llama", 2)
    history = sharded.history
    assert [r.name for r in history] == [
        "capture",
        "drop_assertions",
        "decompose_variance",
        "linear_from_matmul",
        "expert_linear_from_grouped_mm",
        "split_bias",
        "repeat_kv_heads",
        "propagate",
        "partition",
        "retarget_device",
    ]
    partition = history.step("partition")
    inserted = sum(_graph_collectives(sharded).values())
    assert partition.ops_after - partition.ops_before == inserted - 1  # the CE replaces a loss op
    assert all(r.seconds >= 0 for r in history)
    diff = history.diff("propagate", "partition")
    added = [
        line for line in diff.splitlines() if line.startswith("+") and "all_reduce[tp](" in line
    ]
    assert (
        len(added)
        == _graph_collectives(sharded)["all_reduce"]
        + _graph_collectives(sharded)["grad_all_reduce"]
    )
    assert history.diff("partition", "partition") == ""
    with pytest.raises(KeyError, match="passes: capture"):
        history.step("no_such_pass")


def test_data_dependent_sizes_are_reported_as_such():
    """JetMoE routes tokens with `.tolist()` split sizes: sizes with no example value. The
    report says so instead of failing, and the model is still equal to the unsharded one."""
    import warnings

    import torch

    config = dict(
        model_type="jetmoe", vocab_size=128, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, kv_channels=16,
        num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    )  # fmt: skip
    model = build_model(config)
    args, kwargs = random_batch(model, batch=2, seq=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its experts stay whole: tests/test_degradation.py
        sharded = autoshard(model, 2, example_inputs=args, example_kwargs=kwargs)
    text = sharded.explain(format="text")
    assert "data-dependent (counted as 0)" in text
    torch.testing.assert_close(sharded(*args, **kwargs).loss, model(*args, **kwargs).loss)
