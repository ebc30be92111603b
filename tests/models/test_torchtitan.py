"""torchtitan 0.3's own model code (Llama 3, its GQA and fused-qkv variants, Qwen3, Qwen3 MoE),
tiny random configs built with its layer builders: loss and every gradient against the
unsharded model, and collectives per block against the optimum.

`make test-models` installs torchtitan (and what it imports at import time) first. Attention is
torchtitan's own ScaledDotProductAttention module: its language models default to
FlexAttention, which has no backward on CPU.
"""

from __future__ import annotations

import warnings

import pytest
import torch

titan = pytest.importorskip("torchtitan", reason="torchtitan is installed by `make test-models`")

from torchtitan.models import llama3, qwen3  # noqa: E402
from torchtitan.models.common import ComplexRoPE, CosSinRoPE, Embedding, Linear, RMSNorm  # noqa: E402
from torchtitan.models.common.attention import ScaledDotProductAttention  # noqa: E402

from nxd_autoshard import CaptureError, autoshard  # noqa: E402

VOCAB, DIM = 128, 64


@pytest.fixture(autouse=True)
def _sdpa(monkeypatch):
    for module in (llama3, qwen3):
        monkeypatch.setattr(module, "get_attention_config", lambda backend: _sdpa_config())


def _sdpa_config():
    return ScaledDotProductAttention.Config()


def _llama3(n_kv_heads: int, fuse_qkv: bool):
    layers = llama3._build_llama3_layers(
        fuse_qkv=fuse_qkv,
        n_layers=2,
        dim=DIM,
        n_heads=4,
        n_kv_heads=n_kv_heads,
        hidden_dim=128,
        rope=ComplexRoPE.Config(dim=DIM // 4, max_seq_len=64, theta=500000, scaling="none"),
        attn_backend="sdpa",
    )
    return llama3.Llama3Model.Config(
        dim=DIM,
        vocab_size=VOCAB,
        tok_embeddings=Embedding.Config(
            num_embeddings=VOCAB, embedding_dim=DIM, param_init=llama3._EMBEDDING_INIT
        ),
        norm=RMSNorm.Config(normalized_shape=DIM, param_init=llama3._NORM_INIT),
        lm_head=Linear.Config(
            in_features=DIM, out_features=VOCAB, param_init=llama3._output_linear_init(DIM)
        ),
        layers=layers,
    ).build()


def _qwen3(moe: bool):
    common = dict(
        fuse_qkv=False, n_layers=2, dim=DIM, n_heads=4, n_kv_heads=2, head_dim=16,
        attn_backend="sdpa",
        rope=CosSinRoPE.Config(dim=16, max_seq_len=64, theta=1000000.0),
    )  # fmt: skip
    if moe:
        layers = qwen3._build_qwen3_moe_layers(
            **common, moe_hidden_dim=32, num_experts=4, top_k=2, moe_comm_backend="standard"
        )
    else:
        layers = qwen3._build_qwen3_layers(**common, hidden_dim=128)
    return qwen3.Qwen3Model.Config(
        vocab_size=VOCAB,
        dim=DIM,
        norm=qwen3._qwen3_norm(DIM),
        tok_embeddings=Embedding.Config(
            num_embeddings=VOCAB, embedding_dim=DIM, param_init=qwen3._EMBEDDING_INIT
        ),
        lm_head=Linear.Config(in_features=DIM, out_features=VOCAB, param_init=qwen3._LINEAR_INIT),
        layers=layers,
    ).build()


def _check(model, tp: int):
    """Sharded (simulator) vs unsharded: loss and every gradient; the report and the warnings."""
    model.init_weights()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    want = model(ids).float().square().mean()
    want.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sharded = autoshard(model, tp, example_inputs=(ids,))
    got = sharded(ids).float().square().mean()
    got.backward()
    torch.testing.assert_close(got, want)
    grads = sharded.gather_grads()
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, msg=name)
    report = sharded.explain()
    placements = {p.name: str(p.placement) for p in report.parameters}
    messages = [str(w.message) for w in caught if "nxd-autoshard" in str(w.message)]
    return report.totals, placements, messages


@pytest.mark.parametrize("fuse_qkv", [False, True], ids=["qkv", "fused-qkv"])
def test_llama3_at_the_optimum(fuse_qkv):
    torch.manual_seed(0)
    totals, placements, messages = _check(_llama3(n_kv_heads=2, fuse_qkv=fuse_qkv), 2)
    assert totals["block_collectives"] == totals["block_optimum"] == [[2, 2]]
    assert totals["replicated_block_matmuls"] == 0
    assert not messages, messages


def test_llama3_gqa_with_fewer_kv_heads_than_tp_replicates_kv_only():
    torch.manual_seed(0)
    totals, placements, messages = _check(_llama3(n_kv_heads=2, fuse_qkv=False), 4)
    assert placements["layers.0.attention.qkv_linear.wq.weight"] == "S(0)"
    assert placements["layers.0.attention.qkv_linear.wk.weight"] == "R"
    assert totals["block_collectives"] == [[2, 4]]  # + the KV slices' gradient gathers
    assert not [m for m in messages if "stay replicated" in m], messages


def test_qwen3_at_the_optimum():
    """Per-head q/k norms: their replicated weights' gradients are all-reduced (the optimum)."""
    torch.manual_seed(0)
    totals, placements, messages = _check(_qwen3(moe=False), 2)
    assert totals["block_collectives"] == totals["block_optimum"] == [[2, 4]]
    assert totals["replicated_block_matmuls"] == 0
    assert not messages, messages


def test_qwen3_moe_experts_split_under_grouped_mm():
    torch.manual_seed(0)
    model = _qwen3(moe=True).eval()  # training mode counts tokens per expert into a buffer
    totals, placements, messages = _check(model, 2)
    experts = "layers.0.moe.routed_experts.inner_experts"
    assert placements[f"{experts}.w1_EFD"] == "S(1)" and placements[f"{experts}.w2_EDF"] == "S(2)"
    assert placements["layers.0.moe.router.gate.weight"] == "R"  # the router: 2 % of the weights
    assert totals["block_collectives"] == totals["block_optimum"]
    assert not messages, messages


def test_qwen3_moe_training_buffer_update_is_refused_by_name():
    """The load-balancing count is a buffer written in forward: not supported yet, and said so."""
    model = _qwen3(moe=True).train()
    ids = torch.randint(0, VOCAB, (2, 16))
    with pytest.raises(CaptureError, match="BUFFER_MUTATION of 'layers.0.moe.tokens_per_expert_E'"):
        autoshard(model, 2, example_inputs=(ids,))
