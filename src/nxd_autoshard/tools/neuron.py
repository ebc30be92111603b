"""The neuronx-cc hand-off: every stage program of a plan traced on the XLA device, proved one
program for all its tp ranks, written as an HLO module proto with a manifest and the
`neuronx-cc compile` command line.

    nxd-autoshard compile --config cfg.json --tp 8 --pp 4 --target trn1 -o DIR

writes into DIR, per stage s: `stage{s}.hlo.pb` (the serialized HloModuleProto of the stage's
training program: forward and backward, the step's dp / tied-weight gradient all-reduces),
`stage{s}.hlo.txt` (its text), and `manifest.json` (mesh, replica groups, each stage's ranks,
input/output signature, parameter names and shards, collectives, the command line). neuronx-cc
runs when it is installed (AWS's Neuron pip repository; PyPI's package is a placeholder whose
import raises "WRONG PACKAGE"); otherwise the command says so and stops after writing the files.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nxd_autoshard.ir.mesh import Mesh
from nxd_autoshard.ir.placements import Shard, placement_str, shard_tensor
from nxd_autoshard.runtime import xla
from nxd_autoshard.runtime.base import state_value

__all__ = [
    "TARGETS",
    "StageSpec",
    "compile_for_neuron",
    "neuron_compiler",
    "neuronx_cc_command",
    "prove_one_program",
    "stage_specs",
    "trace_stage",
]

TARGETS = ("trn1", "trn2")
NEURON_HELP = (
    "neuronx-cc is not installed: it comes from the AWS Neuron pip repository (pip install "
    "neuronx-cc --extra-index-url https://pip.repos.neuron.amazonaws.com) on a Trainium host; "
    "PyPI's neuronx-cc is a placeholder"
)


def neuronx_cc_command(
    hlo: str | Path,
    output: str | Path,
    *,
    target: str,
    optlevel: int = 2,
    training: bool = True,
    auto_cast: str = "none",
    logical_cores: int | None = None,
    logfile: str | Path | None = None,
) -> list[str]:
    """The `neuronx-cc compile` argv for one HLO module proto.

    --framework XLA: the input is an HloModuleProto. --target: the instance family (trn1 covers
    trn1n). --model-type transformer: the compiler's transformer-specific optimisations (NxD
    passes it for LLMs). --distribution-strategy llm-training: its optimisations for NxD-style
    sharded training programs (training only). -O: optimisation level 1-3 (2 is its default).
    --auto-cast none: the program's own dtypes (bf16 casts are in the program already with
    precision=bf16), no compiler down-casting. --logical-nc-config (trn2 only): NeuronCores per
    logical core, trn2's default 2. --output: the NEFF file.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if optlevel not in (1, 2, 3):
        raise ValueError(f"optlevel must be 1, 2 or 3, got {optlevel}")
    argv = [
        "neuronx-cc",
        "compile",
        str(hlo),
        "--framework",
        "XLA",
        "--target",
        target,
        "--model-type",
        "transformer",
        f"-O{optlevel}",
        "--auto-cast",
        auto_cast,
    ]
    if training:
        argv += ["--distribution-strategy", "llm-training"]
    if target == "trn2":
        argv += ["--logical-nc-config", str(logical_cores or 2)]
    elif logical_cores is not None:
        raise ValueError("--logical-nc-config applies to trn2 only")
    argv += ["--output", str(output)]
    if logfile is not None:
        argv += ["--logfile", str(logfile)]
    return argv


def neuron_compiler() -> tuple[str | None, str]:
    """The neuronx-cc executable, or None and why not (absent, or PyPI's placeholder)."""
    exe = shutil.which("neuronx-cc")
    try:
        import neuronxcc  # noqa: F401
    except ImportError as err:  # absent, or the placeholder: "WRONG PACKAGE ..."
        return None, f"{NEURON_HELP} (import neuronxcc: {err})"
    if exe is None:
        return None, f"{NEURON_HELP} (the neuronxcc module imports but no neuronx-cc is on PATH)"
    return exe, "ok"


