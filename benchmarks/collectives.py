#!/usr/bin/env python
"""Collectives per transformer layer at tp 8, counted with the simulator (one process).

For every tiny HF config in tests/configs (sizes overridden so that tp=8 divides the heads:
hidden 128, 8 heads, 8 kv heads, intermediate 256, vocab 256) plus a GQA Llama (8 heads,
2 kv heads, so k/v cannot be split 8 ways and are replicated), this builds the model,
calls ``autoshard(model, 8, ...)`` without a process group, and runs one training step
(forward + ``loss.backward()``) under ``trace_collectives``.

* Totals are those of the 4-layer model.
* Per transformer layer = (log with 4 layers - log with 2 layers) / 2, as a multiset of
  (kind, phase, shape, bytes), so embedding / head / loss collectives cancel out.
* Non-layer collectives = 2 * log(2 layers) - log(4 layers) (what is left at 0 layers).

The reference is Megatron-LM's optimum for a dense layer: 2 all-reduces forward (after the
attention output and MLP down projections) and 2 backward (the conjugate ``f`` before the
qkv and up/gate projections).

"bytes/rank" is the tracer's column: the size of the tensor each rank contributes
(for all_reduce the full activation, for all_gather the local shard). "ring bytes/rank"
is what a ring algorithm sends per rank: 2(n-1)/n * size for all_reduce,
(n-1) * shard for all_gather, (n-1)/n * size for reduce_scatter.

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/collectives.py [--no-write]

Writes the section "## Collectives per transformer layer at tp 8" of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import datetime as _dt
import json
import platform
import re
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from _results import write_section  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CONFIGS = REPO / "tests" / "configs"
RESULTS_MD = HERE / "RESULTS.md"
SECTION = "## Collectives per transformer layer at tp 8"

TP = 8
VOCAB = 256
HIDDEN = 128
BATCH, SEQ = 2, 16
LAYERS = (2, 4)  # per-layer = difference / 2; totals from the larger one

_LLAMA_LIKE = dict(
    hidden_size=HIDDEN, num_attention_heads=8, num_key_value_heads=8, intermediate_size=256
)
_IDS = dict(max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# (row name, config file, overrides). Dropout is set to 0 so that train mode is deterministic.
CASES = [
    ("llama", "llama", _LLAMA_LIKE),
    ("mistral", "mistral", _LLAMA_LIKE),
    ("qwen2", "qwen2", _LLAMA_LIKE),
    (
        "gpt2",
        "gpt2",
        dict(n_embd=HIDDEN, n_head=8, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    ),
    (
        "gpt_neox",
        "gpt_neox",
        dict(hidden_size=HIDDEN, num_attention_heads=8, intermediate_size=256),
    ),
    (
        "bert",
        "bert",
        dict(
            hidden_size=HIDDEN,
            num_attention_heads=8,
            intermediate_size=256,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        ),
    ),
    ("llama GQA (8 q / 2 kv heads)", "llama", dict(_LLAMA_LIKE, num_key_value_heads=2)),
    # architectures with no plan file (auto plan); file None: the overrides are the whole config
    ("phi3 (fused qkv, gate_up; auto)", None, dict(_LLAMA_LIKE, model_type="phi3", **_IDS)),
    (
        "falcon (x @ W.T, parallel attn+MLP; auto)",
        None,
        dict(
            model_type="falcon",
            hidden_size=HIDDEN,
            num_attention_heads=8,
            multi_query=False,
            new_decoder_architecture=False,
            **_IDS,
        ),
    ),
    (
        "mixtral (4 experts, top 2; auto)",
        None,
        dict(_LLAMA_LIKE, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, **_IDS),
    ),
]

MEGATRON_FWD = Counter({"all_reduce": 2})
MEGATRON_BWD = Counter({"all_reduce": 2})


# --------------------------------------------------------------------------- running


def make_config(file: str, overrides: dict, layers: int) -> dict:
    cfg = json.loads((CONFIGS / f"{file}.json").read_text()) if file else {}
    cfg.update(overrides)
    cfg["vocab_size"] = VOCAB
    cfg["n_layer" if cfg["model_type"] == "gpt2" else "num_hidden_layers"] = layers
    return cfg


def trace_step(cfg: dict) -> dict:
    """One simulated tp-8 training step; returns the collective log and correctness numbers."""
    from nxd_autoshard import autoshard
    from nxd_autoshard.runtime.simulator import trace_collectives
    from nxd_autoshard.tools.hf import build_model

    model = build_model(cfg, seed=0)
    model.train()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=gen)
    # nxd_autoshard.tools.hf.random_batch returns no labels for transformers-5 models (their
    # forward is wrapped, so forward.__code__ has no 'labels'); make them here.
    labels = torch.randint(3, VOCAB, (BATCH, SEQ), generator=gen)

    ref = model(ids, labels=labels)
    ref.loss.backward()
    ref_grads = {
        n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None
    }
    model.zero_grad(set_to_none=True)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sharded = autoshard(model, TP, example_inputs=(ids,), example_kwargs={"labels": labels})
        with trace_collectives() as log:
            out = sharded(ids, labels=labels)
            out.loss.backward()
    fallbacks = sorted({str(w.message) for w in caught if "nxd-autoshard" in str(w.message)})

    grad_err = 0.0
    for n, p in model.named_parameters():  # simulator grads land on the full parameters
        if n in ref_grads and p.grad is not None:
            grad_err = max(grad_err, float((p.grad - ref_grads[n]).abs().max()))
    replicated = sorted(
        n
        for n, pl in sharded.placements.items()
        if type(pl).__name__ == "Replicate"
        and n.endswith("weight")
        and any(k in n for k in ("proj", "query", "key", "value", "attn", "dense", "fc"))
        and "norm" not in n.lower()
    )
    return {
        "log": [tuple(e) for e in log],
        "loss": float(out.loss.detach()),
        "ref_loss": float(ref.loss.detach()),
        "grad_err": grad_err,
        "fallbacks": fallbacks,
        "replicated_matmul_weights": replicated,
    }


def key_counter(log) -> Counter:
    return Counter((k, ph, tuple(shape), b) for k, ph, shape, b in log)


def ring_bytes(kind: str, nbytes: int) -> float:
    n = TP
    if kind.startswith("all_reduce"):
        return 2 * (n - 1) / n * nbytes
    if kind == "all_gather":
        return (n - 1) * nbytes
    if kind == "reduce_scatter":
        return (n - 1) / n * nbytes
    return float(nbytes)


def summarize(counter: Counter, scale: float = 1.0) -> dict:
    """Counts by kind and bytes for forward / backward of a (key -> multiplicity) counter."""
    out = {}
    for phase in ("forward", "backward"):
        kinds: Counter = Counter()
        nbytes = ring = 0.0
        for (k, ph, _shape, b), c in counter.items():
            if ph != phase:
                continue
            kinds[k] += c * scale
            nbytes += c * b * scale
            ring += c * ring_bytes(k, b) * scale
        out[phase] = {"kinds": kinds, "n": sum(kinds.values()), "bytes": nbytes, "ring": ring}
    return out


def label_nonlayer(kind: str, phase: str, shape: tuple) -> str:
    numel = 1
    for s in shape:
        numel *= s
    activation = numel == BATCH * SEQ * HIDDEN
    if kind == "all_reduce(max)" or (
        kind == "all_reduce" and len(shape) == 1 and shape[0] == BATCH * SEQ
    ):
        return "loss: vocab-parallel cross-entropy (max, sum-exp, target logit)"
    if kind == "all_gather" and phase == "forward" and shape[-1] == VOCAB // TP:
        return "logits gather: vocab-sharded logits -> full `out.logits`"
    if kind == "all_reduce" and phase == "forward" and activation:
        return "embedding: sum of the vocab-parallel lookup"
    if kind == "all_reduce" and phase == "backward" and activation:
        return "head input: grad all-reduce before the vocab-sharded output projection"
    if kind == "all_gather" and phase == "backward" and shape == (VOCAB // TP,):
        return "head bias: replicated output bias added to vocab-sharded logits (backward gather)"
    return "other"


def fmt_kinds(kinds: Counter) -> str:
    if not kinds:
        return "-"
    order = ["all_reduce", "all_gather", "reduce_scatter", "all_reduce(max)"]
    keys = sorted(kinds, key=lambda k: order.index(k) if k in order else 99)
    parts = []
    for k in keys:
        v = kinds[k]
        v = int(v) if float(v).is_integer() else round(v, 2)
        parts.append(f"{v} {k}")
    return ", ".join(parts)


def fmt_bytes(b: float) -> str:
    if b >= 1 << 20:
        return f"{b / (1 << 20):.2f} MiB"
    if b >= 1 << 10:
        return f"{b / 1024:.1f} KiB"
    return f"{b:.0f} B"


def verdict(per_layer: dict) -> str:
    fwd, bwd = per_layer["forward"]["kinds"], per_layer["backward"]["kinds"]
    if +fwd == MEGATRON_FWD and +bwd == MEGATRON_BWD:
        return "= Megatron optimum"
    extra = []
    for phase, got, ref in (("fwd", fwd, MEGATRON_FWD), ("bwd", bwd, MEGATRON_BWD)):
        diff = Counter(got)
        diff.subtract(ref)
        for k, v in diff.items():
            if v:
                extra.append(f"{v:+g} {k} {phase}")
    return "; ".join(extra)


# ---------------------------------------------------------------------------- report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.monotonic()

    rows, nonlayer_rows, notes, failures = [], [], [], []
    ok = True
    for name, file, overrides in CASES:
        try:
            runs = {L: trace_step(make_config(file, overrides, L)) for L in LAYERS}
        except Exception as err:  # report and continue with the other families
            import traceback

            tb = traceback.format_exc()
            print(f"----- {name} failed -----\n{tb}", file=sys.stderr)
            failures.append((name, f"{type(err).__name__}: {err}".splitlines()[0]))
            ok = False
            continue
        lo, hi = LAYERS
        c_lo, c_hi = key_counter(runs[lo]["log"]), key_counter(runs[hi]["log"])
        diff = Counter(c_hi)
        diff.subtract(c_lo)
        per_layer = summarize(+diff, scale=1.0 / (hi - lo))
        # what is left at 0 layers: (hi*c_lo - lo*c_hi) / (hi-lo), i.e. 2*C2 - C4 here
        rest = Counter({k: (hi * c_lo[k] - lo * c_hi[k]) / (hi - lo) for k in c_lo | c_hi})
        bad = {k: v for k, v in rest.items() if v < 0 or not float(v).is_integer()}
        if bad or any(v < 0 for v in diff.values()):
            notes.append(f"{name}: collectives are not linear in the layer count ({bad})")
        total = summarize(c_hi)
        run = runs[hi]
        dl = abs(run["loss"] - run["ref_loss"])
        match_ok = dl <= 1e-5 and run["grad_err"] <= 1e-5
        ok &= match_ok
        rows.append(
            {
                "name": name,
                "total": total,
                "per_layer": per_layer,
                "verdict": verdict(per_layer),
                "check": f"{dl:.0e} / {run['grad_err']:.0e}" + ("" if match_ok else " FAIL"),
            }
        )
        for (k, ph, shape, b), c in sorted(
            rest.items(), key=lambda kv: (kv[0][1] != "forward", kv[0][0])
        ):
            if c > 0:
                nonlayer_rows.append((name, label_nonlayer(k, ph, shape), k, ph, shape, int(c), b))
        for fb in run["fallbacks"]:
            notes.append(f"{name}: {fb}")
        if run["replicated_matmul_weights"]:
            reps = run["replicated_matmul_weights"]
            layer0 = [n for n in reps if re.search(r"\.0\.", n)] or reps
            notes.append(
                f"{name}: replicated (unsharded) matmul weights (layer 0 only if in a layer): "
                + ", ".join(f"`{n}`" for n in layer0)
            )
        print(f"{name:<30} done ({time.monotonic() - t0:.1f}s)", flush=True)
    elapsed = time.monotonic() - t0

    # ------------------------------------------------------------------ tables
    head = [
        "model",
        "fwd colls (4L)",
        "bwd colls (4L)",
        "fwd bytes/rank",
        "bwd bytes/rank",
        "per layer fwd",
        "per layer bwd",
        "per layer bytes/rank (ring)",
        "vs Megatron 2+2",
        "loss / grad err",
    ]
    table = []
    for r in rows:
        t, p = r["total"], r["per_layer"]
        pl_bytes = p["forward"]["bytes"] + p["backward"]["bytes"]
        pl_ring = p["forward"]["ring"] + p["backward"]["ring"]
        table.append(
            [
                r["name"],
                f"{t['forward']['n']:g}",
                f"{t['backward']['n']:g}",
                fmt_bytes(t["forward"]["bytes"]),
                fmt_bytes(t["backward"]["bytes"]),
                fmt_kinds(p["forward"]["kinds"]),
                fmt_kinds(p["backward"]["kinds"]),
                f"{fmt_bytes(pl_bytes)} ({fmt_bytes(pl_ring)})",
                r["verdict"],
                r["check"],
            ]
        )
    # families with the same non-layer collectives share one group of rows
    groups: dict[tuple, list[str]] = {}
    per_model: dict[str, list[tuple]] = {}
    for n, *rest_row in nonlayer_rows:
        per_model.setdefault(n, []).append(tuple(rest_row))
    for n, items in per_model.items():
        groups.setdefault(tuple(items), []).append(n)
    nl_head = ["models", "what", "kind", "phase", "shape per rank", "count", "bytes/rank"]
    nl_table = []
    for items, names in groups.items():
        for i, (what, k, ph, s, c, b) in enumerate(items):
            nl_table.append(
                [
                    ", ".join(names) if i == 0 else '"',
                    what,
                    k,
                    ph,
                    "x".join(map(str, s)),
                    str(c),
                    fmt_bytes(b * c),
                ]
            )

    def print_table(h, body):
        widths = [max(len(str(x)) for x in col) for col in zip(h, *body)]
        print("  ".join(str(x).ljust(w) for x, w in zip(h, widths)))
        for row in body:
            print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))

    print()
    print(
        f"Collectives of one training step (forward + backward) at tp {TP}, simulator, "
        f"batch {BATCH} x seq {SEQ}, hidden {HIDDEN}, vocab {VOCAB}"
    )
    print_table(head, table)
    print("\nNon-layer collectives (same for any layer count)")
    print_table(nl_head, nl_table)
    for n in notes:
        print("note:", n)
    for name, why in failures:
        print(f"FAILED {name}: {why}")
    print(f"total wall time {elapsed:.1f}s")

    gqa = next((r for r in rows if "GQA" in r["name"]), None)
    mha = next((r for r in rows if r["name"] == "llama"), None)

    if not args.no_write:
        md = [
            SECTION,
            "",
            f"- Date: {_dt.date.today().isoformat()}",
            f"- torch {torch.__version__}, transformers "
            f"{__import__('transformers').__version__}, Python {platform.python_version()}",
            "- Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/collectives.py`",
            f"- Setup: tests/configs/*.json with hidden {HIDDEN}, 8 heads (8 kv heads unless "
            f"noted), intermediate 256, vocab {VOCAB}, dropout 0, train mode; "
            f"`autoshard(model, {TP}, ...)` without a process group (simulator); one step = "
            f"`sharded(ids, labels=labels).loss.backward()` under `trace_collectives`, "
            f"batch {BATCH} x seq {SEQ} (fp32 activation {BATCH}x{SEQ}x{HIDDEN} = "
            f"{fmt_bytes(BATCH * SEQ * HIDDEN * 4)})",
            f"- Totals are for {LAYERS[1]} layers; per layer = (log at {LAYERS[1]} layers - "
            f"log at {LAYERS[0]} layers) / {LAYERS[1] - LAYERS[0]}. Megatron optimum per dense "
            "layer: 2 all-reduce forward + 2 all-reduce backward.",
            "- bytes/rank = tracer's bytes (tensor each rank contributes: full activation for "
            "all_reduce, local shard for all_gather); (ring) = bytes a ring algorithm sends per "
            f"rank at n={TP}: 2(n-1)/n x size for all_reduce, (n-1) x shard for all_gather.",
            "- loss / grad err: |simulated loss - unsharded loss| / max |grad diff| over all "
            "parameters (4-layer model).",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "|".join(["---"] + ["---:"] * 4 + ["---"] * 5) + "|",
        ]
        md += ["| " + " | ".join(row) + " |" for row in table]
        md += [
            "",
            "Non-layer collectives (what is left at 0 layers: 2 x log(2 layers) - log(4 layers)):",
            "",
            "| " + " | ".join(nl_head) + " |",
            "|---|---|---|---|---|---:|---:|",
        ]
        md += ["| " + " | ".join(row) + " |" for row in nl_table]
        md.append("")
        if mha and gqa:
            g, m = gqa["per_layer"], mha["per_layer"]
            gb = g["forward"]["ring"] + g["backward"]["ring"]
            mb = m["forward"]["ring"] + m["backward"]["ring"]
            md.append(
                f"- GQA (8 q heads, 2 kv heads, tp {TP}): k_proj/v_proj cannot be split 8 ways "
                "and are replicated; q/o/MLP stay Megatron-sharded. Forward is still 2 "
                "all-reduces per layer, but backward adds "
                f"{fmt_kinds(g['backward']['kinds'] - m['backward']['kinds'])} per layer: each "
                "rank slices its kv head out of the repeated (repeat_kv) k and v (`shard`), whose "
                "backward all-gathers the full k/v gradient so that the replicated k/v weights "
                "get full, identical gradients. Per layer ring traffic "
                f"{fmt_bytes(gb)} vs {fmt_bytes(mb)} without GQA ({gb / mb:.2f}x); each gather "
                "moves (n-1) x B x S x head_dim floats per rank, half an all-reduce of the hidden "
                "state when q heads x head_dim = hidden. Plus compute: every rank runs both kv "
                "heads' k/v projections and the whole repeat_kv, then keeps 1/8. The "
                "alternative (e.g. NxD's GQA QKV layer with kv replication) gives each rank a "
                "copy of only the kv head it needs and sums the k/v weight gradients over the "
                "ranks sharing a head: weight-sized traffic once per step instead of "
                "activation-sized traffic in every layer's backward."
            )
        md += [
            "- Transformer layers of all families hit the Megatron optimum exactly (2 + 2 "
            "all-reduces, no all-gather / reduce-scatter)."
            if all(r["verdict"].startswith("=") for r in rows if "GQA" not in r["name"])
            else "- Not every family hits the Megatron optimum per layer (see table).",
            "- The logits gather is there only because the HF output carries full "
            "`logits`; the loss itself uses the vocab-parallel cross-entropy (3 all-reduces of "
            f"{BATCH * SEQ} floats, no gather). It moves batch x seq x vocab values per step "
            "(forward only; no backward, as the loss does not read the gathered logits): "
            "for a 128k vocab that dwarfs all layer traffic, and a training step that reads "
            "only `.loss` does not need it.",
            "- Bytes of the 3 cross-entropy all-reduces are fp32 per token (4 bytes), as the "
            "real ones in collectives.py reduce (the simulator's tracer records them so).",
        ]
        md += [f"- note: {n}" for n in notes]
        md += [f"- FAILED {name}: {why}" for name, why in failures]
        write_section(md[0], "\n".join(md[1:]))
        print(f"wrote {os.path.relpath(RESULTS_MD, Path.cwd())}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
