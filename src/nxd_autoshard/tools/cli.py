"""Command line.

nxd-autoshard verify --config cfg.json --tp 4 [--pp 2 --dp 2 --schedule 1f1b] [--world gloo|sim]
    [--activation-checkpointing full|selective] [--precision bf16] [--sequence-parallel]
nxd-autoshard plan --config cfg.json --tp 8 [--sequence-parallel] [--format text|json|html] [-o FILE]
nxd-autoshard compile --config cfg.json --tp 8 --pp 4 --target trn1|trn2 -o DIR  (torch-xla)
"""

from __future__ import annotations

import argparse
import os
import sys

from nxd_autoshard.compiler.split import BALANCE
from nxd_autoshard.ir.errors import AutoshardError
from nxd_autoshard.runtime.pipeline import SCHEDULES

__all__ = ["main"]


def _verify(ns: argparse.Namespace) -> int:
    from nxd_autoshard.tools.verify import verify_config

    checks = verify_config(
        ns.config,
        ns.tp,
        pp=ns.pp,
        dp=ns.dp,
        microbatches=ns.microbatches,
        schedule=ns.schedule,
        world=ns.world,
        plan=ns.plan,
        batch=ns.batch,
        seq=ns.seq,
        seed=ns.seed,
        rtol=ns.rtol,
        atol=ns.atol,
        activation_checkpointing=ns.activation_checkpointing,
        precision=ns.precision,
        sequence_parallel=ns.sequence_parallel,
    )
    for check in checks:
        print(check.line())
    bad = [c for c in checks if not c.ok]
    print(f"{len(checks) - len(bad)} passed, {len(bad)} failed")
    return 1 if bad else 0


def _fail(message: str) -> int:
    print(f"nxd-autoshard: error: {message}", file=sys.stderr)
    return 2