# ------------------------------------------------------------------ the programs of a plan
@dataclass
class StageSpec:
    """One distinct program: a pipeline stage (or the whole model at pp 1) and its example inputs."""

    index: int
    gm: torch.fx.GraphModule
    state_names: list[str]
    input_names: list[str]
    output_names: list[str]
    inputs: list[Any]  # example CPU values of the user / received inputs
    is_last: bool = True
    ranks: list[list[int]] = field(default_factory=list)  # [dp][tp] global ranks running it


def _refuse_buffer_writes(program) -> None:
    """The hand-off's programs return the model's outputs only: a forward that writes buffers
    (their new values lead the outputs) is refused by name rather than traced as if it did not."""
    if program.mutated:
        raise ValueError(
            f"the XLA hand-off does not carry buffers written in forward yet "
            f"({', '.join(program.mutated[:3])}{', ...' if len(program.mutated) > 3 else ''}); "
            "trace the model in eval mode (model.eval()), or run it on the eager runtimes"
        )


def stage_specs(sharded, args: tuple, kwargs: dict) -> list[StageSpec]:
    """The distinct programs of a ShardedModule at this call (one per pipeline stage)."""
    mesh: Mesh = sharded.mesh
    if sharded.pipeline.virtual != 1:
        raise ValueError(
            "the XLA hand-off supports one stage per pp rank (no interleaved schedules)"
        )
    if sharded.pipeline.n_stages == 1:
        entry, flat = sharded._program_for(args, kwargs)
        program = entry.program
        program.check_token_inputs(flat)
        _refuse_buffer_writes(program)
        placeholders = [n for n in program.gm.graph.nodes if n.op == "placeholder"]
        outputs = [str(a) for a in program.gm.graph.output_node().args[0]]
        return [
            StageSpec(
                0,
                program.gm,
                list(program.state_names),
                [n.name for n in placeholders[program.num_state :]],
                outputs,
                list(flat),
                True,
                _stage_ranks(mesh, 0),
            )
        ]
    from nxd_autoshard.runtime.pipeline import chunk_batch

    chunk = chunk_batch(args, sharded._cache.with_defaults(kwargs), sharded.pipeline.microbatches)[
        0
    ]
    entry, flat = sharded._program_for(*chunk)
    entry.program.check_token_inputs(flat)
    _refuse_buffer_writes(entry.program)
    specs = []
    carried = [x for x in flat if isinstance(x, torch.Tensor)]
    for stage in entry.stages:
        placeholders = [n for n in stage.gm.graph.nodes if n.op == "placeholder"]
        received = placeholders[len(stage.state_names) :]
        inputs = carried if stage.index == 0 else [_example(n) for n in received]
        specs.append(
            StageSpec(
                stage.index,
                stage.gm,
                list(stage.state_names),
                list(stage.inputs),
                list(stage.outputs) or [str(a) for a in stage.gm.graph.output_node().args[0]],
                inputs,
                stage.is_last,
                _stage_ranks(mesh, stage.index),
            )
        )
    return specs


def _example(node) -> torch.Tensor:
    """A tensor of a received value's shape and dtype (its values do not enter the HLO)."""
    val = node.meta["val"]
    return torch.zeros(tuple(int(s) for s in val.shape), dtype=val.dtype)


def _stage_ranks(mesh: Mesh, stage: int) -> list[list[int]]:
    return [[mesh.rank(dp=d, pp=stage, tp=t) for t in range(mesh.tp)] for d in range(mesh.dp)]


def _rank_state(sharded, program, spec: StageSpec, tp_rank: int) -> list[torch.Tensor]:
    out = []
    for name in spec.state_names:
        value = state_value(sharded, program, name)
        if name in sharded.full_shapes:
            value = shard_tensor(
                value.detach(),
                sharded.placements[name],
                sharded.tp,
                tp_rank,
                sharded.plan.blocks.get(name, 1),
                sharded.padded.get(name),
            )
        out.append(value)
    return out


