"""Planning at scale: wall time and peak RSS of planning Llama shapes on the meta device.

Every measurement is its own Python process (so its wall time includes interpreter start and
imports, as a user's `nxd-autoshard plan` does, and its peak RSS is its own):

* autoshard: `plan_on_meta(config, tp=8, pp=8)` (build on meta, capture, every pass, the
  split into stages) and the JSON report, as `nxd-autoshard plan --format json` runs them
  (ending as it does, without tearing down the heap: `os._exit` once the output is written);
  its capture traces a short prefix of the decoder layers and stamps out the rest
  (compiler/stamp.py);
* full: the same with every layer traced (`compiler.stamp.full_capture()`), the path before
  stamping, to show what stamping saves;
* export: `torch.export.export` of the same meta model alone (non-strict, as our capture);
* pipeline: `torch.distributed.pipelining.pipeline()` on the same model cut into the same
  number of stages at layer boundaries (no TP, no report): the peer that also captures with
  torch.export and splits the graph;
* floor: `import torch, transformers` and building the model on meta, nothing else: what any
  planner of this model pays before it starts, so "autoshard - floor" is planning itself.

Rows: 2, 4, ..., 128 layers of the Llama-3-70B shape (pp = min(8, layers)), and the
Llama-3-8B / 70B / 3.1-405B configs. Each autoshard row splits its time into imports, build on
meta, capture (torch.export), the other passes, and the report.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/plan_scale.py [--layers 2,4,8]
     [--models 8B,70B] [--tools autoshard,export,pipeline] [--no-write]
Writes the section "## Planning at scale (meta device)" of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()  # before torch is imported: the worker's import time counts

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Planning at scale (meta device)"
TOOLS = ("autoshard", "full", "export", "pipeline", "floor")
COMMON = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    hidden_act="silu",
    tie_word_embeddings=False,
    torch_dtype="bfloat16",
    bos_token_id=128000,
    eos_token_id=128001,
)
MODELS = {
    "8B": dict(
        COMMON,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
    ),
    "70B": dict(
        COMMON,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
    ),
    "405B": dict(
        COMMON,
        hidden_size=16384,
        intermediate_size=53248,
        num_hidden_layers=126,
        num_attention_heads=128,
    ),
}
TP, PP, BATCH, SEQ = 8, 8, 2, 128
LOAD_AT_START = os.getloadavg()[0]


def _worker(tool: str, config: dict, pp: int) -> dict:
    """One measurement, in this (fresh) process."""
    times: dict[str, float] = {}
    import torch
    import transformers

    if tool in ("autoshard", "full"):
        from nxd_autoshard.compiler.stamp import full_capture
        from nxd_autoshard.tools.plan_meta import plan_on_meta  # imports the whole package

        times["imports"] = time.perf_counter() - STARTED

        passes: dict[str, float] = {}

        def step(name: str, seconds: float) -> None:
            passes[name] = passes.get(name, 0.0) + seconds

        t = time.perf_counter()
        with full_capture() if tool == "full" else contextlib.nullcontext():
            sharded = plan_on_meta(config, TP, pp=pp, batch=BATCH, seq=SEQ, step=step)
        times["plan"] = time.perf_counter() - t
        times["build"] = passes.pop("build model on meta")
        times["capture"] = passes.pop("capture")
        times["passes"] = sum(passes.values())
        times["per_pass"] = passes
        t = time.perf_counter()
        text = json.dumps(sharded.explain().to_dict())
        times["report"] = time.perf_counter() - t
        times["nodes"] = len(sharded.graph_module.graph.nodes)
        times["report_bytes"] = len(text)
    else:  # torch and transformers only, as a user of the peer would import
        times["imports"] = time.perf_counter() - STARTED
        t = time.perf_counter()
        data = dict(config)
        hf_config = transformers.AutoConfig.for_model(data.pop("model_type"), **data)
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM._from_config(hf_config, dtype=torch.bfloat16)
        model.eval()
        times["build"] = time.perf_counter() - t
        if tool == "floor":
            return _usage(times)
        args = (torch.zeros((BATCH, SEQ), dtype=torch.long, device="meta"),)
        kwargs = {"use_cache": False}
        t = time.perf_counter()
        if tool == "export":
            ep = torch.export.export(model, args, kwargs, strict=False)
            times["nodes"] = len(ep.graph.nodes)
        else:
            from torch.distributed.pipelining import SplitPoint, pipeline

            layers = config["num_hidden_layers"]
            cuts = [round(i * layers / pp) for i in range(1, pp)]
            pipe = pipeline(
                model,
                mb_args=args,
                mb_kwargs=kwargs,
                split_spec={f"model.layers.{c}": SplitPoint.BEGINNING for c in cuts},
            )
            times["stages"] = pipe.num_stages
        times["capture"] = time.perf_counter() - t
    return _usage(times)


def _usage(times: dict) -> dict:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    times["peak_rss_mb"] = usage.ru_maxrss / 1024
    # CPU seconds: on a machine shared with other jobs they move far less than wall time
    times["cpu"] = usage.ru_utime + usage.ru_stime
    return times


def _measure(tool: str, config: dict, pp: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    spec = json.dumps({"tool": tool, "config": config, "pp": pp})
    t = time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, "--worker", spec],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    wall = time.perf_counter() - t
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    line = [x for x in out.stdout.splitlines() if x.startswith("{")][-1]
    got = json.loads(line)
    # what the worker's own clock did not see: interpreter start, exit, the pipe
    spent = sum(got.get(k, 0.0) for k in ("imports", "build", "capture", "passes", "report"))
    return {**got, "wall": wall, "rest": wall - spent}


def _cell(r: dict | None, key: str = "wall", fmt: str = "{:.1f} s") -> str:
    if r is None:
        return "-"
    if "error" in r:
        return "failed"
    return fmt.format(r[key])


def _ratio(a: dict | None, b: dict | None) -> str:
    if not a or not b or "error" in a or "error" in b:
        return "-"
    return f"{a['wall'] / b['wall']:.2f} / {a['cpu'] / b['cpu']:.2f}"


def _above(a: dict | None, floor: dict | None) -> str:
    if not a or not floor or "error" in a or "error" in floor:
        return "-"
    return f"{a['wall'] - floor['wall']:.1f} / {a['cpu'] - floor['cpu']:.1f} s"


def _time(r: dict | None) -> str:
    if r is None or "error" in r:
        return _cell(r)
    return f"{r['wall']:.1f} / {r['cpu']:.1f} s"


def _table(rows: list[tuple[str, int, int, dict[str, dict]]]) -> str:
    head = (
        "| model | layers | pp | autoshard wall / CPU | peak RSS | imports | build | capture | "
        "other passes | report | start, exit | full capture wall / CPU | RSS | export alone "
        "wall / CPU | RSS | pipeline() wall / CPU | RSS | autoshard / full (wall / CPU) | "
        "autoshard / export (wall / CPU) | autoshard / pipeline() (wall / CPU) | floor: torch + "
        "transformers + build, wall / CPU | autoshard above the floor (wall / CPU) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        "---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for name, layers, pp, r in rows:
        a, f, e, p = r.get("autoshard"), r.get("full"), r.get("export"), r.get("pipeline")
        floor = r.get("floor")
        lines.append(
            f"| {name} | {layers} | {pp} | {_time(a)} | {_cell(a, 'peak_rss_mb', '{:.0f} MB')} | "
            f"{_cell(a, 'imports')} | {_cell(a, 'build')} | {_cell(a, 'capture')} | "
            f"{_cell(a, 'passes')} | {_cell(a, 'report')} | {_cell(a, 'rest')} | {_time(f)} | "
            f"{_cell(f, 'peak_rss_mb', '{:.0f} MB')} | {_time(e)} | "
            f"{_cell(e, 'peak_rss_mb', '{:.0f} MB')} | {_time(p)} | "
            f"{_cell(p, 'peak_rss_mb', '{:.0f} MB')} | {_ratio(a, f)} | {_ratio(a, e)} | "
            f"{_ratio(a, p)} | {_time(floor)} | {_above(a, floor)} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--layers", default="2,4,8,16,32,64,128", help="70B-shape layer counts")
    ap.add_argument("--models", default="8B,70B,405B", help="full configs to plan")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument(
        "--full-up-to", type=int, default=80, help="measure the full capture up to this many layers"
    )
    ap.add_argument(
        "--peers-at",
        default="",
        help="layer counts of the 70B-shape sweep at which the full capture and pipeline() are "
        "measured too (default: all; the full configs always)",
    )
    ap.add_argument("--no-write", action="store_true", help="print only")
    ns = ap.parse_args()
    if ns.worker:
        spec = json.loads(ns.worker)
        print(json.dumps(_worker(spec["tool"], spec["config"], spec["pp"])), flush=True)
        if spec["tool"] in ("autoshard", "full"):
            sys.stderr.flush()
            os._exit(0)  # as `nxd-autoshard plan` ends (tools/cli.py)
        return
    tools = [t for t in ns.tools.split(",") if t]
    runs = [
        ("70B shape", dict(MODELS["70B"], num_hidden_layers=n), n)
        for n in (int(x) for x in ns.layers.split(",") if x)
    ]
    runs += [
        (f"Llama-3-{m}" if m != "405B" else "Llama-3.1-405B", MODELS[m], 0)
        for m in ns.models.split(",")
        if m
    ]
    rows = []
    for name, config, _ in runs:
        layers = config["num_hidden_layers"]
        pp = min(PP, layers)
        results = {}
        peers_at = {int(x) for x in ns.peers_at.split(",") if x}
        for tool in tools:
            if tool == "full" and layers > ns.full_up_to:
                continue
            sweep = name == "70B shape"
            if tool in ("full", "pipeline") and sweep and peers_at and layers not in peers_at:
                continue
            results[tool] = _measure(tool, config, pp)
            print(name, layers, tool, json.dumps(results[tool]), flush=True)
        rows.append((name, layers, pp, results))
        _write(rows, ns.no_write)  # after every row: a long run that is stopped keeps its rows


def _write(rows: list, no_write: bool) -> None:
    per_pass = [
        (name, layers, r["autoshard"]["per_pass"])
        for name, layers, _, r in rows
        if "autoshard" in r and "per_pass" in r["autoshard"]
    ]
    body = [
        f"- Date: {datetime.date.today().isoformat()}; {_machine()}; 1 thread; load average "
        f"{LOAD_AT_START:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (the machine is "
        "shared: wall times move with the load, CPU seconds much less)",
        f"- Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/plan_scale.py "
        f"{' '.join(sys.argv[1:])}`".replace(" `", "`")
        + f" (tp {TP}, "
        f"pp min({PP}, layers), microbatch {BATCH} x {SEQ} token ids on meta, bf16 shapes; every "
        "cell is one fresh process, wall time including interpreter start and imports)",
        "",
        _table(rows),
    ]
    if per_pass:
        name, layers, passes = per_pass[-1]
        body += [
            "",
            f"- Other passes of {name} ({layers} layers): "
            + ", ".join(f"{k} {v:.2f} s" for k, v in passes.items()),
        ]
    text = "\n".join(body)
    if no_write:
        print(text)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _results import write_section

        write_section(SECTION, text)


def _machine() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _results import machine

    return machine()


if __name__ == "__main__":
    main()
