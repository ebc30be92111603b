#!/usr/bin/env python
"""Activation checkpointing and bf16: peak memory per rank and collectives in backward, tp 2.

A Llama (hidden 256, 8 heads, intermediate 512, 4 layers, vocab 128) at batch 2 x seq 256,
sharded with ``autoshard(model, 2, activation_checkpointing=..., precision=...)`` on 2 gloo
processes. Per rank, one training step (forward + backward, after a warm-up step) runs under
``torch.distributed._tools.mem_tracker.MemTracker``, a dispatch mode that follows every tensor
storage (it counts the recompute in backward too); the table gives its peak, total and
activations (parameters and gradients excluded). "saved for backward" is what autograd's
``saved_tensors_hooks`` see during a forward: counted per saving op, weights and storages
shared by several ops again, so it can exceed the peak, and a checkpoint's own inputs are
held by the checkpoint, not by a hook; the peak is the figure that counts.

Collectives per layer are counted with the simulator's tracer (same program): those issued
during ``loss.backward()``, split into recomputed forward collectives and backward ones, as
(log with 4 layers - log with 2 layers) / 2. Megatron-LM's "TP + full recompute" re-runs each
layer's forward, so its 2 forward all-reduces are issued again in backward (2 + 2 + 2).

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/training.py [--no-write]

Writes the section "## Activation checkpointing and bf16 at tp 2" of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import copy
import json
import math
import warnings
from collections import Counter
from pathlib import Path

import torch
from _results import machine, write_section

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "tests" / "configs" / "llama.json"
SECTION = "## Activation checkpointing and bf16 at tp 2"
SIZES = dict(
    hidden_size=256,
    intermediate_size=512,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=512,
)
BATCH, SEQ = 2, 256
TRACED = "bf16 unsharded, traced sdpa path"
RUNS = [  # (tp, activation_checkpointing, reduce_dtype) of the bf16 curves
    (1, None, None),
    (2, None, None),
    (2, "full", None),
    (2, None, "fp32"),
    (4, None, None),
    (4, None, "fp32"),
]
SETUPS = [  # (attention, activation_checkpointing, precision)
    ("sdpa", None, "fp32"),
    ("sdpa", "selective", "fp32"),
    ("sdpa", "full", "fp32"),
    ("eager", None, "fp32"),
    ("eager", "selective", "fp32"),
    ("eager", "full", "fp32"),
    ("sdpa", None, "bf16"),
    ("sdpa", "full", "bf16"),
]


def _model(layers: int, attention: str):
    from nxd_autoshard.tools.hf import build_model

    cfg = json.loads(CONFIG.read_text())
    cfg.update(SIZES, num_hidden_layers=layers)
    model = build_model(cfg).train()
    model.config._attn_implementation = attention
    return model


def _zero_rank(rank, world, zero: bool):
    """Bytes of this rank's parameters, gradients and optimizer state after two AdamW steps of
    the tiny test Llama at tp 2 x dp 2, bf16 (fp32 masters), with or without ZeRO-1."""
    from nxd_autoshard import autoshard
    from nxd_autoshard.runtime.pipeline import chunk_batch
    from nxd_autoshard.tools.hf import build_model, random_batch

    model = build_model(json.loads(CONFIG.read_text())).train()
    args, kwargs = random_batch(model, batch=4)
    mine = chunk_batch(args, kwargs, 2)[rank // 2]  # this dp replica's half (tp fastest)
    sharded = autoshard(
        model, 2, dp=2, example_inputs=mine[0], example_kwargs=mine[1], precision="bf16"
    )
    opt = sharded.optimizer(torch.optim.AdamW, zero=zero, lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        sharded.train_step(*mine[0], **mine[1])
        opt.step()
    params = list(sharded.parameters())
    inner = opt.optim if zero else opt  # ZeroRedundancyOptimizer's local optimizer
    state = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]
    size = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    return {
        "params": size(params),
        "grads": size(p.grad for p in params),
        "state": size(state),
        "elements": sum(p.numel() for p in params),
    }


def _zero_rows() -> list[str]:
    """Per-rank memory at tp 2 x dp 2 (gloo), measured, and NxD's master-weight ZeRO-1 computed."""
    from nxd_autoshard.tools.launch import run_ranks

    rows = []
    for zero in (False, True):
        r = run_ranks(_zero_rank, 4, args=(zero,), timeout_s=1200)[0]
        total = r["params"] + r["grads"] + r["state"]
        name = "ZeRO-1 (ZeroRedundancyOptimizer)" if zero else "AdamW, no ZeRO"
        rows.append(
            f"| {name}, measured | {r['params'] / 2**10:.1f} KiB | {r['grads'] / 2**10:.1f} KiB | "
            f"{r['state'] / 2**10:.1f} KiB | {total / 2**10:.1f} KiB | "
            f"{total / r['elements']:.1f} |"
        )
    n = r["elements"]
    for grads, width in (("fp32", 4), ("bf16", 2)):  # bf16 compute copy, fp32 masters + Adam / dp
        params, state = 2 * n, (4 + 8) * n / 2
        total = params + width * n + state
        rows.append(
            f"| NxD ZeRO-1 with sharded fp32 masters, {grads} grads, computed (not built) | "
            f"{params / 2**10:.1f} KiB | {width * n / 2**10:.1f} KiB | {state / 2**10:.1f} KiB | "
            f"{total / 2**10:.1f} KiB | {total / n:.1f} |"
        )
    return rows


