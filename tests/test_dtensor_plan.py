"""`sharded.dtensor_plan()`: the plan as DTensor parallel styles. Applied with
`parallelize_module` on 2 gloo ranks it gives the unsharded model's loss and every gradient; what
DTensor cannot express is left replicated and named, never exported wrong."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from nxd_autoshard import autoshard
from nxd_autoshard.tools.launch import run_ranks

VOCAB = 128


def _llama(kv_heads: int = 4, vocab: int = VOCAB):
    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=kv_heads,
        )
    )


def _mixtral():
    return transformers.MixtralForCausalLM(
        transformers.MixtralConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_local_experts=4,
        )
    )


def _falcon():
    return transformers.FalconForCausalLM(
        transformers.FalconConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            new_decoder_architecture=False,
            parallel_attn=True,
        )
    )


class HardCodedHeads(torch.nn.Module):
    """Attention whose views hard-code the head count, as older model code does."""

    def __init__(self, width: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.q, self.k, self.v = (torch.nn.Linear(width, width) for _ in range(3))
        self.o = torch.nn.Linear(width, width)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (
            p(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
            for p in (self.q, self.k, self.v)
        )
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class HardCodedModel(torch.nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.attn = HardCodedHeads(width)
        self.up, self.down = torch.nn.Linear(width, 64), torch.nn.Linear(64, width)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.down(torch.relu(self.up(x)))


def _lm_batch():
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 8))
    return (ids,), {"labels": ids}


def _lm_loss(model, args, kwargs):
    return model(*args, **kwargs).loss


def _mse_batch():
    torch.manual_seed(1)
    return (torch.randn(2, 8, 32),), {}


def _mse_loss(model, args, kwargs):
    return model(*args).pow(2).mean()


def _on_dtensor(rank, world_size, model, plan, args, kwargs, loss_of):
    """Loss and full gradients of `model` parallelised by `plan` on this rank's tp mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh("cpu", (world_size,))
    model = parallelize_module(copy.deepcopy(model), mesh, dict(plan))
    loss = loss_of(model, args, kwargs)
    loss = loss.full_tensor() if isinstance(loss, DTensor) else loss
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        grads[name] = g.full_tensor() if isinstance(g, DTensor) else g
    sharded = [n for n, p in model.named_parameters() if isinstance(p, DTensor)]
    return loss.detach(), grads, sharded


CASES = {
    "llama": (_llama, _lm_batch, _lm_loss),
    "llama_gqa_kv1": (lambda: _llama(kv_heads=1), _lm_batch, _lm_loss),
    "mixtral": (_mixtral, _lm_batch, _lm_loss),
    "falcon_parallel_attn": (_falcon, _lm_batch, _lm_loss),
    "hard_coded_heads": (HardCodedModel, _mse_batch, _mse_loss),
}


@pytest.mark.parametrize("case", list(CASES))
def test_dtensor_plan_round_trip_on_gloo(case):
    build, batch, loss_of = CASES[case]
    torch.manual_seed(0)
    model = build()
    args, kwargs = batch()
    sharded = autoshard(model, tp=2, example_inputs=args, example_kwargs=kwargs)
    plan = sharded.dtensor_plan()
    assert plan, f"{case}: nothing exported"
    # every module the rewrite shards is either exported or named with why it is not
    ours = {
        n.rpartition(".")[0]
        for n, p in sharded.plan.placements.items()
        if p.__class__.__name__ == "Shard"
    }
    assert ours == set(plan) | set(plan.skipped)
    assert all(why for why in plan.skipped.values())

    ref = copy.deepcopy(model)
    want = loss_of(ref, args, kwargs)
    want.backward()
    ours_loss = loss_of(sharded, args, kwargs)
    torch.testing.assert_close(ours_loss.detach(), want.detach(), atol=1e-5, rtol=1e-5)

    results = run_ranks(_on_dtensor, 2, args=(model, plan, args, kwargs, loss_of), timeout_s=300)
    for loss, grads, on_mesh in results:
        torch.testing.assert_close(loss, want.detach(), atol=1e-5, rtol=1e-5)
        for name, p in ref.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
        exported = {n.rpartition(".")[0] for n in on_mesh}
        assert exported == set(plan), "every exported module holds DTensor parameters"


def test_what_dtensor_cannot_express_is_named():
    torch.manual_seed(0)
    args, kwargs = _mse_batch()
    plan = autoshard(HardCodedModel(), tp=2, example_inputs=args).dtensor_plan()
    # the views with 4 heads would need 2 per rank: the attention stays replicated, the MLP not
    assert set(plan) == {"up", "down"}
    assert {"attn.q", "attn.k", "attn.v", "attn.o"} == set(plan.skipped)
    assert "size 4" in plan.skipped["attn.q"] and "local size" in plan.skipped["attn.q"]
    assert "attn.o" in repr(plan) and "replicated" in repr(plan)

    args, kwargs = _lm_batch()
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=4)
    )
    plan = autoshard(gpt2, tp=2, example_inputs=args, example_kwargs=kwargs).dtensor_plan()
    assert not plan  # Conv1D projections (c_attn fused q|k|v) and a tied embedding
    assert "Conv1D" in plan.skipped["transformer.h.0.mlp.c_fc"]
    assert "tied" in plan.skipped["lm_head"]

    # 2 KV heads at tp 4: q split, k and v replicated and sliced per rank, as NxD does
    gqa = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
            num_attention_heads=8, num_key_value_heads=2,
        )
    )  # fmt: skip
    plan = autoshard(gqa, tp=4, example_inputs=args, example_kwargs=kwargs).dtensor_plan()
    attn = "model.layers.0.self_attn"
    assert {f"{attn}.q_proj", f"{attn}.o_proj"} <= set(plan.skipped)
    assert "KV heads fewer than tp" in plan.skipped[f"{attn}.o_proj"]
    assert f"{attn}.o_proj" in plan.skipped[f"{attn}.q_proj"]  # left whole with its region
    assert "model.layers.0.mlp.down_proj" in plan

    padded = autoshard(_llama(vocab=127), tp=2, example_inputs=(args[0] % 127,)).dtensor_plan()
    assert "padded" in padded.skipped["model.embed_tokens"]
    assert "model.layers.0.self_attn.q_proj" in padded


def test_llama_export_is_the_plan_an_expert_writes():
    """The same styles and layouts as the hand-written Llama TP plan (torchtitan's, and
    benchmarks/step_time.py's DTensor peer)."""
    from torch.distributed.tensor import Replicate as DR
    from torch.distributed.tensor import Shard as DS

    args, kwargs = _lm_batch()
    plan = autoshard(_llama(), tp=2, example_inputs=args, example_kwargs=kwargs).dtensor_plan()
    col, row = ("ColwiseParallel", (DR(),), (DS(-1),)), ("RowwiseParallel", (DS(-1),), (DR(),))
    want = {
        "model.embed_tokens": ("RowwiseParallel", (DR(),), (DR(),)),
        "lm_head": ("ColwiseParallel", (DR(),), (DR(),)),
    }
    for i in range(2):
        p = f"model.layers.{i}"
        want |= {f"{p}.self_attn.{n}_proj": col for n in "qkv"}
        want |= {f"{p}.self_attn.o_proj": row, f"{p}.mlp.down_proj": row}
        want |= {f"{p}.mlp.gate_proj": col, f"{p}.mlp.up_proj": col}
    got = {
        name: (type(s).__name__, tuple(s.input_layouts), tuple(s.output_layouts))
        for name, s in plan.items()
    }
    assert got == want
    assert not plan.skipped
