"""Pipeline parallelism: stage splitting, balance, and loss/gradient equivalence over (dp, pp, tp)."""

import copy
import itertools
import random

import pytest
import torch
from conftest import config_dict

from nxd_autoshard import PlanError, autoshard
from nxd_autoshard.compiler.split import balance, even_split
from nxd_autoshard.ir.mesh import Mesh
from nxd_autoshard.runtime import pipeline
from nxd_autoshard.tools.hf import build_model, random_batch
from nxd_autoshard.tools.verify import compare, verify_config


def layers(family: str, n: int, **extra) -> dict:
    key = "n_layer" if family == "gpt2" else "num_hidden_layers"
    return config_dict(family, **{key: n}, **extra)


def _assert_all_ok(checks):
    bad = [c.line() for c in checks if not c.ok]
    assert not bad, "\n".join(bad)
    grads = [c for c in checks if c.name.startswith("grad")]
    assert grads and all("(missing)" not in c.name for c in grads)


# ---------------------------------------------------------------- equivalence (simulator)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize(
    "tp,pp,dp,n_layers", [(1, 2, 1, 3), (1, 4, 1, 5), (2, 2, 1, 3), (2, 1, 2, 2)]
)
def test_simulator_pipeline_matches_unsharded(family, tp, pp, dp, n_layers):
    _assert_all_ok(verify_config(layers(family, n_layers), tp, pp=pp, dp=dp, world="sim"))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_simulator_tp8_pp4(family):
    cfg = layers(
        family,
        4,
        **(
            {"n_head": 8}
            if family == "gpt2"
            else {"num_attention_heads": 8, "num_key_value_heads": 8}
        ),
    )
    _assert_all_ok(verify_config(cfg, 8, pp=4, microbatches=4, world="sim"))


def test_simulator_interleaved_uneven_layers():
    _assert_all_ok(
        verify_config(
            layers("llama", 5), 2, pp=2, dp=2, microbatches=4, schedule="interleaved", world="sim"
        )
    )


@pytest.mark.parametrize("family", ["gpt_neox", "bert", "qwen2"])
def test_simulator_other_families_pp2(family):
    _assert_all_ok(verify_config(layers(family, 3), 2, pp=2, world="sim"))


# ---------------------------------------------------------------- equivalence (gloo processes)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gloo_pp2(family):
    _assert_all_ok(verify_config(layers(family, 3), 1, pp=2, microbatches=2, world="gloo"))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gloo_tp2_pp2(family):
    _assert_all_ok(verify_config(layers(family, 3), 2, pp=2, microbatches=2, world="gloo"))


@pytest.mark.parametrize("schedule", ["gpipe", "looped_bfs", "zero_bubble", "zbv"])
def test_gloo_other_schedules_with_tied_embeddings(schedule):
    # zbv puts the first and last stage (both holding the tied wte/lm_head) on one rank
    _assert_all_ok(
        verify_config(layers("gpt2", 4), 1, pp=2, microbatches=4, schedule=schedule, world="gloo")
    )


def test_gloo_dp2_tp2():
    _assert_all_ok(verify_config(layers("llama", 2), 2, dp=2, microbatches=2, world="gloo"))


@pytest.mark.parametrize("schedule", ["1f1b", "zbv"])
def test_gloo_float_transport_between_stages(monkeypatch, schedule):
    # the path torch 2.9 takes (ids, labels, masks cross stages as float64), forced on any torch;
    # the ranks are forked, so they see the patch
    monkeypatch.setattr(pipeline, "stage_io_must_be_float", lambda: True)
    _assert_all_ok(
        verify_config(layers("gpt2", 4), 1, pp=2, microbatches=4, schedule=schedule, world="gloo")
    )


def test_zbv_without_torch_runtime_says_which_torch(monkeypatch):
    from torch.distributed.pipelining import schedules

    monkeypatch.delattr(schedules, "_PipelineScheduleRuntime", raising=False)
    with pytest.raises(PlanError, match="torch >= 2.13"):
        pipeline._with_local_handoff(object(), [], 4, lambda out, target: out)


def test_gloo_interleaved_dp2_tp2_pp2():
    # the acceptance command: 8 processes, 2 stages per pp rank
    _assert_all_ok(
        verify_config(
            layers("llama", 5), 2, pp=2, dp=2, microbatches=4, schedule="interleaved", world="gloo"
        )
    )