def _grad_sync(sharded, specs: list[StageSpec], spec: StageSpec):
    """The step's gradient all-reduces of this stage: tied weights summed across the pp ranks
    holding them, then every gradient averaged over dp (NxD's order)."""
    mesh: Mesh = sharded.mesh
    params = [n for n in spec.state_names if n in sharded.full_shapes]
    syncs = []
    holders: dict[str, list[int]] = {}
    for other in specs:
        for name in other.state_names:
            holders.setdefault(name, []).append(other.index)
    tied: dict[tuple[int, ...], list[str]] = {}  # holding stages -> the weights they share
    for name in params:
        if len(holders.get(name, [])) > 1:
            tied.setdefault(tuple(holders[name]), []).append(name)
    for stages, names in sorted(tied.items()):
        groups = [
            [mesh.rank(dp=d, pp=s, tp=t) for s in stages]
            for d in range(mesh.dp)
            for t in range(mesh.tp)
        ]
        syncs.append((names, groups, 1.0))
    if mesh.dp > 1 and params:
        syncs.append((params, mesh.groups("dp"), 1.0 / mesh.dp))
    return syncs


def trace_stage(sharded, spec: StageSpec, rank: int, specs: list[StageSpec] | None = None):
    """Global `rank`'s trace of the stage program (a RankTrace; nothing runs)."""
    program = sharded.programs()[0]
    tp_rank = sharded.mesh.coords(rank)["tp"]
    return xla.trace_rank(
        spec.gm,
        _rank_state(sharded, program, spec, tp_rank),
        spec.inputs,
        mesh=sharded.mesh,
        rank=rank,
        state_names=spec.state_names,
        params=[n for n in spec.state_names if n in sharded.full_shapes],
        grad_sync=_grad_sync(sharded, specs or [spec], spec),
    )


@dataclass
class StageProof:
    """One stage: the canonical HLO of each rank traced, and whether they are one program."""

    index: int
    ranks: list[int]
    hlo: dict[int, str]
    seconds: float
    collectives: dict[tuple[str, str], int]
    expected: dict[tuple[str, str], int]

    @property
    def identical(self) -> bool:
        return len(set(self.hlo.values())) == 1

    @property
    def collectives_match(self) -> bool:
        return self.collectives == self.expected


def expected_collectives(sharded, specs: list[StageSpec], spec: StageSpec) -> dict:
    """Our count: the stage program's collectives over the tp groups, plus its gradient syncs."""
    tp = xla.hlo_groups(sharded.mesh.groups("tp"))
    # the placeholders trace_rank gives a gradient: parameters and the floating inputs
    n_state = len(spec.state_names)
    with_grad = {i for i, n in enumerate(spec.state_names) if n in sharded.full_shapes}
    with_grad |= set(range(n_state, n_state + len(spec.inputs)))
    counts = xla.program_collectives(spec.gm, grad_inputs=with_grad)
    out = {(kind, tp): n for kind, n in counts.items()}
    for _, groups, _ in _grad_sync(sharded, specs, spec):
        key = ("all-reduce", xla.hlo_groups(groups))
        out[key] = out.get(key, 0) + 1
    return out


def prove_one_program(sharded, args: tuple, kwargs: dict, *, ranks: str = "tp") -> list[StageProof]:
    """Trace every tp rank (ranks="tp": those of dp replica 0; "all": every rank) of every stage
    and read their HLO: one program per stage when the canonical texts are equal."""
    specs = stage_specs(sharded, args, kwargs)
    proofs = []
    for spec in specs:
        chosen = spec.ranks[0] if ranks == "tp" else [r for row in spec.ranks for r in row]
        texts, started = {}, time.perf_counter()
        for rank in chosen:
            texts[rank] = xla.canonical_hlo(trace_stage(sharded, spec, rank, specs).hlo_text())
        seconds = (time.perf_counter() - started) / len(chosen)
        first = texts[chosen[0]]
        proofs.append(
            StageProof(
                spec.index,
                chosen,
                texts,
                seconds,
                xla.hlo_collectives(first),
                expected_collectives(sharded, specs, spec),
            )
        )
    return proofs


