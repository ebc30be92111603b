"""Constructs from model code outside Hugging Face, each in a small module written as the library
writes it: loss and every gradient equal to the unsharded model, and the plan at the optimum
(or the replication NxD would choose, shown and warned about as the plan says).

torchtitan 0.3: sdpa with enable_gqa, complex rotary (view_as_complex / view_as_real, flatten),
fused q|k|v grouped by KV head, experts as raw [E, out, in] parameters under torch._grouped_mm; HF
Llama 4: experts as raw [E, in, out] parameters under torch.bmm; timm 1.0: a fused qkv reshaped to
(B, N, 3, heads, head_dim);
OLMo 2: q/k RMSNorm over the whole projection width.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from nxd_autoshard import autoshard


class _RMSNorm(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(width))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def _rotary(x, freqs):
    """torchtitan's apply_rotary_emb: pairs of features as complex numbers times freqs_cis."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs[None, :, None, :]).flatten(3).type_as(x)


class _Attention(torch.nn.Module):
    """One attention of the kinds named by `kind`, then an MLP: a transformer block."""

    def __init__(self, kind: str, dim: int = 32, heads: int = 4, kv_heads: int = 2):
        super().__init__()
        self.kind, self.heads, self.kv_heads, self.hd = kind, heads, kv_heads, dim // heads
        kv = kv_heads * self.hd
        if kind in ("titan_fused", "timm"):
            width = 3 * dim if kind == "timm" else dim + 2 * kv
            self.wqkv = torch.nn.Linear(dim, width, bias=kind == "timm")
        else:
            self.wq = torch.nn.Linear(dim, dim, bias=False)
            self.wk = torch.nn.Linear(dim, kv, bias=False)
            self.wv = torch.nn.Linear(dim, kv, bias=False)
        if kind == "olmo2":
            self.q_norm, self.k_norm = _RMSNorm(dim), _RMSNorm(kv)
        self.wo = torch.nn.Linear(dim, dim, bias=False)
        self.norm1, self.norm2 = _RMSNorm(dim), _RMSNorm(dim)
        self.w1 = torch.nn.Linear(dim, 2 * dim, bias=False)
        self.w2 = torch.nn.Linear(2 * dim, dim, bias=False)
        self.register_buffer(
            "freqs", torch.polar(torch.ones(8, self.hd // 2), torch.randn(8, self.hd // 2))
        )

    def _qkv(self, x):
        b, s, _ = x.shape
        if self.kind == "timm":  # timm's Attention.forward
            qkv = self.wqkv(x).reshape(b, s, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
            return qkv.unbind(0)
        if self.kind == "titan_fused":  # torchtitan's FusedQKVLinear: grouped by KV head
            r = self.heads // self.kv_heads + 2
            qkv = self.wqkv(x).view(b, s, -1, r, self.hd)
            q, k, v = qkv.split([r - 2, 1, 1], dim=3)
            q = q.reshape(b, s, -1, self.hd)
            k, v = k.squeeze(3), v.squeeze(3)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
            if self.kind == "olmo2":
                q, k = self.q_norm(q), self.k_norm(k)
            q, k, v = (t.view(b, s, -1, self.hd) for t in (q, k, v))
        q, k = _rotary(q, self.freqs[:s]), _rotary(k, self.freqs[:s])
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self._qkv(self.norm1(x))
        gqa = k.shape[1] != q.shape[1]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        x = x + self.wo(out.transpose(1, 2).reshape(b, s, d))
        return x + self.w2(F.silu(self.w1(self.norm2(x))))


class _Model(torch.nn.Module):
    def __init__(self, kind: str, **kw):
        super().__init__()
        self.layers = torch.nn.ModuleList([_Attention(kind, **kw) for _ in range(2)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _check(model, tp: int, **tolerance):
    """Sharded vs unsharded: loss, every gradient; the report and the warnings."""
    x = torch.randn(2, 8, 32)
    want = model(x).square().mean()
    want.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sharded = autoshard(model, tp, example_inputs=(x,))
    got = sharded(x).square().mean()
    got.backward()
    torch.testing.assert_close(got, want, **tolerance)
    for name, grad in sharded.gather_grads().items():
        torch.testing.assert_close(grad, expected[name], msg=name, **tolerance)
    report = sharded.explain()
    placements = {p.name: str(p.placement) for p in report.parameters}
    messages = [str(w.message) for w in caught if "nxd-autoshard" in str(w.message)]
    return report.totals, placements, messages


OPTIMUM = [[2, 2]]  # per dense block: 2 all-reduces forward, 2 backward


@pytest.mark.parametrize(
    "kind, kv_heads, tp",
    [
        ("titan", 2, 2),  # complex rotary, enable_gqa
        ("titan_fused", 2, 2),
        ("timm", 4, 2),
        ("timm", 4, 4),
    ],
)
def test_sharded_at_the_optimum(kind, kv_heads, tp):
    torch.manual_seed(0)
    totals, placements, messages = _check(_Model(kind, kv_heads=kv_heads), tp)
    assert totals["block_collectives"] == OPTIMUM, totals
    assert totals["replicated_block_matmuls"] == 0
    assert not [m for m in messages if "replicated" in m], messages


def test_query_heads_split_when_kv_heads_do_not():
    """torchtitan's GQA at tp 4 with 2 KV heads: wq and wo split, wk and wv are replicated as
    NxD does (no warning, no DivisibilityError), sliced per rank for the repeated KV heads."""
    torch.manual_seed(0)
    totals, placements, messages = _check(_Model("titan", kv_heads=2), 4)
    assert placements["layers.0.wq.weight"] == "S(0)" and placements["layers.0.wk.weight"] == "R"
    assert placements["layers.0.wo.weight"] == "S(1)"
    assert totals["block_collectives"] == [[2, 4]]  # + the two KV slices' gradient gathers
    assert not [m for m in messages if "stay replicated" in m], messages


def test_fused_qkv_whose_heads_do_not_split_splits_by_rows():
    """torchtitan's fused q|k|v is grouped by KV head: 2 groups do not split over 4 ranks, so
    the fused projection's column split is undone (in both layers) and it splits by rows: its
    input sliced per rank, its output all-reduced; the rest of the block splits as usual."""
    torch.manual_seed(0)
    totals, placements, messages = _check(_Model("titan_fused", kv_heads=2), 4)
    assert placements["layers.0.wqkv.weight"] == placements["layers.1.wqkv.weight"] == "S(1)"
    assert placements["layers.0.w1.weight"] == "S(0)"
    assert totals["replicated_block_matmuls"] == 0
    assert len(totals["block_collectives"]) == 1  # identical blocks, identical plans
    # sharded, but the attention runs on all heads on every rank: said once, for both layers
    assert len(messages) == 1 and "'layers.*.wqkv' (2 matmul(s)) split by rows" in messages[0]
    assert "split_with_sizes" in messages[0]
    # against Megatron's optimum (2 + 2), not this plan's own: one all-reduce each way more
    assert totals["block_optimum"] == [[2, 2]]


@pytest.mark.parametrize("tp", [2, 4])
def test_qk_norm_over_the_whole_width_all_reduces_only_its_statistic(tp):
    """OLMo 2: the q/k RMSNorm's mean over a sharded width is a local mean and an all-reduce of
    a [b, s, 1] tensor; its weight is stored sharded."""
    torch.manual_seed(0)
    totals, placements, messages = _check(_Model("olmo2", kv_heads=4), tp)
    assert placements["layers.0.q_norm.weight"] == "S(0)"
    assert totals["block_collectives"] == totals["block_optimum"] == [[4, 4]]
    assert not messages, messages


class _Experts(torch.nn.Module):
    """torchtitan's GroupedExperts: tokens sorted by their expert, one torch._grouped_mm per
    projection over raw [experts, out, in] parameters (cast to `dtype` for the product)."""

    def __init__(self, dtype, dim: int = 32, hidden: int = 64, experts: int = 4):
        super().__init__()
        self.dtype, self.experts = dtype, experts
        self.router = torch.nn.Linear(dim, experts, bias=False)
        self.w1 = torch.nn.Parameter(0.2 * torch.randn(experts, hidden, dim))
        self.w2 = torch.nn.Parameter(0.2 * torch.randn(experts, dim, hidden))

    def _mm(self, x, w, offsets):
        if self.dtype is not None:
            x, w = x.to(self.dtype), w.to(self.dtype)
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets)

    def forward(self, x):
        b, s, d = x.shape
        flat = x.reshape(-1, d)
        scores = self.router(flat).softmax(-1)
        top, choice = scores.max(-1)
        order = choice.argsort(stable=True)
        counts = torch.histc(choice.float(), bins=self.experts, min=0, max=self.experts - 1)
        offsets = counts.cumsum(0).to(torch.int32)
        h = F.silu(self._mm(flat[order], self.w1, offsets))
        out = self._mm(h, self.w2, offsets).type_as(x) * top[order, None]
        index = order[:, None].expand(-1, d)
        return x + torch.zeros_like(flat).scatter(0, index, out).reshape(b, s, d)


class _MoE(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.layers = torch.nn.ModuleList([_Experts(dtype) for _ in range(2)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _grouped_mm_runs_here() -> bool:
    try:
        w = torch.ones(1, 8, 8, dtype=torch.bfloat16).transpose(-2, -1)
        torch._grouped_mm(torch.ones(2, 8, dtype=w.dtype), w, offs=torch.tensor([2]).int())
    except (RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.skipif(not _grouped_mm_runs_here(), reason="torch._grouped_mm has no CPU kernel")
def test_experts_under_grouped_mm_split_like_megatron_experts():
    """Each expert's w1 splits by columns and w2 by rows (the router, 2 % of the weights, stays
    whole): before, the raw 3-D parameters stayed replicated and no report counted them. The
    product is in bf16, as torchtitan's (torch._grouped_mm's meta kernel takes bf16 only)."""
    torch.manual_seed(0)
    totals, placements, messages = _check(_MoE(torch.bfloat16), 2, rtol=2e-2, atol=2e-2)
    assert placements["layers.0.w1"] == "S(1)" and placements["layers.0.w2"] == "S(2)"
    assert totals["replicated_block_matmuls"] == 2  # the routers
    assert not messages, messages


def test_hf_deepseek_v3_equal_and_its_mla_down_projection_kept_whole():
    """HF DeepSeek-V3 (MLA: keys filled through slices of a `new_empty` buffer; a dense layer,
    then MoE): every gradient equal, q_b split by heads, the low-rank q_a before its norm kept
    whole (as Megatron's MLA), no warning."""
    from nxd_autoshard.tools.verify import verify_config

    config = {
        "model_type": "deepseek_v3", "vocab_size": 128, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "max_position_embeddings": 64, "pad_token_id": 0,
        "bos_token_id": 1, "eos_token_id": 2, "rope_scaling": None, "q_lora_rank": 32,
        "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
        "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "use_cache": False,
        "attn_implementation": "sdpa",
    }  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checks = verify_config(config, 2, world="sim")
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    assert not [str(w.message) for w in caught if "nxd-autoshard" in str(w.message)]


class _BatchedExperts(torch.nn.Module):
    """HF Llama 4's MoE: every token goes to every expert, scaled by its router score (0 unless in
    its top 2),
    one torch.bmm per projection over raw [experts, in, out] parameters, gate|up fused."""

    def __init__(self, dim: int = 32, hidden: int = 32, experts: int = 4):
        super().__init__()
        self.experts = experts
        self.router = torch.nn.Linear(dim, experts, bias=False)
        self.gate_up_proj = torch.nn.Parameter(0.2 * torch.randn(experts, dim, 2 * hidden))
        self.down_proj = torch.nn.Parameter(0.2 * torch.randn(experts, hidden, dim))

    def forward(self, x):
        b, s, d = x.shape
        flat = x.reshape(-1, d)
        logits = self.router(flat)
        top, chosen = logits.topk(2, dim=1)
        scores = torch.full_like(logits, float("-inf")).scatter(1, chosen, top)
        scores = scores.transpose(0, 1).sigmoid()  # [experts, tokens], 0 where not chosen
        routed = flat.repeat(self.experts, 1) * scores.reshape(-1, 1)
        gate, up = torch.bmm(routed.view(self.experts, -1, d), self.gate_up_proj).chunk(2, -1)
        out = torch.bmm(up * F.silu(gate), self.down_proj)
        return x + out.sum(0).reshape(b, s, d)


@pytest.mark.parametrize("tp", [2, 4])
def test_batched_experts_split_gate_up_by_columns_and_down_by_rows(tp):
    """Llama 4's bmm experts: gate_up_proj splits its out dim (gate and up halves each split,
    blocks=2) and down_proj its in dim, one all-reduce each way per layer; only the router
    (a few % of the weights) stays whole. Before, both 3-D parameters stayed replicated and the
    warning named an empty weight shape."""
    torch.manual_seed(0)
    model = _MoE(None)
    model.layers = torch.nn.ModuleList([_BatchedExperts(), _BatchedExperts()])
    totals, placements, messages = _check(model, tp)
    assert placements["layers.0.gate_up_proj"] == placements["layers.1.gate_up_proj"] == "S(2)"
    assert placements["layers.0.down_proj"] == placements["layers.1.down_proj"] == "S(1)"
    assert totals["block_collectives"] == [[1, 1]]
    assert totals["replicated_block_matmuls"] == 2  # the routers
    assert not messages, messages


@torch.library.custom_op("nxdtest::project", mutates_args=())
def _project(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A library's own kernel for x @ w.T, which no sharding rule knows."""
    return x @ w.T


@_project.register_fake
def _(x, w):
    return x.new_empty(*x.shape[:-1], w.shape[0])


_project.register_autograd(
    lambda ctx, grad: (grad @ ctx.w, grad.flatten(0, -2).T @ ctx.x.flatten(0, -2)),
    setup_context=lambda ctx, inputs, output: (
        ctx.save_for_backward() or setattr(ctx, "x", inputs[0]) or setattr(ctx, "w", inputs[1])
    ),
)


class _CustomKernelBlock(torch.nn.Module):
    def __init__(self, dim: int = 32):
        super().__init__()
        self.up = torch.nn.Linear(dim, 2 * dim, bias=False)
        self.down = torch.nn.Linear(2 * dim, dim, bias=False)
        self.mix = torch.nn.Parameter(0.1 * torch.randn(dim, dim))

    def forward(self, x):
        x = x + self.down(F.silu(self.up(x)))
        return x + _project(x, self.mix)


def test_a_weight_read_by_an_op_without_a_rule_is_named_as_replicated():
    """A custom kernel (torch.library) reading a weight inside the blocks has no rule: it runs
    whole on every rank, equal, and the warning names the op and the weight, once for both
    layers (before, its weight stayed whole with no word: only products were looked at)."""
    torch.manual_seed(0)
    model = _MoE(None)
    model.layers = torch.nn.ModuleList([_CustomKernelBlock(), _CustomKernelBlock()])
    totals, placements, messages = _check(model, 2)
    assert placements["layers.0.up.weight"] == "S(0)" and placements["layers.0.mix"] == "R"
    replicated = [m for m in messages if "stay replicated" in m]
    assert len(replicated) == 1, messages
    assert "'layers.*'" in replicated[0] and "nxdtest.project.default" in replicated[0]
    assert "mix [32 x 32]" in replicated[0]
    x = torch.randn(2, 8, 32)
    with pytest.raises(Exception, match="nxdtest.project"):
        autoshard(model, 2, example_inputs=(x,), strict=True)(x)


class _ChunkedAndStrided(torch.nn.Module):
    """One fused output read two ways: chunked into halves (blocks) and every other column (a
    contiguous layout): no one split fits both, so one of them must give way."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.fused = torch.nn.Linear(dim, 2 * dim, bias=False)
        self.out = torch.nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        y = self.fused(x)
        a, b = y.chunk(2, -1)
        return x + self.out(a * b + y[..., ::2])


@pytest.mark.parametrize("tp", [2, 4])
def test_a_fused_output_chunked_and_strided_is_equal(tp):
    torch.manual_seed(0)
    model = _MoE(None)
    model.layers = torch.nn.ModuleList([_ChunkedAndStrided(), _ChunkedAndStrided()])
    _check(model, tp)


def _equal_and_quiet(config: dict) -> None:
    """An HF model from `config`: loss, outputs and every gradient equal at tp 2, no warning."""
    from nxd_autoshard.tools.verify import verify_config

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checks = verify_config(config, 2, world="sim", seq=8)
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    assert not [w for w in caught if "nxd-autoshard" in str(w.message)]


def test_hf_gpt_oss_experts_split_like_megatron_experts():
    """HF GPT-OSS: experts stored [E, in, out] under transformers' grouped_mm_fallback, gate and
    up interleaved (`gate_up[..., ::2]`, `[..., 1::2]`), per-expert biases gathered by expert id:
    gate_up by columns, down by rows, 2 all-reduces forward per layer; before, every expert
    weight stayed whole with no warning (the op had no rule and was not counted)."""
    from nxd_autoshard.tools.hf import build_model, random_batch

    config = {
        "model_type": "gpt_oss", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "num_local_experts": 4, "num_experts_per_tok": 2,
        "max_position_embeddings": 64, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
        "layer_types": ["sliding_attention", "full_attention"], "rope_scaling": None,
    }  # fmt: skip
    _equal_and_quiet(config)
    model = build_model(config, seed=0)
    args, kwargs = random_batch(model, batch=2, seq=8, seed=1)
    sharded = autoshard(model, 2, example_inputs=args, example_kwargs=kwargs)
    experts = "model.layers.0.mlp.experts"
    assert str(sharded.placements[f"{experts}.gate_up_proj"]) == "S(2)"
    assert str(sharded.placements[f"{experts}.down_proj"]) == "S(1)"
    assert sharded.explain().totals["block_collectives"][0][0] == 2


def test_hf_granitemoe_whose_output_holds_a_cache_even_without_use_cache():
    """HF GraniteMoe returns a DynamicCache (`cache`) even with use_cache=False, which
    torch.export cannot carry out (a CaptureError before): the capture drops inference caches
    from the output. Its attention concatenates an empty 1-D tensor with the keys (torch.cat
    skips it), which asked for a shard of the empty tensor on dim 1 (an IndexError)."""
    config = {
        "model_type": "granitemoe", "vocab_size": 64, "hidden_size": 32,
        "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
        "max_position_embeddings": 64, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
    }  # fmt: skip
    _equal_and_quiet(config)