def _memory_rank(rank, world, setups):
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    from nxd_autoshard import autoshard
    from nxd_autoshard.tools.hf import random_batch

    rows = []
    for attention, mode, precision in setups:
        model = _model(4, attention)
        args, kwargs = random_batch(model, batch=BATCH, seq=SEQ)
        sharded = autoshard(
            model,
            2,
            example_inputs=args,
            example_kwargs=kwargs,
            activation_checkpointing=mode,
            precision=precision,
        )
        sharded.train_step(*args, **kwargs)  # warm-up: lazy state, first-call allocations
        sharded.zero_grad(set_to_none=True)
        saved = [0]

        def pack(t):
            saved[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            sharded(*args, **kwargs)  # what autograd keeps after a forward
        sharded.zero_grad(set_to_none=True)
        tracker = MemTracker()
        tracker.track_external(sharded)
        with tracker:
            loss = sharded.train_step(*args, **kwargs)
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
        rows.append(
            {
                "setup": (attention, mode, precision),
                "peak": peak["Total"],
                "act": peak[_MemRefType.ACT] + peak[_MemRefType.TEMP],
                "saved": saved[0],
                "loss": loss.item(),
            }
        )
    return rows


def _backward_collectives(layers: int, mode) -> Counter:
    from nxd_autoshard import autoshard
    from nxd_autoshard.runtime.simulator import trace_collectives
    from nxd_autoshard.tools.hf import random_batch

    model = _model(layers, "sdpa")
    args, kwargs = random_batch(model, batch=BATCH, seq=32)
    sharded = autoshard(
        model, 2, example_inputs=args, example_kwargs=kwargs, activation_checkpointing=mode
    )
    with trace_collectives() as log:
        out = sharded(*args, **kwargs)
        start = len(log)
        out.loss.backward()
    return Counter(
        ("recomputed " if phase == "forward" else "") + kind for kind, phase, _, _ in log[start:]
    )


def _per_layer(mode) -> dict[str, float]:
    two, four = _backward_collectives(2, mode), _backward_collectives(4, mode)
    return {k: (four[k] - two[k]) / 2 for k in sorted(four) if four[k] != two[k]}


def _curves(steps: int = 50, lr: float = 1e-3) -> dict[str, list[float]]:
    """AdamW loss curves on the tiny test Llama (batch 4 x 16): fp32 unsharded, the NxD bf16
    scheme unsharded (bf16 copy of fp32 masters, bf16 grads upcast), and autoshard
    precision="bf16" in the simulator at tp 1 and tp 2 (the latter with full checkpointing too)."""
    from nxd_autoshard import autoshard
    from nxd_autoshard.tools.hf import build_model, random_batch

    model = build_model(json.loads(CONFIG.read_text())).train()
    args, kwargs = random_batch(model, batch=4)
    curves: dict[str, list[float]] = {}
    fp32 = copy.deepcopy(model)
    opt = torch.optim.AdamW(fp32.parameters(), lr=lr)
    curves["fp32 unsharded"] = []
    for _ in range(steps):
        opt.zero_grad()
        loss = fp32(*args, **kwargs).loss
        loss.backward()
        opt.step()
        curves["fp32 unsharded"].append(loss.item())
    curves["bf16 unsharded"] = _bf16_unsharded(model, args, kwargs, steps, lr)
    # HF's sdpa path differs under tracing (a materialized causal mask and repeat_kv instead of
    # is_causal and enable_gqa): the same bf16 model on the path torch.export captures
    import transformers.masking_utils as masking

    skip = masking._ignore_causal_mask_sdpa
    masking._ignore_causal_mask_sdpa = lambda *a, **k: False
    try:
        curves[TRACED] = _bf16_unsharded(model, args, kwargs, steps, lr)
    finally:
        masking._ignore_causal_mask_sdpa = skip
    for tp, mode, reduce_dtype in RUNS:
        name = f"autoshard bf16 tp {tp}" + (f", checkpointing {mode}" if mode else "")
        name += ', reduce_dtype="fp32"' if reduce_dtype else ""
        sharded = autoshard(
            copy.deepcopy(model),
            tp,
            example_inputs=args,
            example_kwargs=kwargs,
            precision="bf16",
            reduce_dtype=reduce_dtype,
            activation_checkpointing=mode,
        )
        opt = sharded.optimizer(torch.optim.AdamW, lr=lr)
        curves[name] = []
        for _ in range(steps):
            opt.zero_grad()
            curves[name].append(sharded.train_step(*args, **kwargs).item())
            opt.step()
    return curves


def _bf16_unsharded(model, args, kwargs, steps: int, lr: float) -> list[float]:
    """NxD's bf16 scheme by hand: a bf16 copy of fp32 masters, its bf16 grads upcast, AdamW."""
    master, work = copy.deepcopy(model), copy.deepcopy(model).to(torch.bfloat16)
    opt = torch.optim.AdamW(master.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        with torch.no_grad():
            for w, p in zip(work.parameters(), master.parameters()):
                w.copy_(p)
                w.grad = None
        loss = work(*args, **kwargs).loss
        loss.backward()
        for w, p in zip(work.parameters(), master.parameters()):
            p.grad = w.grad.float()
        opt.step()
        losses.append(loss.item())
    return losses


def _first_step_gaps() -> list[str]:
    """Table rows: one bf16 step at tp 2 and 4 against tp 1 with the same reduce_dtype (loss,
    gradients), and the bytes per element of the summing collectives (simulator's log)."""
    from nxd_autoshard import autoshard
    from nxd_autoshard.runtime.simulator import trace_collectives
    from nxd_autoshard.tools.hf import build_model, random_batch

    model = build_model(json.loads(CONFIG.read_text())).train()
    args, kwargs = random_batch(model, batch=4)
    rows = []
    for reduce_dtype in (None, "fp32"):
        runs = {}
        for tp in (1, 2, 4):
            sharded = autoshard(
                copy.deepcopy(model),
                tp,
                example_inputs=args,
                example_kwargs=kwargs,
                precision="bf16",
                reduce_dtype=reduce_dtype,
            )
            with trace_collectives() as log:
                loss = sharded.train_step(*args, **kwargs)
            runs[tp] = (loss, sharded.gather_grads(), log)
        loss1, grads1, _ = runs[1]
        for tp in (2, 4):
            loss, grads, log = runs[tp]
            rel = max(
                ((grads[n] - g).abs().max() / g.abs().max()).item() for n, g in grads1.items()
            )
            differ = sum((grads[n] != g).sum().item() for n, g in grads1.items())
            total = sum(g.numel() for g in grads1.values())
            sums = [(s, n) for kind, _, s, n in log if kind == "all_reduce"]
            width = sum(n for _, n in sums) / sum(math.prod(s) for s, _ in sums)
            rows.append(
                f"| {reduce_dtype or 'None (bf16)'} | {tp} | {abs(loss - loss1).item():.1e} | "
                f"{rel:.2e} | {differ / total:.1%} | {width:.2f} | "
                f"{sum(n for _, n in sums) / 2**10:.0f} KiB |"
            )
    return rows


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-write", action="store_true")
    ns = parser.parse_args()
    warnings.filterwarnings("ignore")
    from nxd_autoshard.tools.launch import run_ranks

    ranks = run_ranks(_memory_rank, 2, args=(SETUPS,), timeout_s=1200)
    lines = [
        f"Llama hidden 256, 8 heads, 4 layers, batch {BATCH} x seq {SEQ}, tp 2 on gloo; "
        f"{machine()}. `python benchmarks/training.py`.",
        "",
        "Peak memory per rank over one training step (MemTracker; rank 0, rank 1 within "
        "0.1 MiB unless shown), against no checkpointing at the same attention and precision. "
        "'saved for backward': bytes autograd's saved_tensors_hooks see in a forward, per "
        "saving op (weights and shared storages counted again, a checkpoint's inputs not).",
        "",
        "| attention | checkpointing | precision | peak / rank | activations + temp at peak | "
        "saved for backward | vs no checkpointing | loss |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    base = {}
    for r0, r1 in zip(*ranks):
        attention, mode, precision = r0["setup"]
        if mode is None:
            base[(attention, precision)] = r0["peak"]
        ratio = r0["peak"] / base[(attention, precision)]
        peak = _mib(r0["peak"])
        if abs(r0["peak"] - r1["peak"]) > 0.1 * 2**20:
            peak += f" ({_mib(r1['peak'])})"
        lines.append(
            f"| {attention} | {mode or 'off'} | {precision} | {peak} | {_mib(r0['act'])} | "
            f"{_mib(r0['saved'])} | {ratio:.2f}x | {r0['loss']:.4f} |"
        )
    lines += [
        "",
        "Collectives issued during `loss.backward()`, per transformer layer (simulator, "
        "tp 2); regions are cut at the forward all-reduces, so the recompute issues none:",
        "",
        "| setup | per layer in backward | recomputed collectives |",
        "|---|---|---|",
        "| Megatron-LM TP (reference) | 2 all_reduce | 0 |",
        "| Megatron-LM TP + full recompute (reference) | 2 all_reduce + 2 recomputed "
        "all_reduce | 2 |",
    ]
    for mode in (None, "selective", "full"):
        per = _per_layer(mode)
        recomputed = sum(v for k, v in per.items() if k.startswith("recomputed"))
        shown = ", ".join(f"{v:g} {k}" for k, v in per.items()) or "none"
        lines.append(f"| ours, checkpointing {mode or 'off'} | {shown} | {recomputed:g} |")
    lines += [
        "",
        "The cost of issuing no collective again: per layer `full` keeps the block input and "
        "the attention all-reduce's output (2 activations of [b, s, h]) where Megatron keeps "
        "the block input only and re-runs both all-reduces.",
    ]
    curves = _curves()
    fp32, bf16 = torch.tensor(curves["fp32 unsharded"]), torch.tensor(curves["bf16 unsharded"])
    lines += [
        "",
        f"bf16 loss curves, 50 AdamW steps (lr 1e-3) on the tiny test Llama, batch 4 x 16 "
        f"(loss {fp32[0]:.3f} -> {fp32[-1]:.3f} in fp32); |delta| of the loss per step:",
        "",
        "| run | vs fp32 unsharded: max | mean | vs bf16 unsharded: max | mean | step 1 | "
        "vs traced-path bf16: max | step 1 | last loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    traced = torch.tensor(curves[TRACED])
    for name, curve in curves.items():
        if name == "fp32 unsharded":
            continue
        c = torch.tensor(curve)
        lines.append(
            f"| {name} | {(c - fp32).abs().max():.2e} | {(c - fp32).abs().mean():.2e} | "
            f"{(c - bf16).abs().max():.2e} | {(c - bf16).abs().mean():.2e} | "
            f"{(c - bf16).abs()[0]:.1e} | {(c - traced).abs().max():.2e} | "
            f"{(c - traced).abs()[0]:.1e} | {c[-1]:.4f} |"
        )
    lines += [
        "",
        "'bf16 unsharded' is NxD's scheme written out: a bf16 copy of fp32 master weights, "
        "its bf16 gradients upcast into the masters, AdamW on the masters. 'traced sdpa path' "
        "is the same model run eagerly on the attention path torch.export records (HF "
        "materializes the causal mask and repeats KV heads when tracing; eagerly it calls sdpa "
        "with is_causal and enable_gqa): autoshard at tp 1 follows it to 5e-7 over 50 steps, "
        "and its 1.3e-3 from 'bf16 unsharded' is the floor any bf16 round-off difference grows "
        'to within 50 steps here. reduce_dtype="fp32" takes step 1 from 1e-4 to under 1e-5; '
        "later steps are as far apart as any two bf16 runs that round differently somewhere.",
        "",
        "One bf16 step against autoshard at tp 1 with the same reduce_dtype (loss, every "
        "gradient), and the all-reduces' bytes per element and total (simulator log; the "
        "vocab-parallel loss reduces in fp32 either way):",
        "",
        "| reduce_dtype | tp | loss delta | grad max rel | grad elements differing | "
        "bytes / element | all-reduce bytes |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *_first_step_gaps(),
        "",
        "Per-rank parameter, gradient and optimizer-state bytes after two AdamW steps, tp 2 x dp 2 "
        "on gloo, precision bf16 (tiny test Llama, rank 0; the others within 0.5 KiB). The "
        "module's parameters are the fp32 masters and their gradients fp32 (NxD's "
        "use_fp32_grad_acc); ZeRO-1 shards AdamW's two fp32 moments over dp. Sharding the fp32 "
        "masters too (bf16 compute copies as parameters) would save nothing at dp 2 with fp32 "
        "gradients (2 + 4 + 12/2 = 12 bytes an element, as now); it pays with bf16 gradients or "
        "at larger dp (dp 8: 7.5 against 9 bytes), so it is not built (see the rows computed):",
        "",
        "| optimizer | parameters | gradients | optimizer state (+ masters) | total / rank | "
        "bytes / element |",
        "|---|---:|---:|---:|---:|---:|",
        *_zero_rows(),
    ]
    text = "\n".join(lines)
    print(text)
    if not ns.no_write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