# ------------------------------------------------------------------ the command
def _signature(values: Sequence[Any], names: Sequence[str]) -> list[dict]:
    out = []
    for name, v in zip(names, values):
        if isinstance(v, torch.Tensor):
            out.append({"name": name, "shape": list(v.shape), "dtype": str(v.dtype)})
        else:
            out.append({"name": name, "value": repr(v)})
    return out


def _named(parameters: list[dict], input_names: Sequence[str]) -> list[dict]:
    """HLO parameters with program inputs called by their names."""
    for p in parameters:
        if p["role"] == "input":
            p["name"] = input_names[int(p["name"])]
    return parameters


def _results(trace, spec: StageSpec) -> list[dict]:
    """The HLO result tuple, element by element: outputs, parameter gradients, input gradients."""
    out = []
    for (role, name), tensor in zip(trace.result_roles(), trace.results()):
        if role == "output":
            name = spec.output_names[int(name)]
        elif role == "input_gradient":
            name = spec.input_names[int(name)]
        out.append(
            {"role": role, "name": name, "shape": list(tensor.shape), "dtype": str(tensor.dtype)}
        )
    return out


def _out_signature(gm: torch.fx.GraphModule, names: Sequence[str]) -> list[dict]:
    out = []
    for name, node in zip(names, gm.graph.output_node().args[0]):
        val = node.meta.get("val") if hasattr(node, "meta") else None
        if isinstance(val, torch.Tensor):
            shape = [int(s) if not isinstance(s, torch.SymInt) else str(s) for s in val.shape]
            out.append({"name": name, "shape": shape, "dtype": str(val.dtype)})
        else:
            out.append({"name": name})
    return out