# ---------------------------------------------------------------- training tracks the unsharded model
def test_adamw_steps_track_unsharded_pp2_tp2():
    model = build_model(layers("llama", 3), seed=0)
    ref = copy.deepcopy(model)
    sharded = autoshard(
        model, 2, pp=2, microbatches=2, example_inputs=random_batch(model, batch=4)[0]
    )
    opt = torch.optim.AdamW(sharded.parameters(), lr=1e-3)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    got, want = [], []
    args, kwargs = random_batch(model, batch=4, seed=10)
    for _ in range(4):
        opt.zero_grad()
        ref_opt.zero_grad()
        loss = sharded.train_step(*args, **kwargs)
        ref_loss = ref(*args, **kwargs).loss
        ref_loss.backward()
        opt.step()
        ref_opt.step()
        got.append(loss.item())
        want.append(ref_loss.item())
    assert got[-1] < got[0]  # it trains
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-5)
    for (name, p), (_, q) in zip(sharded.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4, msg=name)


# ---------------------------------------------------------------- split and balance
@pytest.mark.parametrize("n_layers,pp", [(2, 2), (3, 2), (5, 3), (7, 4), (6, 6)])
def test_every_parameter_lands_on_exactly_one_stage(n_layers, pp):
    model = build_model(layers("gpt2", n_layers), seed=0)
    sharded = autoshard(
        model, 1, pp=pp, microbatches=pp, example_inputs=random_batch(model, batch=pp)[0]
    )
    stages = sharded.stages()
    assert len(stages) == pp
    by_name = dict(model.named_parameters(remove_duplicate=False))
    held: dict[int, list[int]] = {}  # parameter identity -> stages holding it
    for stage in stages:
        for name in stage.state_names:
            if name in by_name:
                held.setdefault(id(by_name[name]), []).append(stage.index)
    missing = [n for n, p in model.named_parameters() if id(p) not in held]
    assert not missing
    shared = {i: s for i, s in held.items() if len(s) > 1}
    # only the tied embedding / LM head is on two stages: the first and the last
    assert list(shared) == [id(by_name["lm_head.weight"])]
    assert list(shared.values()) == [[0, pp - 1]]
    # every unit (a layer's attention half, its MLP half, the embedding...) on exactly one stage
    assert [u for stage in stages for u in stage.units] == sharded.units.names
    blocks = list(dict.fromkeys(b for stage in stages for b in stage.blocks))
    assert blocks == [f"transformer.h.{i}" for i in range(n_layers)]  # no layer dropped
    for stage in stages[1:]:  # a layer is only ever cut after its attention's residual add
        first = stage.units[0]
        assert first.endswith(".ln_1") or first.endswith(".ln_2"), first


def test_balance_is_optimal_on_random_costs():
    rng = random.Random(0)
    for _ in range(50):
        n, k = rng.randint(2, 9), rng.randint(1, 4)
        if k > n:
            continue
        costs = [rng.uniform(1, 10) for _ in range(n)]
        got = balance(costs, k)
        assert got == sorted(got) and set(got) == set(range(k))

        def worst(assign):
            return max(sum(c for c, s in zip(costs, assign) if s == j) for j in range(k))

        best = min(
            worst([sum(1 for c in cuts if c <= u) for u in range(n)])
            for cuts in itertools.combinations(range(1, n), k - 1)
        )
        assert worst(got) == pytest.approx(best)


def test_balance_puts_fewer_layers_with_the_lm_head():
    model = build_model(layers("llama", 6, vocab_size=4096), seed=0)
    args = random_batch(model, batch=2)[0]
    cost = autoshard(model, 1, pp=2, example_inputs=args)  # balance='flops'
    even = autoshard(model, 1, pp=2, example_inputs=args, balance="even")
    assert even.stage_of_block == [0, 0, 0, 1, 1, 1]
    assert cost.stage_of_block.count(1) < 3  # the big head costs as much as a layer or more
    assert even_split(7, 3) == [0, 0, 0, 1, 1, 2, 2]


def test_pipeline_cuts_by_name():
    model = build_model(layers("llama", 4), seed=0)
    sharded = autoshard(
        model,
        1,
        pp=2,
        example_inputs=random_batch(model, batch=2)[0],
        pipeline_cuts=["model.layers.1"],
    )
    assert sharded.stage_of_block == [0, 1, 1, 1]


def test_mesh_rank_order_tp_fastest_then_pp_then_dp():
    mesh = Mesh(dp=2, pp=2, tp=2)
    assert [mesh.coords(r) for r in (0, 1, 2, 5)] == [
        {"dp": 0, "pp": 0, "tp": 0},
        {"dp": 0, "pp": 0, "tp": 1},
        {"dp": 0, "pp": 1, "tp": 0},
        {"dp": 1, "pp": 0, "tp": 1},
    ]
    assert mesh.groups("tp")[:2] == [[0, 1], [2, 3]]
    assert mesh.groups("pp")[:2] == [[0, 2], [1, 3]]
    assert mesh.groups("dp")[0] == [0, 4]


# ---------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def llama3():
    model = build_model(layers("llama", 3), seed=0)
    return model, random_batch(model, batch=4)


@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(pp=4), PlanError, r"pp=4 stages need at least 4 blocks.*has 3"),
        (
            dict(pp=2, microbatches=3, schedule="gpipe"),
            ValueError,
            r"batch of 4 cannot be split into 3",
        ),
        (
            dict(pp=2, microbatches=1),
            ValueError,
            r"'1f1b' needs at least as many microbatches.*microbatches=1 < pp=2",
        ),
        (
            dict(pp=2, microbatches=2, schedule="interleaved"),
            PlanError,
            r"pp=4 stages need at least 4 blocks.*2 stages per pp rank",
        ),
        (dict(pp=2, schedule="zb"), ValueError, r"unknown pipeline schedule 'zb'.*1f1b"),
        (dict(pp=2, balance="speed"), ValueError, r"balance must be one of flops, memory, even"),
    ],
)
def test_bad_pipeline_arguments(llama3, options, error, message):
    model, (args, _) = llama3
    with pytest.raises(error, match=message):
        autoshard(model, 1, example_inputs=args, **options)


def test_cut_name_matching_nothing(llama3):
    model, (args, _) = llama3
    with pytest.raises(PlanError, match=r"cut 'model.layer.1' matches no block.*model\.layers\.1"):
        autoshard(model, 1, pp=2, example_inputs=args, pipeline_cuts=["model.layer.1"])
    with pytest.raises(PlanError, match=r"2 pipeline cuts make 3 stages, not 2"):
        autoshard(
            model, 1, pp=2, example_inputs=args, pipeline_cuts=["model.layers.1", "model.layers.2"]
        )


def test_model_without_blocks_cannot_be_pipelined():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    with pytest.raises(PlanError, match="no repeated blocks"):
        autoshard(
            mlp, 1, pp=2, example_inputs=(torch.randn(4, 8),), loss_fn=lambda out, target: out.sum()
        )


def test_train_step_without_a_loss_says_what_to_pass(llama3):
    model, (args, _) = llama3
    sharded = autoshard(model, 1, pp=2, example_inputs=args)
    with pytest.raises(ValueError, match=r"returned no loss: pass the labels"):
        sharded.train_step(*args)


def _zero1_worker(rank, world, cfg):
    from nxd_autoshard.runtime.pipeline import chunk_batch

    model = build_model(cfg, seed=0)
    args, kwargs = random_batch(model, batch=4, seed=1)
    mine = chunk_batch(args, kwargs, 2)[rank // 2]  # dp replica of this rank (pp=2, tp=1)
    sharded = autoshard(
        model, 1, pp=2, dp=2, microbatches=2, example_inputs=mine[0], example_kwargs=mine[1]
    )
    opt = sharded.optimizer(torch.optim.AdamW, zero=True, lr=1e-3)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        losses.append(sharded.train_step(*mine[0], **mine[1]).item())
        opt.step()
    losses.append(sharded.eval_step(*mine[0], **mine[1]).item())
    return type(opt).__name__, losses


def test_gloo_zero1_dp2_pp2_tracks_adamw():
    from nxd_autoshard.tools.launch import run_ranks

    cfg = layers("gpt2", 3)
    results = run_ranks(_zero1_worker, 4, args=(cfg,))
    model = build_model(cfg, seed=0)
    args, kwargs = random_batch(model, batch=4, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    want = []
    for _ in range(3):
        opt.zero_grad()
        loss = model(*args, **kwargs).loss
        loss.backward()
        opt.step()
        want.append(loss.item())
    with torch.no_grad():
        want.append(model(*args, **kwargs).loss.item())
    for kind, got in results:
        assert kind == "ZeroRedundancyOptimizer"
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-5)
    assert want[-1] < want[0]


def test_eval_mode_recapture_keeps_the_stages():
    # eval() recaptures without dropout; the stages must hold the same layers as in training
    cfg = layers("gpt_neox", 3, hidden_dropout=0.1, attention_dropout=0.1)
    model = build_model(cfg, seed=0).train()
    args, kwargs = random_batch(model, batch=4, seed=1)
    sharded = autoshard(model, 2, pp=2, example_inputs=args, example_kwargs=kwargs)
    sharded.train_step(*args, **kwargs)
    trained_blocks = [s.blocks for s in sharded.stages()]
    sharded.eval()
    model.eval()
    got = sharded.eval_step(*args, **kwargs)
    with torch.no_grad():
        want = model(*args, **kwargs).loss
    assert compare("eval loss", got, want).ok
    programs = sharded.compiled.programs
    assert len(programs) == 2 and [s.blocks for s in programs[-1].stages] == trained_blocks


def test_gloo_padded_tied_vocab_across_stages():
    # vocab 127 at tp 2 is padded to 128; the tied wte/lm_head sits on the first and last stage
    _assert_all_ok(
        verify_config(layers("gpt2", 3, vocab_size=127), 2, pp=2, microbatches=2, world="gloo")
    )
