#!/usr/bin/env python
"""Beyond Hugging Face: model code from other libraries, sharded in the simulator and checked.

For each model (torchtitan 0.3's own Llama 3 / Qwen3 / Qwen3 MoE / DeepSeek-V3 and timm 1.0's ViT when they
are installed, `make test-models`; the small modules of tests/test_constructs.py that reproduce timm's fused
qkv, torchtitan's constructs and OLMo 2's q/k norm; HF OLMo 2 and Phi-3 from tiny configs):
the largest loss and gradient error against the unsharded model, collectives per block
(forward + backward) against the block optimum the report computes, and what stayed
replicated.

Usage (timm lives in .models-site, see the Makefile):
    OMP_NUM_THREADS=1 PYTHONPATH=.models-site .venv/bin/python benchmarks/architectures.py [--no-write]

Writes the section "## Beyond Hugging Face: numerical check and collectives per block" of
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import datetime as _dt
import re
import sys
import warnings
from pathlib import Path

import torch
from _results import machine, write_section

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "tests" / "models"))

SECTION = "## Beyond Hugging Face: numerical check and collectives per block"
# a tiny DeepSeek-V3: MLA needs as many KV heads as heads; the first layer dense, then MoE
DSV3 = dict(
    num_key_value_heads=4, rope_scaling=None, q_lora_rank=32, kv_lora_rank=16,
    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4,
    num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1, n_group=1,
    topk_group=1, attn_implementation="sdpa", use_cache=False,
)  # fmt: skip


def _run(model, inputs, tp: int, loss=lambda out: out.float().square().mean()):
    from nxd_autoshard import autoshard

    want = loss(model(*inputs))
    want.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sharded = autoshard(model, tp, example_inputs=inputs)
    got = loss(sharded(*inputs))
    got.backward()
    grads = sharded.gather_grads()
    grad_err = max((grads[n] - g).abs().max().item() for n, g in expected.items())
    report = sharded.explain()
    totals = report.totals
    replicated = sorted(
        {
            re.sub(r"^.*?\.\d+\.", "", p.name)  # the name inside its block
            for p in report.parameters
            if p.placement == "R" and p.block is not None and len(p.full_shape) >= 2
        }
    )
    warned = [str(w.message) for w in caught if "stay replicated" in str(w.message)]
    rows = sorted(
        {
            re.sub(r"^.*?\.\*\.", "", m.split("'")[1])
            for m in (str(w.message) for w in caught)
            if "split by rows, not columns" in m
        }
    )
    return {
        "loss_err": abs(got.item() - want.item()),
        "grad_err": grad_err,
        "blocks": totals["block_collectives"],
        "optimum": totals["block_optimum"],
        "replicated": replicated,
        "warned": len(warned),
        "rows": rows,
    }


def _models():
    """(name, tp, build) for every model this machine can build."""
    import test_constructs as c

    x = lambda: (torch.randn(2, 8, 32),)  # noqa: E731
    rows = [
        ("timm-style fused qkv (3, heads, head_dim)", 2, lambda: (c._Model("timm", kv_heads=4), x())),
        ("timm-style fused qkv (3, heads, head_dim)", 4, lambda: (c._Model("timm", kv_heads=4), x())),
        ("torchtitan-style complex rotary + enable_gqa", 2, lambda: (c._Model("titan"), x())),
        ("torchtitan-style complex rotary + enable_gqa (2 KV heads)", 4, lambda: (c._Model("titan"), x())),
        ("torchtitan-style fused q|k|v by KV group", 2, lambda: (c._Model("titan_fused"), x())),
        ("torchtitan-style fused q|k|v by KV group (2 KV groups)", 4, lambda: (c._Model("titan_fused"), x())),
        ("OLMo-2-style q/k norm over the whole width", 4, lambda: (c._Model("olmo2", kv_heads=4), x())),
        ("torchtitan-style experts under torch._grouped_mm (bf16)", 2, lambda: (c._MoE(torch.bfloat16), x())),
    ]  # fmt: skip
    from nxd_autoshard.tools.hf import build_model, random_batch

    def hf(model_type, **extra):
        def build():
            cfg = {
                "model_type": model_type, "vocab_size": 128, "hidden_size": 64,
                "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "max_position_embeddings": 64, "pad_token_id": 0,
                "bos_token_id": 1, "eos_token_id": 2, **extra,
            }  # fmt: skip
            model = build_model(cfg)
            args, kwargs = random_batch(model)
            return model, (args[0],)

        return build

    logits = lambda out: out.logits.float().square().mean()  # noqa: E731
    rows += [  # HF models (the title says HF: transformers' code, outside the families in tests)
        ("HF OLMo 2 (q/k norm over the projection width)", 2, hf("olmo2"), logits),
        ("HF OLMo 2 (2 KV heads)", 4, hf("olmo2"), logits),
        ("HF Phi-3 (fused q|k|v, GQA, unequal slices)", 2, hf("phi3"), logits),
        (
            "HF DeepSeek-V3 (MLA, keys filled through slices; MoE)",
            2,
            hf("deepseek_v3", **DSV3),
            logits,
        ),
    ]
    try:
        import conftest  # noqa: F401 - tests/models: makes PyPI's torchvision importable
        from timm.models.vision_transformer import VisionTransformer

        def vit(**kw):
            def make():
                config = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
                return VisionTransformer(**config, num_classes=10, mlp_ratio=2.0, **kw), (
                    torch.randn(2, 3, 32, 32),
                )

            return make

        rows += [
            ("timm ViT (fused qkv, class token)", 2, vit()),
            ("timm ViT (fused qkv, class token)", 4, vit()),
            ("timm ViT with q/k norm and LayerScale", 2, vit(qk_norm=True, init_values=0.1)),
        ]
    except ImportError:
        pass  # timm: `make test-models` (PYTHONPATH=.models-site)
    try:
        import test_torchtitan as t
        from torchtitan.models import deepseek_v3, llama3, qwen3
    except ImportError:
        return rows, False
    for module in (llama3, qwen3, deepseek_v3):
        module.get_attention_config = lambda backend: t._sdpa_config()

    def titan(build):
        def make():
            model = build()
            model.init_weights()
            return model, (torch.randint(0, t.VOCAB, (2, 16)),)

        return make

    rows += [
        ("torchtitan Llama 3", 2, titan(lambda: t._llama3(2, False))),
        ("torchtitan Llama 3 (2 KV heads)", 4, titan(lambda: t._llama3(2, False))),
        ("torchtitan Llama 3, fused qkv", 2, titan(lambda: t._llama3(2, True))),
        ("torchtitan Qwen3", 2, titan(lambda: t._qwen3(False))),
        ("torchtitan Qwen3 MoE (eval)", 2, titan(lambda: t._qwen3(True).eval())),
        (
            "torchtitan Qwen3 MoE (training: tokens_per_expert buffer)",
            2,
            titan(lambda: t._qwen3(True)),
        ),
        ("torchtitan DeepSeek-V3 (MLA, dense + MoE; training)", 2, titan(t._deepseek_v3)),
        ("torchtitan DeepSeek-V3 (MLA, dense + MoE; training)", 4, titan(t._deepseek_v3)),
    ]
    return rows, True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    rows, titan = _models()
    lines = [
        "| model | tp | loss err | max grad err | collectives per block (fwd, bwd) | optimum | "
        "replicated in blocks |",
        "|---|---:|---:|---:|---|---|---|",
    ]
    for row in rows:
        name, tp, build = row[:3]
        torch.manual_seed(0)
        model, inputs = build()
        kw = {"loss": row[3]} if len(row) > 3 else {}
        r = _run(model, inputs, tp, **kw)
        kept = ", ".join(r["replicated"]) or "-"
        if r["warned"]:
            kept += " (warned)"
        if r["rows"]:
            kept += f"; by rows, not columns: {', '.join(r['rows'])} (warned)"
        line = (
            f"| {name} | {tp} | {r['loss_err']:.1e} | {r['grad_err']:.1e} | "
            f"{', '.join(map(str, r['blocks']))} | {', '.join(map(str, r['optimum']))} | {kept} |"
        )
        print(line, flush=True)
        lines.append(line)
    body = "\n".join(
        [
            f"{_dt.date.today()}, {machine()}. `benchmarks/architectures.py`; simulator, one "
            "training step (loss = mean square of the output), every gradient gathered and "
            "compared with the unsharded model's.",
            "",
            *lines,
            "",
            "Optimum: Megatron's 2 all-reduces forward and 2 backward per dense block, plus one "
            "each way per statistic all-reduced by a norm over a sharded width, plus one "
            "backward per replicated weight read by each rank's own heads (a per-head q/k "
            "norm). Replicated KV projections (KV heads below tp) add the gradient gathers of "
            "their per-rank slices."
            + ("" if titan else " torchtitan and timm rows need `make test-models` first."),
        ]
    )
    if not args.no_write:
        write_section(SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