def _plan(ns: argparse.Namespace) -> int:
    import json

    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from nxd_autoshard.compiler.driver import pass_names
    from nxd_autoshard.inspect.report import explain
    from nxd_autoshard.tools.plan_meta import plan_on_meta

    steps = [
        "build model on meta",
        *pass_names(ns.pp, sequence_parallel=ns.sequence_parallel),
        "report",
    ]
    err = Console(stderr=True)
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err,
        transient=not ns.keep_progress,
        disable=ns.quiet,
    ) as bar:
        task = bar.add_task(steps[0], total=len(steps))

        def step(name: str, seconds: float) -> None:
            done = bar.tasks[0].completed + 1
            if not ns.quiet:
                bar.console.print(f"  {name}: {seconds:.2f} s")
            bar.update(task, completed=done, description=steps[min(done, len(steps) - 1)])

        try:
            sharded = plan_on_meta(
                ns.config,
                ns.tp,
                plan=ns.plan,
                batch=ns.batch,
                seq=ns.seq,
                step=step,
                pp=ns.pp,
                microbatches=ns.microbatches,
                schedule=ns.schedule,
                balance=ns.balance,
                sequence_parallel=ns.sequence_parallel,
            )
        except (ValueError, AutoshardError) as err:
            return _fail(str(err))
        report = explain(sharded.compiled)
        bar.update(task, completed=len(steps), description="done")
    if ns.format == "json":
        text = json.dumps(report.to_dict(), indent=1)
    elif ns.format == "html":
        text = (
            "<!doctype html><html><head><meta charset='utf-8'><title>nxd-autoshard plan: "
            f"{report.model}</title></head><body>{report.to_html()}</body></html>"
        )
    else:
        text = report.to_text(full=ns.full)
    if ns.output:
        with open(ns.output, "w") as f:
            f.write(text)
        print(f"wrote {ns.output}", file=sys.stderr)
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def _compile(ns: argparse.Namespace) -> int:
    import json

    from nxd_autoshard.tools.neuron import compile_for_neuron

    try:
        manifest = compile_for_neuron(
            ns.config,
            ns.tp,
            ns.output,
            pp=ns.pp,
            dp=ns.dp,
            target=ns.target,
            batch=ns.batch,
            seq=ns.seq,
            microbatches=ns.microbatches,
            optlevel=ns.optlevel,
            plan=ns.plan,
            check_ranks=not ns.no_check_ranks,
            run_compiler=True if ns.run_compiler else None,
        )
    except (ImportError, ValueError, RuntimeError, AutoshardError) as err:
        return _fail(str(err))
    for stage in manifest["stages"]:
        same = {True: "one program for its tp ranks", None: "tp ranks not checked"}
        print(
            f"stage {stage['stage']}: {stage['hlo']} ({stage['hlo_bytes']} bytes, "
            f"{same.get(stage['tp_ranks_identical'])}), collectives "
            f"{json.dumps(stage['collectives'])}"
        )
        print("  " + " ".join(stage["neuronx_cc"]))
    print(f"wrote {ns.output}/manifest.json")
    if not manifest["neuronx_cc"]["ran"]:
        print(f"not compiled: {manifest['neuronx_cc']['status']}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nxd-autoshard", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="compare a sharded HF model with the unsharded one")
    v.add_argument("--config", required=True, help="config.json, or a folder holding one")
    v.add_argument("--tp", type=int, required=True, help="tensor-parallel degree")
    v.add_argument("--pp", type=int, default=1, help="pipeline stages")
    v.add_argument("--dp", type=int, default=1, help="data-parallel replicas")
    v.add_argument("--microbatches", type=int, default=None, help="per step (default: pp)")
    v.add_argument(
        "--schedule",
        choices=sorted(SCHEDULES),
        default="1f1b",
        help="torch.distributed.pipelining schedule",
    )
    v.add_argument(
        "--world",
        choices=("gloo", "sim"),
        default="gloo",
        help="gloo: dp x pp x tp local processes; sim: one process, emulated collectives",
    )
    v.add_argument(
        "--plan", default="auto", help="auto, a family name (llama, gpt2, ...) or a YAML file"
    )
    v.add_argument("--batch", type=int, default=None, help="default: max(2, dp x microbatches)")
    v.add_argument("--seq", type=int, default=16)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument(
        "--activation-checkpointing",
        choices=("full", "selective"),
        default=None,
        help="recompute each repeated block (full) or the attention core (selective) in backward",
    )
    v.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="bf16: bf16 compute from fp32 master weights, checked against the model in bf16",
    )
    v.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="Megatron-SP: norms and residual adds on Shard(seq); --seq must be a multiple of tp",
    )
    v.add_argument("--rtol", type=float, default=None, help="default: 1e-4 (bf16: 4e-2)")
    v.add_argument("--atol", type=float, default=None, help="default: 1e-5 (bf16: 1e-3)")
    v.set_defaults(func=_verify)
    p = sub.add_parser("plan", help="plan a model from its config on the meta device and report it")
    p.add_argument("--config", required=True, help="config.json, or a folder holding one")
    p.add_argument("--tp", type=int, required=True, help="tensor-parallel degree")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages")
    p.add_argument(
        "--microbatches",
        type=int,
        default=None,
        help="per step (default: pp); the example batch is one microbatch",
    )
    p.add_argument("--schedule", choices=sorted(SCHEDULES), default="1f1b")
    p.add_argument("--balance", choices=BALANCE, default="flops", help="how stages are balanced")
    p.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="Megatron-SP: norms and residual adds on Shard(seq), reduce-scatter / all-gather",
    )
    p.add_argument(
        "--plan", default="auto", help="auto, a family name (llama, gpt2, ...) or a YAML file"
    )
    p.add_argument("--format", choices=("text", "json", "html"), default="text")
    p.add_argument("-o", "--output", help="write the report here instead of stdout")
    p.add_argument("--batch", type=int, default=2, help="example batch (bytes are reported at it)")
    p.add_argument("--seq", type=int, default=128, help="example sequence length")
    p.add_argument("--full", action="store_true", help="text: list identical blocks too")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--keep-progress", action="store_true", help="leave the progress bar on screen")
    p.set_defaults(func=_plan)
    c = sub.add_parser(
        "compile",
        help="trace each stage program on torch-xla and write its HLO, a manifest and the "
        "neuronx-cc command (runs neuronx-cc where installed)",
    )
    c.add_argument("--config", required=True, help="config.json, or a folder holding one")
    c.add_argument("--tp", type=int, required=True, help="tensor-parallel degree")
    c.add_argument("--pp", type=int, default=1, help="pipeline stages")
    c.add_argument("--dp", type=int, default=1, help="data-parallel replicas")
    c.add_argument("--target", choices=("trn1", "trn2"), default="trn1", help="instance family")
    c.add_argument("-o", "--output", required=True, help="directory for the HLO and manifest")
    c.add_argument("--batch", type=int, default=2, help="microbatch size")
    c.add_argument("--seq", type=int, default=128, help="sequence length")
    c.add_argument("--microbatches", type=int, default=None, help="per step (default: pp)")
    c.add_argument("--optlevel", type=int, choices=(1, 2, 3), default=2, help="neuronx-cc -O")
    c.add_argument(
        "--plan", default="auto", help="auto, a family name (llama, gpt2, ...) or a YAML file"
    )
    c.add_argument(
        "--no-check-ranks", action="store_true", help="skip tracing every tp rank of each stage"
    )
    c.add_argument(
        "--run-compiler", action="store_true", help="fail unless neuronx-cc is installed and runs"
    )
    c.set_defaults(func=_compile)
    ns = parser.parse_args(argv)
    rc = ns.func(ns)
    if argv is None and ns.command == "plan":
        # the console script: the report is written; tearing down the heap of a 70B model's
        # program (millions of small objects) would take longer than some of the passes did
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc
