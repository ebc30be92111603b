#!/usr/bin/env python
"""Step time of a small HF Llama under tensor parallelism on a local gloo mesh.

Compares, for one forward+backward step (no optimizer):

  (1) unsharded  - the plain model in 1 process (reference),
  (2) dtensor    - torch.distributed.tensor.parallel.parallelize_module with a
                   torchtitan-style plan, tp=2 (2 gloo processes),
  (3) ours       - nxd_autoshard.autoshard(model, tp=2, ...) in 2 gloo processes
                   (a separate launch, after the DTensor one),
  (4) compiled   - DTensor under torch.compile(model, backend=--compile) and ours with
                   autoshard(..., compile=--compile) (each rank's program one graph), each
                   its own launch in the same run; the first step's time (compilation) is
                   reported apart from the timed steps. --compile none skips them.

Each setup is one ``nxd_autoshard.tools.launch.run_ranks`` launch (1 process for the
reference, 2 for each tp setup), so the launcher never does torch compute before
forking; run_ranks returns each rank's result, reports exceptions with their
tracebacks, kills the peers of a failed rank and enforces a deadline (--timeout), so
the script never hangs. If (3) fails, the script prints its tracebacks and
"ours: unavailable (<error>)" and still reports (1) and (2).

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/step_time.py [--steps 10]

Results are printed as a table and written to the section
"## Step time: tp 2 on gloo vs DTensor" of benchmarks/RESULTS.md.

DTensor notes (what had to be done by hand): nothing in the model. transformers-5
Llama reshapes with ``view(*input_shape, -1, head_dim)`` / ``reshape(*input_shape, -1)``
so with ``use_local_output=True`` (the default) the attention simply sees the local
heads (8/2 q heads, 4/2 kv heads; GQA repeat factor unchanged). The plan is just the
torchtitan one; lm_head uses ``output_layouts=Replicate()`` so that HF's loss runs on
a plain full-vocab tensor. The only hand-written pieces are the plan itself and, for
the gradient-norm check, calling ``.full_tensor()`` on DTensor grads.
"""

from __future__ import annotations

import os

# Must be set before torch is imported (children inherit it, fork or spawn).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import datetime as _dt
import multiprocessing as _std_mp
import platform
import re
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from _results import write_section  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS_MD = HERE / "RESULTS.md"
SECTION = "## Step time: tp 2 on gloo vs DTensor"

# Use the installed package if any, else the in-tree src/ layout.
try:  # pragma: no cover - environment dependent
    import nxd_autoshard as _probe  # noqa: F401

    if getattr(_probe, "__file__", None) is None:  # namespace pkg = empty dir, not real
        raise ImportError
except ImportError:
    sys.modules.pop("nxd_autoshard", None)
    if str(REPO / "src") not in sys.path:
        sys.path.insert(0, str(REPO / "src"))

# The project's one local launcher (torch-only; spawns ranks with a gloo process group).
from nxd_autoshard.tools.launch import RankError, run_ranks  # noqa: E402

VOCAB = 1024
BATCH = 4
SEQ = 128
TP = 2


# --------------------------------------------------------------------------- model


def build_model():
    """Same seed on every rank -> identical weights everywhere."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.train()  # dropout is 0.0 in LlamaConfig, so train() is deterministic
    return model


def make_inputs():
    g = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)  # distinct tensor
    return input_ids, labels


def _as_float(x) -> float:
    if hasattr(x, "full_tensor"):  # DTensor
        x = x.full_tensor()
    return float(x.detach().float().item())


def grad_norm(module) -> float:
    total = 0.0
    for p in module.parameters():
        g = p.grad
        if g is None:
            continue
        if hasattr(g, "full_tensor"):
            g = g.full_tensor()
        total += float(g.detach().double().pow(2).sum())
    return total**0.5


def time_steps(step, warmup: int, steps: int, barrier=None):
    """Run warmup+steps steps; return (per-step seconds list, loss of first step)."""
    first_loss = None
    for _ in range(warmup):
        loss = step()
        if first_loss is None:
            first_loss = _as_float(loss)
    times = []
    for _ in range(steps):
        if barrier is not None:
            barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times, first_loss


def _max_over_ranks(times):
    """Per-step max over ranks: a TP step is only done when the slowest rank is."""
    import torch.distributed as dist

    t = torch.tensor(times, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


# --------------------------------------------------------------------- the setups


def _step_of(model, input_ids, labels):
    """A forward + backward training step of `model` on one batch; returns the detached loss."""

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids, labels=labels).loss
        loss.backward()
        return loss.detach()

    return step


def build_unsharded_step(input_ids, labels):
    model = build_model()

    return model, _step_of(model, input_ids, labels)


def build_dtensor_step(input_ids, labels, mesh, compile=None):
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    model = build_model()
    # torchtitan-style plan; no model edits needed for transformers-5 Llama (views use -1).
    plan = {
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
        "lm_head": ColwiseParallel(output_layouts=Replicate()),
    }
    for i in range(len(model.model.layers)):
        p = f"model.layers.{i}"
        plan.update(
            {
                f"{p}.self_attn.q_proj": ColwiseParallel(),
                f"{p}.self_attn.k_proj": ColwiseParallel(),
                f"{p}.self_attn.v_proj": ColwiseParallel(),
                f"{p}.self_attn.o_proj": RowwiseParallel(),
                f"{p}.mlp.gate_proj": ColwiseParallel(),
                f"{p}.mlp.up_proj": ColwiseParallel(),
                f"{p}.mlp.down_proj": RowwiseParallel(),
            }
        )
    model = parallelize_module(model, mesh, plan)
    if compile is None:
        return model, _step_of(model, input_ids, labels)
    # as a DTensor user would: the module compiled, graph breaks allowed (they are counted)
    compiled = torch.compile(model, backend=compile)

    def step():
        model.zero_grad(set_to_none=True)
        loss = compiled(input_ids, labels=labels).loss
        loss.backward()
        return loss.detach()

    return model, step


def build_ours_step(input_ids, labels, tp, compile=None):
    """Everything specific to nxd_autoshard lives here (small on purpose).

    Returns (module_for_grad_norm_or_None, step_callable). Any exception here or in
    the first step is reported as "ours: unavailable (<error>)".
    """
    from nxd_autoshard import autoshard

    model = build_model()
    sharded = autoshard(
        model,
        tp=tp,
        example_inputs=(input_ids,),
        example_kwargs={"labels": labels},
        compile=compile,
    )
    zero = getattr(sharded, "zero_grad", None) or model.zero_grad

    def step():
        zero(set_to_none=True)
        loss = sharded(input_ids, labels=labels).loss
        loss.backward()
        return loss.detach()

    mod = sharded if hasattr(sharded, "parameters") else None
    return mod, step


# ------------------------------------------------------------------------ workers
# Each phase is one nxd_autoshard.tools.launch.run_ranks launch: fn(rank, world, *args) runs in
# a fresh gloo process group and returns its result; run_ranks reports exceptions with
# tracebacks, kills the peers of a failed rank, and enforces a deadline.


def ref_rank(rank, world, warmup, steps):
    input_ids, labels = make_inputs()
    model, step = build_unsharded_step(input_ids, labels)
    times, loss = time_steps(step, warmup, steps)
    return {"times": times, "loss": loss, "grad_norm": grad_norm(model)}


def _first_step(step, barrier):
    """The first step alone (under torch.compile: tracing and compiling), max over ranks."""
    barrier()
    t0 = time.perf_counter()
    step()
    return max(_max_over_ranks([time.perf_counter() - t0]))


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def dtensor_rank(rank, world, warmup, steps, compile=None):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    input_ids, labels = make_inputs()
    model, step = build_dtensor_step(input_ids, labels, mesh, compile)
    first = _first_step(step, dist.barrier) if compile else None
    times, loss = time_steps(step, warmup, steps, barrier=dist.barrier)
    times = _max_over_ranks(times)
    return {
        "times": times,
        "loss": loss,
        "grad_norm": grad_norm(model),
        "first_s": first,
        "graph_breaks": _graph_breaks(),
    }


def ours_rank(rank, world, warmup, steps, compile=None):
    import torch.distributed as dist

    input_ids, labels = make_inputs()
    mod, step = build_ours_step(input_ids, labels, world, compile)
    first = _first_step(step, dist.barrier) if compile else None
    times, loss = time_steps(step, warmup, steps, barrier=dist.barrier)
    times = _max_over_ranks(times)
    if hasattr(mod, "gather_grads"):  # local shards -> full grads (all-gathers; all ranks call)
        gn = sum(float(g.double().pow(2).sum()) for g in mod.gather_grads().values()) ** 0.5
    elif mod is not None:
        gn = grad_norm(mod)
    else:
        gn = float("nan")
    return {
        "times": times,
        "loss": loss,
        "grad_norm": gn,
        "first_s": first,
        "graph_breaks": _graph_breaks(),
    }


# ----------------------------------------------------------------------- launcher


def pick_start_method(requested: str) -> str:
    if requested != "auto":
        return requested
    return "fork" if "fork" in _std_mp.get_all_start_methods() else "spawn"


def launch(phase, fn, world, fn_args, timeout_s, start_method):
    """One run_ranks launch. Returns (results {phase: {rank: payload}}, errors
    [(phase, rank, traceback)], notes list); never raises for a failed phase."""
    try:
        out = run_ranks(fn, world, args=fn_args, timeout_s=timeout_s, start_method=start_method)
    except RankError as err:
        msg = str(err)
        parts = re.split(r"^--- rank (\d+) ---\n", msg, flags=re.M)
        if len(parts) > 1:  # "header\n--- rank r ---\n<traceback>..." -> per-rank tracebacks
            errors = [
                (phase, int(parts[i]), parts[i + 1].rstrip()) for i in range(1, len(parts) - 1, 2)
            ]
        else:  # timeout: no tracebacks, just the summary line
            errors = [(phase, -1, msg)]
        return {}, errors, [f"{phase}: {msg.splitlines()[0]}"]
    except Exception:  # a launcher problem (e.g. bad start method): report, go on
        return {}, [(phase, -1, traceback.format_exc())], []
    return {phase: dict(enumerate(out))}, [], []


def _short_error(tb: str) -> str:
    lines = [ln for ln in tb.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "unknown error"


# ------------------------------------------------------------------------ report


def machine_line() -> str:
    model = platform.processor() or platform.machine()
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.lower().startswith("model name"):
                model = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores ({model}), {platform.system()} {platform.release()}"


def _load() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up steps (default 3)")
    ap.add_argument("--start-method", choices=["auto", "fork", "spawn"], default="auto")
    ap.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="deadline per launch (reference, DTensor, ours), seconds "
        "(default 600); run_ranks kills all ranks when it passes",
    )
    ap.add_argument("--no-ours", action="store_true", help="skip nxd_autoshard")
    ap.add_argument(
        "--compile",
        default="inductor",
        help="torch.compile backend of the compiled rows (default inductor; 'none' skips them)",
    )
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    load_at_start = _load()
    method = pick_start_method(args.start_method)
    t_start = time.monotonic()
    steps_args = (args.warmup, args.steps)

    # (1) reference, 1 process; (2) DTensor and (3) ours, TP gloo processes each
    r_res, r_err, r_notes = launch("unsharded", ref_rank, 1, steps_args, args.timeout, method)
    t_res, t_err, t_notes = launch("dtensor", dtensor_rank, TP, steps_args, args.timeout, method)
    backend = None if args.compile == "none" else args.compile
    phases = [("ours", ours_rank, steps_args)] if not args.no_ours else []
    if backend:
        phases.insert(0, ("dtensor_compiled", dtensor_rank, steps_args + (backend,)))
        if not args.no_ours:
            phases.append(("ours_compiled", ours_rank, steps_args + (backend,)))
    for phase, fn, fn_args in phases:
        o_res, o_err, o_notes = launch(phase, fn, TP, fn_args, args.timeout, method)
        t_res.update(o_res)
        t_err += o_err
        t_notes += o_notes
    elapsed = time.monotonic() - t_start

    # Print any tracebacks in full (once per distinct traceback).
    seen = set()
    for phase, rank, tb in r_err + t_err:
        if tb in seen:
            continue
        seen.add(tb)
        print(f"----- {phase} failed on rank {rank} -----\n{tb}", file=sys.stderr)
    for n in r_notes + t_notes:
        print(f"note: {n}", file=sys.stderr)

    def summary(res, phase):
        if phase not in res or 0 not in res[phase]:
            return None
        d = res[phase][0]
        return {
            "ms": statistics.median(d["times"]) * 1e3,
            "loss": d["loss"],
            "grad_norm": d["grad_norm"],
            "first_s": d.get("first_s"),
            "graph_breaks": d.get("graph_breaks"),
        }

    ref = summary(r_res, "unsharded")
    dt = summary(t_res, "dtensor")
    ours = None if args.no_ours else summary(t_res, "ours")
    dtc = summary(t_res, "dtensor_compiled") if backend else None
    oc = summary(t_res, "ours_compiled") if backend and not args.no_ours else None

    def why(errs, phase, default):
        """Root cause: prefer a real exception over a peer's follow-on gloo error."""
        errs = [e for e in errs if e[0] == phase]
        secondary = (
            "Connection closed by peer",
            "Connection reset",
            "Timed out",
            "timed out",
            "Broken pipe",
        )
        primary = [e for e in errs if not any(m in e[2] for m in secondary)]
        for _ph, _rank, tb in primary or errs:
            return _short_error(tb)
        return default

    ours_reason = None
    if args.no_ours:
        ours_reason = "skipped (--no-ours)"
    elif ours is None:
        ours_reason = why(t_err, "ours", "no result")
        print(f"ours: unavailable ({ours_reason})")

    # correctness of DTensor vs unsharded
    ok = True
    checks = []
    if ref and dt:
        dl = abs(dt["loss"] - ref["loss"])
        dl_ok = dl <= 1e-5
        ok &= dl_ok
        gn_rel = abs(dt["grad_norm"] - ref["grad_norm"]) / max(ref["grad_norm"], 1e-12)
        checks.append(
            f"DTensor tp{TP} loss {dt['loss']:.7f} vs unsharded {ref['loss']:.7f}: "
            f"|diff| = {dl:.2e} ({'OK' if dl_ok else 'FAIL'}, tol 1e-5); "
            f"grad-norm rel diff {gn_rel:.1e}"
        )
    if ref and ours:
        dl = abs(ours["loss"] - ref["loss"])
        gn_rel = abs(ours["grad_norm"] - ref["grad_norm"]) / max(ref["grad_norm"], 1e-12)
        checks.append(
            f"ours tp{TP} loss {ours['loss']:.7f} vs unsharded {ref['loss']:.7f}: "
            f"|diff| = {dl:.2e} ({'OK' if dl <= 1e-5 else 'MISMATCH'}, tol 1e-5); "
            f"grad-norm rel diff {gn_rel:.1e} (full grads via gather_grads)"
        )

    for label, got in (("DTensor compiled", dtc), ("ours compiled", oc)):
        if got and ref:
            dl = abs(got["loss"] - ref["loss"])
            checks.append(
                f"{label} ({backend}) loss {got['loss']:.7f} vs unsharded {ref['loss']:.7f}: "
                f"|diff| = {dl:.2e} ({'OK' if dl <= 1e-5 else 'MISMATCH'}, tol 1e-5); first "
                f"step (compile) {got['first_s']:.1f} s; graph breaks {got['graph_breaks']}"
            )
        elif backend and not (label == "ours compiled" and args.no_ours):
            phase = "dtensor_compiled" if label.startswith("DTensor") else "ours_compiled"
            checks.append(f"{label}: unavailable ({why(t_err, phase, 'no result')})")

    fmt = lambda s: f"{s['ms']:.2f}" if s else "n/a"  # noqa: E731
    rows = [
        ("unsharded (1 proc)", fmt(ref), f"{ref['loss']:.6f}" if ref else "n/a"),
        (f"DTensor tp{TP} (gloo)", fmt(dt), f"{dt['loss']:.6f}" if dt else "n/a"),
        (
            f"ours tp{TP} (gloo)",
            fmt(ours) if ours else "unavailable",
            f"{ours['loss']:.6f}" if ours else "n/a",
        ),
    ]
    if backend:
        rows.insert(
            2,
            (
                f"DTensor tp{TP} compiled ({backend})",
                fmt(dtc) if dtc else "unavailable",
                f"{dtc['loss']:.6f}" if dtc else "n/a",
            ),
        )
        rows.append(
            (
                f"ours tp{TP} compiled ({backend})",
                fmt(oc) if oc else "unavailable",
                f"{oc['loss']:.6f}" if oc else "n/a",
            )
        )
    ratio = lambda a, b: f"{a['ms'] / b['ms']:.2f}x" if a and b else "n/a"  # noqa: E731
    compiled_ratios = (
        [
            f"ours compiled / DTensor eager: {ratio(oc, dt)} (target <= 0.5x)",
            f"ours compiled / DTensor compiled: {ratio(oc, dtc)} (target < 1x)",
            f"ours compiled / ours eager: {ratio(oc, ours)}",
        ]
        if backend
        else []
    )
    ratio_od = f"{ours['ms'] / dt['ms']:.2f}x" if ours and dt else "n/a"
    ratio_du = f"{dt['ms'] / ref['ms']:.2f}x" if dt and ref else "n/a"

    print()
    print(
        f"Step time (forward+backward), Llama 4L h256 vocab{VOCAB}, batch {BATCH} x seq "
        f"{SEQ}, median of {args.steps} steps after {args.warmup} warm-up, "
        f"start method {method}"
    )
    w = max(len(r[0]) for r in rows)
    print(f"{'setup':<{w}}  {'median ms/step':>14}  loss")
    for name, ms, loss in rows:
        print(f"{name:<{w}}  {ms:>14}  {loss}")
    print(f"ratio ours/DTensor      : {ratio_od}")
    print(f"ratio DTensor/unsharded : {ratio_du}")
    for line in compiled_ratios:
        print(line)
    for c in checks:
        print(c)
    print(f"total wall time {elapsed:.1f}s")

    if not args.no_write:
        cmd = "OMP_NUM_THREADS=1 .venv/bin/python " + " ".join(
            shlex.quote(a) for a in [os.path.relpath(__file__, REPO)] + sys.argv[1:]
        )
        today = _dt.date.today().isoformat()
        md = [
            SECTION,
            "",
            f"- Date: {today}",
            f"- torch {torch.__version__}, transformers "
            f"{__import__('transformers').__version__}, Python {platform.python_version()}",
            f"- Machine: {machine_line()}; 1 thread per process, gloo on 127.0.0.1, "
            f"start method `{method}`; load average at the start {load_at_start}, "
            f"at the end {_load()} (the cores are shared with other jobs)",
            f"- Command: `{cmd}`",
            f"- Model: LlamaForCausalLM from_config (vocab {VOCAB}, hidden 256, "
            f"intermediate 512, 4 layers, 8 heads, 4 kv heads), batch {BATCH} x seq {SEQ}, "
            f"forward + backward (no optimizer), median of {args.steps} steps after "
            f"{args.warmup} warm-up; for tp{TP} each step is the max over ranks",
            "",
            "| setup | median ms/step | loss |",
            "|---|---:|---:|",
        ]
        for name, ms, loss in rows:
            md.append(f"| {name} | {ms} | {loss} |")
        md += [
            "",
            f"- ours / DTensor: {ratio_od}",
            f"- DTensor / unsharded: {ratio_du}",
        ]
        md += [f"- {line}" for line in compiled_ratios]
        if ours_reason:
            md.append(f"- ours: unavailable ({ours_reason})")
        md += [f"- {c}" for c in checks]
        md += [
            "- DTensor by hand: no model edits (transformers-5 Llama views use -1, so "
            "attention runs on local heads). Plan: embed_tokens "
            "RowwiseParallel(input_layouts=Replicate()), q/k/v/gate/up ColwiseParallel, "
            "o_proj/down RowwiseParallel, lm_head ColwiseParallel(output_layouts=Replicate()) "
            "so HF's loss sees full logits; `.full_tensor()` only for the grad-norm check.",
        ]
        write_section(md[0], "\n".join(md[1:]))
        print(f"wrote {os.path.relpath(RESULTS_MD, Path.cwd())}")

    if not (ref and dt):
        return 1
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
