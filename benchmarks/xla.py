#!/usr/bin/env python
"""HLO of the stage programs on torch-xla (CPU): sizes, trace and XLA compile times, collectives,
against the unsharded model traced in the same run; and GSPMD's all-reduces with our placements.

For each model and mesh: the plan time (autoshard), then per stage the lazy trace of tp rank 0's
training program (forward, backward, gradient syncs), its HLO text and HloModuleProto sizes, and
whether every tp rank traces the same HLO. The peer is the unsharded model's forward+backward
traced on the same XLA device. At tp 1 both programs are also compiled and run by XLA's CPU
backend (first `torch_xla.sync()`: compile + one run). GSPMD: tests/xla/spmd_check.py in a
subprocess with 4 CPU devices.

Usage (the torch-xla venv, `make test-xla` builds it):
    PJRT_DEVICE=CPU OMP_NUM_THREADS=1 .venv-xla/bin/python benchmarks/xla.py

Writes the section "## torch-xla: stage HLO, trace and compile times" of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from conftest import config_dict  # noqa: E402

from nxd_autoshard import autoshard  # noqa: E402
from nxd_autoshard.runtime import xla  # noqa: E402
from nxd_autoshard.tools import neuron  # noqa: E402
from nxd_autoshard.tools.hf import build_model, random_batch  # noqa: E402

SECTION = "## torch-xla: stage HLO, trace and compile times"
DEVICE = xla.xla_device()

# FACTS' baseline Llama (hidden 256, 4 layers, 8 heads, 4 KV heads, vocab 1024) and tiny GPT-2
MODELS = {
    "llama-256x4": dict(
        family="llama",
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=1024,
    ),
    "gpt2-64x2": dict(family="gpt2", n_layer=2),
}
MESHES = [(2, 1), (4, 1), (2, 2)]  # (tp, pp)
BATCH, SEQ = 4, 128


def _model(name: str):
    cfg = dict(MODELS[name])
    return build_model(config_dict(cfg.pop("family"), **cfg))


def _unsharded_trace(model, args, kwargs) -> tuple[float, int, object]:
    """The peer: the plain model's forward+backward traced lazily on the XLA device."""
    import copy

    on_xla = copy.deepcopy(model).to(DEVICE)
    if hasattr(on_xla, "tie_weights"):
        on_xla.tie_weights()
    started = time.perf_counter()
    moved = {k: v.to(DEVICE) for k, v in kwargs.items()}
    loss = on_xla(*[a.to(DEVICE) for a in args], **moved).loss
    loss.backward()
    results = [loss] + [p.grad for p in on_xla.parameters() if p.grad is not None]
    seconds = time.perf_counter() - started
    import torch_xla

    text = torch_xla._XLAC._get_xla_tensors_hlo(results)
    return seconds, len(text), results


def _first_sync(results) -> float:
    """XLA CPU compile + one run of the pending graph of `results`."""
    import torch_xla

    started = time.perf_counter()
    torch_xla.sync()
    _ = [r.cpu() for r in results[:1]]
    return time.perf_counter() - started


def _row(name: str, tp: int, pp: int) -> list[dict]:
    model = _model(name)
    args, kwargs = random_batch(model, batch=BATCH, seq=SEQ)
    peer_s, peer_chars, _ = _unsharded_trace(model, args, kwargs)
    started = time.perf_counter()
    sharded = autoshard(model, tp, pp=pp, example_inputs=args, example_kwargs=kwargs)
    plan_s = time.perf_counter() - started
    specs = neuron.stage_specs(sharded, args, kwargs)
    rows = []
    for spec in specs:
        t0 = time.perf_counter()
        trace = neuron.trace_stage(sharded, spec, spec.ranks[0][0], specs)
        trace_s = time.perf_counter() - t0
        text = trace.hlo_text()
        proto = trace.hlo_proto()
        want = xla.canonical_hlo(text)
        same = all(
            xla.canonical_hlo(neuron.trace_stage(sharded, spec, r, specs).hlo_text()) == want
            for r in spec.ranks[0][1:]
        )
        found = xla.hlo_collectives(text)
        rows.append(
            dict(
                model=name,
                tp=tp,
                pp=pp,
                stage=spec.index,
                plan_s=plan_s,
                trace_s=trace_s,
                hlo_chars=len(text),
                proto_bytes=len(proto),
                peer_trace_s=peer_s,
                peer_chars=peer_chars,
                same=same,
                collectives=sum(found.values()),
                matches=found == neuron.expected_collectives(sharded, specs, spec),
            )
        )
    return rows


def _compile_tp1(name: str) -> dict:
    """tp 1 program vs the unsharded model: XLA CPU compile + first run, and the losses."""
    model = _model(name)
    args, kwargs = random_batch(model, batch=BATCH, seq=SEQ)
    _, _, peer = _unsharded_trace(model, args, kwargs)
    peer_s = _first_sync(peer)
    sharded = autoshard(model, 1, example_inputs=args, example_kwargs=kwargs)
    (spec,) = neuron.stage_specs(sharded, args, kwargs)
    trace = neuron.trace_stage(sharded, spec, 0)
    ours = trace.results()
    ours_s = _first_sync(ours)
    return dict(
        model=name,
        ours_s=ours_s,
        peer_s=peer_s,
        loss=ours[0].cpu().item(),
        peer_loss=peer[0].cpu().item(),
    )


def _gspmd(family: str) -> dict:
    with tempfile.TemporaryDirectory() as dump:
        env = dict(os.environ)
        env.update(
            PJRT_DEVICE="CPU",
            CPU_NUM_DEVICES="4",
            XLA_THREAD_POOL_SIZE="4",
            XLA_FLAGS=f"--xla_dump_to={dump} --xla_dump_hlo_pass_re=spmd-partitioning",
            PYTHONPATH=str(ROOT / "src"),
        )
        proc = subprocess.run(
            [sys.executable, str(ROOT / "tests" / "xla" / "spmd_check.py"), family, "4", dump],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(line[-1][len("RESULT ") :])


def main() -> None:
    from _results import machine, write_section

    rows = [r for name in MODELS for tp, pp in MESHES for r in _row(name, tp, pp)]
    compiled = [_compile_tp1(name) for name in MODELS]
    spmd = {family: _gspmd(family) for family in ("llama", "gpt2")}
    lines = [
        f"Command: `PJRT_DEVICE=CPU OMP_NUM_THREADS=1 .venv-xla/bin/python benchmarks/xla.py` "
        f"({machine()}, torch-xla on CPU). Batch {BATCH} x seq {SEQ}; the training program of tp "
        "rank 0 of each stage (forward, backward, gradient syncs), traced lazily (nothing runs). "
        "Peer: the unsharded model's forward+backward traced on the same device in the same run.",
        "",
        "| model | tp x pp | stage | plan s | trace s (peer) | HLO text chars (peer) | proto bytes "
        "| collectives | = our count | tp ranks one HLO |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['tp']} x {r['pp']} | {r['stage']} | {r['plan_s']:.2f} | "
            f"{r['trace_s']:.2f} ({r['peer_trace_s']:.2f}) | {r['hlo_chars']:,} "
            f"({r['peer_chars']:,}, x{r['hlo_chars'] / r['peer_chars']:.2f}) | "
            f"{r['proto_bytes']:,} | {r['collectives']} | {'yes' if r['matches'] else 'NO'} | "
            f"{'yes' if r['same'] else 'NO'} |"
        )
    lines += [
        "",
        "XLA CPU compile + first run of the world size 1 program (tp 1: its all-reduces over "
        "{{0}}) against the unsharded model, same run (2 shared cores: ±30 % between runs; "
        "an earlier run gave ratios 0.86 and 0.92):",
        "",
        "| model | ours s | unsharded s | ratio | loss ours / unsharded |",
        "|---|---|---|---|---|",
    ]
    for c in compiled:
        lines.append(
            f"| {c['model']} | {c['ours_s']:.2f} | {c['peer_s']:.2f} | "
            f"{c['ours_s'] / c['peer_s']:.2f} | {c['loss']:.6f} / {c['peer_loss']:.6f} |"
        )
    lines += [
        "",
        "GSPMD second opinion (tests' tiny configs, 2 layers, batch 2 x seq 16, 4 CPU devices, "
        "SPMD): our placements as partition specs; loss and every gradient against the unsharded "
        "model; all-reduces in GSPMD's partitioned step against ours (forward + backward, the "
        "vocab-parallel loss's three included):",
        "",
        "| model | loss diff | max grad diff | GSPMD all-reduces | ours | GSPMD other collectives |",
        "|---|---|---|---|---|---|",
    ]
    for family, g in spmd.items():
        other = {k: v for k, v in g["gspmd"].items() if not k.startswith("all-reduce")}
        lines.append(
            f"| {family} | {g['loss_abs']:.1e} | {g['grad_max_abs']:.1e} | "
            f"{g['gspmd_all_reduce']} | {g['ours_all_reduce']} | "
            f"{', '.join(f'{k.split()[0]} {v}' for k, v in other.items()) or '-'} |"
        )
    text = "\n".join(lines)
    print(text)
    write_section(SECTION, text)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
