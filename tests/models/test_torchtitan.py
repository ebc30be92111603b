"""torchtitan 0.3's own model code (Llama 3, its GQA and fused-qkv variants, Qwen3, Qwen3 MoE,
DeepSeek-V3), tiny random configs built with its layer builders: loss and every gradient against the
unsharded model, and collectives per block against the optimum.

`make test-models` installs torchtitan (and what it imports at import time) first. Attention is
torchtitan's own ScaledDotProductAttention module: its language models default to
FlexAttention, which has no backward on CPU.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

titan = pytest.importorskip("torchtitan", reason="torchtitan is installed by `make test-models`")

from torchtitan.models import deepseek_v3, llama3, qwen3  # noqa: E402
from torchtitan.models.common import ComplexRoPE, CosSinRoPE, Embedding, Linear, RMSNorm  # noqa: E402
from torchtitan.models.common.attention import ScaledDotProductAttention  # noqa: E402

from nxd_autoshard import autoshard  # noqa: E402

VOCAB, DIM = 128, 64


@pytest.fixture(autouse=True)
def _sdpa(monkeypatch):
    for module in (llama3, qwen3, deepseek_v3):
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


def _deepseek_v3(kv_lora_rank: int = 16, q_lora_rank: int = 0):
    """MLA attention (q whole or through a low-rank wq_a), a dense first layer, then MoE layers
    with a shared expert. The default kv_lora_rank keeps the down projection wkv_a under 5 % of
    a block, as in the published model (0.7 % of DeepSeek-V3's dense layer)."""
    layers = deepseek_v3._build_dsv3_layers(
        n_layers=3, n_dense_layers=1, dim=DIM, n_heads=4, q_lora_rank=q_lora_rank,
        kv_lora_rank=kv_lora_rank, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        mscale=0.7, dense_hidden_dim=128, moe_hidden_dim=32, num_experts=4,
        num_shared_experts=1, router_top_k=2, router_score_func="softmax", attn_backend="sdpa",
        moe_comm_backend="standard", non_blocking_capacity_factor=None,
        rope=ComplexRoPE.Config(dim=8, max_seq_len=64, theta=10000.0, scaling="none"),
    )  # fmt: skip
    return deepseek_v3.DeepSeekV3Model.Config(
        vocab_size=VOCAB,
        dim=DIM,
        tok_embeddings=Embedding.Config(
            num_embeddings=VOCAB, embedding_dim=DIM, param_init=deepseek_v3._EMBEDDING_INIT
        ),
        norm=RMSNorm.Config(normalized_shape=DIM, param_init=deepseek_v3._NORM_INIT),
        lm_head=Linear.Config(
            in_features=DIM, out_features=VOCAB, param_init=deepseek_v3._output_linear_init(DIM)
        ),
        layers=layers,
    ).build()


def _check(model, tp: int, reference=None):
    """Sharded (simulator) vs unsharded: loss, every gradient and every buffer after the call
    (run on `reference`, a copy, when the forward writes buffers); the report and the warnings."""
    if reference is None:
        model.init_weights()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    ref = model if reference is None else reference
    want = ref(ids).float().square().mean()
    want.backward()
    expected = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}
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
    for name, buffer in ref.named_buffers():
        torch.testing.assert_close(sharded.get_buffer(name), buffer, msg=name)
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


def test_qwen3_moe_training_counts_tokens_per_expert_as_unsharded():
    """Training mode: the load-balancing count is a buffer written in forward; after the call the
    sharded module's count equals the unsharded model's, with loss and every gradient."""
    torch.manual_seed(0)
    model = _qwen3(moe=True).train()
    model.init_weights()
    reference = copy.deepcopy(model)
    totals, placements, messages = _check(model, 2, reference=reference)
    counts = {n: b for n, b in reference.named_buffers() if "tokens_per_expert" in n}
    assert counts and all(int(b.sum()) > 0 for b in counts.values())
    assert totals["block_collectives"] == totals["block_optimum"]
    assert not messages, messages


def _training(model):
    """A model in training mode (its MoE counts tokens per expert into a buffer) and its copy."""
    model.train()
    model.init_weights()
    return model, copy.deepcopy(model)


@pytest.mark.parametrize(
    "tp,q_lora_rank", [(2, 0), (4, 0), (2, 16)], ids=["tp2", "tp4", "tp2-wq_a"]
)
def test_deepseek_v3_at_the_optimum(tp, q_lora_rank):
    """MLA's down projections (wkv_a, wq_a) and the routers stay whole, as in Megatron; the
    up projections split by heads, experts by their hidden dim."""
    torch.manual_seed(0)
    model, reference = _training(_deepseek_v3(q_lora_rank=q_lora_rank))
    totals, placements, messages = _check(model, tp, reference=reference)
    attention = "layers.1.attention"
    assert placements[f"{attention}.wkv_a.weight"] == "R"
    assert placements[f"{attention}.wkv_b.weight"] == "S(0)"
    assert placements[f"{attention}.wo.weight"] == "S(1)"
    if q_lora_rank:
        assert placements[f"{attention}.wq_a.weight"] == "R"
        assert placements[f"{attention}.wq_b.weight"] == "S(0)"
    experts = "layers.1.moe.routed_experts.inner_experts"
    assert placements[f"{experts}.w1_EFD"] == "S(1)" and placements[f"{experts}.w2_EDF"] == "S(2)"
    assert placements["layers.0.feed_forward.w1.weight"] == "S(0)"
    assert totals["block_collectives"] == totals["block_optimum"]
    assert not messages, messages


def test_deepseek_v3_large_kv_down_projection_split_by_rows_is_warned():
    """A wkv_a above 5 % of its block is split by rows once kv_norm undoes its column split: the
    norm then runs on every rank and the pieces of its Partial output are all-reduced, which the
    plan warns about and explain() counts against the optimum (never silent)."""
    torch.manual_seed(0)
    model, reference = _training(_deepseek_v3(kv_lora_rank=32))
    totals, placements, messages = _check(model, 2, reference=reference)
    assert placements["layers.1.attention.wkv_a.weight"] == "S(1)"
    assert any("wkv_a" in m and "split by rows" in m and "kv_norm" in m for m in messages)
    assert totals["extra_over_optimum"] > 0