def compile_for_neuron(
    config,
    tp: int,
    out_dir: str | Path,
    *,
    pp: int = 1,
    dp: int = 1,
    target: str = "trn1",
    batch: int = 2,
    seq: int = 128,
    microbatches: int | None = None,
    optlevel: int = 2,
    plan: str = "auto",
    check_ranks: bool = True,
    run_compiler: bool | None = None,
    seed: int = 0,
) -> dict:
    """Write each stage's HLO module proto, the manifest and the neuronx-cc command lines into
    `out_dir`; run neuronx-cc where it is installed (run_compiler=None: when found). Returns the
    manifest. `batch` is one microbatch with pp > 1."""
    from nxd_autoshard.api import autoshard
    from nxd_autoshard.tools.hf import build_model

    neuronx_cc_command("x", "y", target=target, optlevel=optlevel)  # check the flags first
    xla.require_xla()  # before building anything
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = build_model(config, seed=seed)
    microbatches = microbatches or (pp if pp > 1 else 1)
    total = batch * (microbatches if pp > 1 else 1)
    gen = torch.Generator().manual_seed(seed + 1)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (total, seq), generator=gen)
    kwargs = {"labels": torch.randint(0, vocab, (total, seq), generator=gen)}
    sharded = autoshard(
        model,
        tp,
        pp=pp,
        dp=dp,
        microbatches=microbatches,
        plan=plan,
        example_inputs=(ids,),
        example_kwargs=kwargs,
    )
    plan_seconds = time.perf_counter() - started
    specs = stage_specs(sharded, (ids,), kwargs)
    mesh = sharded.mesh
    exe, why = neuron_compiler()
    run = exe is not None if run_compiler is None else run_compiler
    stages = []
    seen: dict[str, int] = {}  # canonical HLO -> the first stage with it
    for spec in specs:
        t0 = time.perf_counter()
        first = spec.ranks[0][0]
        trace = trace_stage(sharded, spec, first, specs)
        text = trace.hlo_text()
        proto = trace.hlo_proto()
        trace_seconds = time.perf_counter() - t0
        identical = None
        if check_ranks:  # one program for the stage: every tp rank's HLO equals the first's
            want = xla.canonical_hlo(text)
            identical = all(
                xla.canonical_hlo(trace_stage(sharded, spec, r, specs).hlo_text()) == want
                for r in spec.ranks[0][1:]
            )
            if not identical:
                raise RuntimeError(
                    f"stage {spec.index}: the tp ranks' HLO differ; they cannot share one NEFF"
                )
        hlo_file, neff = f"stage{spec.index}.hlo.pb", f"stage{spec.index}.neff"
        (out / hlo_file).write_bytes(proto)
        (out / f"stage{spec.index}.hlo.txt").write_text(text)
        argv = neuronx_cc_command(
            hlo_file, neff, target=target, optlevel=optlevel, logfile=f"stage{spec.index}.log"
        )
        canonical = hashlib.sha256(xla.canonical_hlo(text).encode()).hexdigest()
        same_as = seen.setdefault(canonical, spec.index)
        found = {f"{k}{g and ' ' + g}": n for (k, g), n in xla.hlo_collectives(text).items()}
        params = [n for n in spec.state_names if n in sharded.full_shapes]
        stages.append(
            {
                "stage": spec.index,
                "ranks": spec.ranks,
                "hlo": hlo_file,
                "hlo_text": f"stage{spec.index}.hlo.txt",
                "hlo_bytes": len(proto),
                "hlo_sha256": hashlib.sha256(proto).hexdigest(),
                "trace_seconds": round(trace_seconds, 3),
                "tp_ranks_identical": identical,
                # middle stages of equal blocks are often one program: one NEFF serves them
                "same_program_as_stage": same_as if same_as != spec.index else None,
                "inputs": _signature(spec.inputs, spec.input_names),
                "outputs": _out_signature(spec.gm, spec.output_names),
                "hlo_parameters": _named(trace.parameters(), spec.input_names),
                "hlo_results": _results(trace, spec),
                "parameters": [
                    {
                        "name": n,
                        "full_shape": list(sharded.full_shapes[n]),
                        "local_shape": list(sharded.local_shape(n)),
                        "placement": placement_str(sharded.placements[n]),
                        "dim": sharded.placements[n].dim
                        if isinstance(sharded.placements[n], Shard)
                        else None,
                        "blocks": sharded.plan.blocks.get(n, 1),
                        "padded": sharded.padded.get(n),
                    }
                    for n in params
                ],
                "buffers": [n for n in spec.state_names if n not in sharded.full_shapes],
                "collectives": found,
                "neuronx_cc": argv,
            }
        )
    manifest = {
        "model": type(model).__name__,
        "config": model.config.to_dict(),
        "mesh": {"tp": mesh.tp, "pp": mesh.pp, "dp": mesh.dp, "order": "tp fastest, then pp, dp"},
        "replica_groups": xla.replica_groups(mesh),
        "target": target,
        "batch": {"microbatch": batch, "microbatches": microbatches, "seq": seq},
        "program": "training step: forward, backward, gradient all-reduces (dp, tied weights)",
        "rank_input": "tp_rank: the rank's tp coordinate, an int64 scalar HLO parameter (not a constant)",
        "plan_seconds": round(plan_seconds, 3),
        "stages": stages,
        "neuronx_cc": {"found": exe is not None, "status": why, "ran": False},
    }
    if run:
        if exe is None:
            raise RuntimeError(why)
        for stage in stages:
            try:
                subprocess.run([exe, *stage["neuronx_cc"][1:]], cwd=out, check=True)
            except subprocess.CalledProcessError as err:
                raise RuntimeError(
                    f"neuronx-cc failed on stage {stage['stage']} (exit {err.returncode}); see "
                    f"{out / ('stage%d.log' % stage['stage'])}"
                ) from err
        manifest["neuronx_cc"]["ran"] = True
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
    return manifest
