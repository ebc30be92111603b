"""The sharded module behaves like the model it replaces."""

import copy

import pytest
import torch
from conftest import CONFIGS, config_dict

from nxd_autoshard import Replicate, Shard, autoshard
from nxd_autoshard.tools.hf import build_model, random_batch
from nxd_autoshard.tools.launch import run_ranks


@pytest.fixture(scope="module")
def llama():
    return build_model(CONFIGS / "llama.json")


def test_parameter_names_and_placements(llama):
    args, kwargs = random_batch(llama)
    sharded = autoshard(llama, 2, example_inputs=args, example_kwargs=kwargs)
    assert [n for n, _ in sharded.named_parameters()] == [n for n, _ in llama.named_parameters()]
    p = sharded.placements
    assert p["model.layers.0.self_attn.q_proj.weight"] == Shard(0)
    assert p["model.layers.0.self_attn.o_proj.weight"] == Shard(1)
    assert p["model.layers.0.mlp.down_proj.weight"] == Shard(1)
    assert p["model.embed_tokens.weight"] == Shard(0)
    assert p["model.norm.weight"] == Replicate()
    assert sharded.local_shape("model.layers.0.mlp.up_proj.weight") == (64, 64)


def test_auto_plan_equals_family_plan(llama):
    args, kwargs = random_batch(llama)
    auto = autoshard(llama, 2, example_inputs=args, example_kwargs=kwargs)
    filed = autoshard(llama, 2, example_inputs=args, example_kwargs=kwargs, plan="llama")
    assert auto.placements == filed.placements


def test_new_shapes_and_kwargs_without_user_visible_recapture(llama):
    args, kwargs = random_batch(llama, batch=2, seq=16)
    sharded = autoshard(llama, 2, example_inputs=args, example_kwargs=kwargs)
    ref = copy.deepcopy(llama)
    ids = torch.randint(0, 128, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    out = sharded(ids, attention_mask=mask)
    want = ref(ids, attention_mask=mask)
    torch.testing.assert_close(out.logits, want.logits, rtol=1e-4, atol=1e-5)
    assert len(sharded.programs()) == 2  # labels= call, and this attention_mask= call
    sharded(torch.randint(0, 128, (5, 7)), attention_mask=torch.ones(5, 7, dtype=torch.long))
    assert len(sharded.programs()) == 2  # dynamic batch and sequence: no recapture
    assert sharded.explain(program=1).blocks  # programs are numbered in capture order
    with pytest.raises(
        IndexError, match=r"explain\(\): program=2, but 2 program\(s\) are captured"
    ):
        sharded.explain(program=2)
    with pytest.raises(IndexError, match=r"dtensor_plan\(\): program=-3"):
        sharded.dtensor_plan(program=-3)


def test_train_and_eval_modes_follow_dropout():
    model = build_model(config_dict("gpt2", resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.0))
    args, kwargs = random_batch(model)
    sharded = autoshard(model, 2, example_inputs=args, example_kwargs=kwargs)
    ref = copy.deepcopy(model).eval()
    sharded.eval()
    torch.testing.assert_close(sharded(*args).logits, ref(*args).logits, rtol=1e-4, atol=1e-5)
    sharded.train()
    torch.manual_seed(0)
    a = sharded(*args).logits
    torch.manual_seed(1)
    b = sharded(*args).logits
    assert not torch.allclose(a, b), "dropout must be active in train mode"
    assert sharded.training and any(p.training for p in sharded.programs())


def test_training_steps_track_unsharded():
    model = build_model(CONFIGS / "llama.json")
    ref = copy.deepcopy(model)
    args, kwargs = random_batch(model)
    sharded = autoshard(model, 2, example_inputs=args, example_kwargs=kwargs)
    opt = torch.optim.AdamW(sharded.parameters(), lr=1e-3)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        for m, o in ((sharded, opt), (ref, ref_opt)):
            o.zero_grad()
            loss = m(*args, **kwargs).loss
            loss.backward()
            o.step()
            losses.append(loss.item())
    got, want = losses[0::2], losses[1::2]
    assert want[-1] < want[0]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-5)


def _program_text(rank, world):
    model = build_model(CONFIGS / "llama.json")
    args, kwargs = random_batch(model)
    sharded = autoshard(model, world, example_inputs=args, example_kwargs=kwargs)
    return sharded.graph_module.code


def test_every_rank_runs_the_same_program():
    texts = run_ranks(_program_text, 2)
    assert texts[0] == texts[1]
    assert "rank" not in texts[0]


def _train_gloo(rank, world, steps):
    model = build_model(CONFIGS / "gpt2.json")
    args, kwargs = random_batch(model)
    sharded = autoshard(model, world, example_inputs=args, example_kwargs=kwargs)
    opt = torch.optim.AdamW(sharded.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = sharded(*args, **kwargs).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_gloo_training_tracks_unsharded():
    got = run_ranks(_train_gloo, 2, args=(3,))
    ref = build_model(CONFIGS / "gpt2.json")
    args, kwargs = random_batch(ref)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    want = []
    for _ in range(3):
        opt.zero_grad()
        loss = ref(*args, **kwargs).loss
        loss.backward()
        opt.step()
        want.append(loss.item())
    assert got[0] == got[1]
    torch.testing.assert_close(torch.tensor(got[0]), torch.tensor(want), rtol=1e-4, atol=1e-5)
