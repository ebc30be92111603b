"""Pipeline benchmarks: stage balance on Llama-3 shapes (meta device) and measured bubble on gloo.

1. Balance. Llama-3-8B and Llama-3-70B shapes are built on the meta device and planned with
   `autoshard(model, tp=8, pp=4)` (no weights exist). From the per-block costs of the captured
   program (forward FLOPs of one microbatch of 1 x 2048 tokens, parameter bytes per rank),
   stages are formed for pp 4 and 8 by our FLOP balancer and by an even split of the layers
   (what NxD does by default); the table gives max / mean of the stage costs (1.00 = perfect).
2. Bubble. A small Llama runs `train_step` on 2 gloo processes (pp 2, one thread each) with
   GPipe, 1F1B and interleaved 1F1B (2 stages per rank). Each rank's busy time is the time
   spent in its stages' forward_one_chunk / backward_one_chunk; bubble = 1 - busy / step,
   averaged over ranks, against (p-1)/(m+p-1) and (p-1)/(v*m+p-1) for interleaving.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pipeline.py [--no-write] [--skip-70b]
Writes the section "## Pipeline: stage balance and bubble" of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from _results import machine, write_section  # noqa: E402

from nxd_autoshard import autoshard  # noqa: E402
from nxd_autoshard.compiler.split import balance, even_split  # noqa: E402
from nxd_autoshard.tools.launch import run_ranks  # noqa: E402

SECTION = "## Pipeline: stage balance and bubble"
SHAPES = {
    "Llama-3-8B": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    "Llama-3-70B": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
}


def _imbalance(costs: list[float], assign: list[int], stages: int) -> tuple[float, list[float]]:
    per = [sum(c for c, s in zip(costs, assign) if s == k) for k in range(stages)]
    return max(per) / (sum(per) / stages), per


def _whole_layers(flops: list[int], unit_of_block: list[int], pp: int) -> list[int]:
    starts = [k == 0 or unit_of_block[k] != unit_of_block[k - 1] for k in range(len(flops))]
    return balance(flops, pp, starts)


def balance_rows(name: str, shape: dict, seq: int) -> tuple[list[str], str]:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", max_position_embeddings=8192, **shape)
    start = time.perf_counter()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    ids = torch.zeros(4, seq, dtype=torch.long, device="meta")
    sharded = autoshard(
        model, 8, pp=4, microbatches=4, example_inputs=(ids,), example_kwargs={"labels": ids}
    )
    planned = time.perf_counter() - start
    blocks = [c.flops for c in sharded.block_costs]
    flops = [c.flops for c in sharded.unit_costs]
    memory = [c.param_bytes for c in sharded.unit_costs]
    unit_of_block = sharded.units.block
    rows = []
    for pp in (4, 8):
        even = even_split(len(blocks), pp)
        for label, assign in (
            ("even layers (NxD default)", [even[b] for b in unit_of_block]),
            ("ours: whole layers, by FLOPs", _whole_layers(flops, unit_of_block, pp)),
            ("ours: attention/MLP cuts, by FLOPs", balance(flops, pp, sharded.units.cut_ok)),
        ):
            f_imb, per = _imbalance(flops, assign, pp)
            m_imb, _ = _imbalance(memory, assign, pp)
            layers = [len({b for b, s in zip(unit_of_block, assign) if s == k}) for k in range(pp)]
            rows.append(
                f"| {name} | {pp} | {label} | {'/'.join(map(str, layers))} | {f_imb:.3f} | "
                f"{m_imb:.3f} | {max(per) / 1e12:.2f} |"
            )
    note = (
        f"{name}: planned at tp 8 x pp 4 on meta in {planned:.1f} s (capture, propagate, "
        f"partition, split); {len(blocks)} layers cut into {len(flops)} units, of which "
        f"{sum(sharded.units.cut_ok)} may start a stage; first layer + embedding "
        f"{blocks[0] / 1e12:.3f} TFLOP, middle layer {blocks[len(blocks) // 2] / 1e12:.3f}, "
        f"last layer + norm + LM head + loss {blocks[-1] / 1e12:.3f}"
    )
    return rows, note


def _bubble_worker(rank, world, schedule, microbatches, steps):
    import torch.distributed as dist

    from nxd_autoshard.tools.hf import build_model, random_batch

    torch.manual_seed(0)
    model = build_model(
        dict(
            model_type="llama",
            vocab_size=512,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=256,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        seed=0,
    )
    args, kwargs = random_batch(model, batch=2 * microbatches, seq=128, seed=1)
    sharded = autoshard(
        model,
        1,
        pp=2,
        microbatches=microbatches,
        schedule=schedule,
        example_inputs=args,
        example_kwargs=kwargs,
    )
    sharded.train_step(*args, **kwargs)  # builds the schedule
    schedule_obj, _ = sharded._cache.entries()[0].runtime
    stages = getattr(schedule_obj, "_stages", None) or [schedule_obj._stage]
    busy = [0.0]
    for stage in stages:
        for method in ("forward_one_chunk", "backward_one_chunk"):
            inner = getattr(stage, method)

            def timed(*a, _inner=inner, **k):
                t = time.perf_counter()
                try:
                    return _inner(*a, **k)
                finally:
                    busy[0] += time.perf_counter() - t

            setattr(stage, method, timed)
    for _ in range(2):
        sharded.train_step(*args, **kwargs)
    fractions, times = [], []
    for _ in range(steps):
        dist.barrier()
        busy[0] = 0.0
        t = time.perf_counter()
        sharded.train_step(*args, **kwargs)
        step = time.perf_counter() - t
        fractions.append(1 - busy[0] / step)
        times.append(step)
    return statistics.median(fractions), statistics.median(times)


def bubble_rows(steps: int) -> list[str]:
    rows = []
    p = 2
    for schedule, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2)):
        for m in (2, 4, 8):
            results = run_ranks(_bubble_worker, p, args=(schedule, m, steps), timeout_s=600)
            bubble = statistics.mean(r[0] for r in results)
            step = max(r[1] for r in results)
            formula = (p - 1) / (v * m + p - 1)
            rows.append(
                f"| {schedule} | {p} | {v} | {m} | {step * 1e3:.0f} | {bubble:.3f} | "
                f"{formula:.3f} |"
            )
            print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    ap.add_argument("--skip-70b", action="store_true", help="balance the 8B shape only")
    ap.add_argument(
        "--skip-bubble", action="store_true", help="balance only (prints, never writes)"
    )
    ap.add_argument("--steps", type=int, default=5, help="timed steps per bubble measurement")
    ns = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    balance_table, notes = [], []
    for name, shape in SHAPES.items():
        if ns.skip_70b and "70B" in name:
            continue
        rows, note = balance_rows(name, shape, 2048)
        balance_table += rows
        notes.append(note)
        print("\n".join(rows), flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if ns.skip_bubble:
        return 0
    bubbles = bubble_rows(ns.steps)
    body = "\n".join(
        [
            f"- Date: {datetime.date.today()}; {machine()}",
            "- Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pipeline.py`",
            "",
            "### Stage balance (meta device, tp 8, cost = forward FLOPs of a 1 x 2048 microbatch)",
            "",
            "| model | pp | split | layers per stage | FLOPs max/mean | param bytes max/mean | "
            "slowest stage TFLOP |",
            "|---|---:|---|---|---:|---:|---:|",
            *balance_table,
            "",
            *[f"- {n}" for n in notes],
            f"- Peak RSS of the planning process (both shapes): {rss:.0f} MB",
            "- A stage may start at a layer or after a layer's attention + residual add (where only "
            "the hidden state crosses, as between layers); stages are therefore off the mean by up to "
            "an MLP's cost. The embedding and the LM head + loss are counted in the first and last "
            "layer. 'layers per stage' counts a layer cut in two on both stages.",
            "",
            "### Bubble (gloo, 2 processes, 1 thread each; small Llama: hidden 256, 4 layers, "
            "vocab 512, microbatch 2 x 128)",
            "",
            "| schedule | p | stages/rank v | microbatches m | step ms | measured bubble | "
            "(p-1)/(v·m+p-1) |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *bubbles,
            "",
            "- measured bubble = 1 - (time in the rank's forward_one_chunk + backward_one_chunk) / "
            "step time, median of the timed steps, mean of the 2 ranks; p2p waits, sends and "
            "the schedule's own bookkeeping count as bubble.",
        ]
    )
    print(body)
    if not ns.no_write:
        write_section(SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
