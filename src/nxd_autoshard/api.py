"""`autoshard()` and the ShardedModule it returns: capture, plan, propagate, partition, run."""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.distributed as dist

from nxd_autoshard.compiler.cache import ProgramCache, model_settings
from nxd_autoshard.compiler.plans import load_plan, resolve_styles
from nxd_autoshard.compiler.precision import DTYPES
from nxd_autoshard.compiler.recompute import checkpoint_mode
from nxd_autoshard.compiler.split import (
    BALANCE,
    check_stage_count,
    find_blocks,
)
from nxd_autoshard.ir.mesh import Mesh
from nxd_autoshard.module import ShardedModule
from nxd_autoshard.runtime.base import Runtime
from nxd_autoshard.runtime.compiled import CompileOptions, compile_options
from nxd_autoshard.runtime.groups import build_groups
from nxd_autoshard.runtime.pipeline import (
    PipelineConfig,
    check_schedule,
    chunk_batch,
)
from nxd_autoshard.runtime.process_group import ProcessGroupRuntime
from nxd_autoshard.runtime.simulated import SimulatorRuntime

__all__ = ["autoshard"]


def autoshard(
    model: torch.nn.Module,
    tp: int = 1,
    *,
    example_inputs: tuple = (),
    example_kwargs: Mapping[str, Any] | None = None,
    plan: str | Mapping[str, str] = "auto",
    auto: bool | None = None,
    group=None,
    pp: int = 1,
    dp: int | None = None,
    microbatches: int | None = None,
    schedule: str = "1f1b",
    pipeline_cuts: list[str] | None = None,
    balance: str = "flops",
    loss_fn=None,
    strict: bool = False,
    compile: bool | str | Mapping[str, Any] | None = None,
    activation_checkpointing: str | list[type] | None = None,
    precision: str = "fp32",
    reduce_dtype: str | None = None,
    sequence_parallel: bool = False,
) -> ShardedModule:
    """Shard an unmodified model over a (dp, pp, tp) mesh; see the README for the contract.

    plan: "auto" (infer), a dict {module pattern: style}, a YAML path, or a family name
    ("llama", "gpt2", ...); rules win over inference, which fills in the rest unless auto=False.
    pp: pipeline stages, cut between repeated blocks and balanced by forward FLOPs (balance=
    "memory": by parameter bytes; "even": blocks dealt out evenly, as NxD does; pipeline_cuts
    names the first block of each later stage).
    schedule: "gpipe", "1f1b", "interleaved" or "looped_bfs" (2 stages per rank) from
    torch.distributed.pipelining. dp: data-parallel replicas (default: the rest of the world).
    example_inputs: one step's batch as `train_step` will get it (this replica's, on a mesh), to
    capture now. Without them autoshard returns at once and the model is captured at its first
    call with the real batch (or, where a plan is needed earlier, with its own dummy_inputs).
    strict: raise PlanError instead of warning when a matmul of a repeated block stays replicated.
    compile: torch.compile every stage program of this rank, one graph each (fullgraph, static
    shapes): True (inductor), a backend name ("inductor", "aot_eager", "neuron"), or a dict of
    torch.compile options with "backend". Needs a process group (each rank compiles its own).
    activation_checkpointing: recompute in backward "full" (each repeated block), "selective"
    (the attention core: sdpa, or matmul-softmax-matmul) or the modules of a list of classes;
    regions are cut at communicating collectives, so the recompute issues none.
    precision: "fp32", or "bf16" (bf16 weights and activations computed from the fp32 master
    weights, which the optimizer steps; fp32 gradients, the model's own fp32 upcasts kept).
    reduce_dtype: None (tp's partial sums in the compute dtype, as Megatron and NxD reduce them)
    or "fp32": with bf16, the ops that make, reduce or read a tp partial sum (row-parallel
    outputs forward, column-parallel input gradients backward) run in fp32 and round once, as
    the unsharded matmul's accumulator does; twice the bytes on those collectives.
    sequence_parallel: Megatron-SP with tp > 1: norms, dropout and residual adds run on this
    rank's part of the sequence; reduce-scatters and all-gathers replace TP's all-reduces (the
    same bytes) and those activations take 1/tp of the memory. A sequence length tp does not
    divide is padded on the shards (copies of the last row, sliced off at every gather).
    """
    for name, value in (("tp", tp), ("pp", pp)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    compiled = compile_options(compile)  # before the (slow) capture: a bad backend fails now
    recompute = checkpoint_mode(activation_checkpointing)
    _check_precision(model, precision)
    if reduce_dtype not in (None, "fp32"):
        raise ValueError(
            f"reduce_dtype={reduce_dtype!r}: use None (partial sums in the compute dtype) or "
            "'fp32' (partial sums made and reduced in fp32, with precision='bf16')"
        )
    if balance not in BALANCE:
        raise ValueError(f"balance must be one of {', '.join(BALANCE)}; got {balance!r}")
    microbatches = microbatches or (pp if pp > 1 else 1)
    virtual = check_schedule(schedule, pp, microbatches) if pp > 1 else 1
    on_mesh = dist.is_available() and dist.is_initialized()
    if group is not None or not on_mesh or (pp == 1 and dp is None and dist.get_world_size() % tp):
        dp = dp or 1
    else:
        world = dist.get_world_size()
        dp = dp or max(1, world // (tp * pp))
    if group is not None and (pp > 1 or dp > 1):
        raise ValueError(
            "group= gives the tp group only; for pp/dp let autoshard build the mesh "
            "from the world (dp x pp x tp ranks)"
        )
    pipeline = PipelineConfig(
        pp=pp,
        dp=dp,
        microbatches=microbatches,
        schedule=schedule,
        virtual=virtual,
        cuts=pipeline_cuts,
        balance=balance,
    )
    if pipeline.n_stages > 1:  # fail before the (slow) capture
        n_blocks = len(find_blocks(model))
        if n_blocks:
            check_stage_count(
                pipeline.n_stages,
                n_blocks,
                type(model).__name__,
                f" (schedule '{schedule}' runs {virtual} stages per pp rank)"
                if virtual > 1
                else "",
            )
    rules = {} if plan == "auto" else load_plan(plan)
    styles = resolve_styles(model, rules)
    auto = (plan == "auto" or isinstance(plan, Mapping)) if auto is None else auto
    runtime = _choose_runtime(model, Mesh(dp, pp, tp), group, on_mesh, compiled)
    settings = model_settings(
        model,
        tp=tp,
        styles=dict(styles),
        auto=auto,
        n_stages=pipeline.n_stages,
        cuts=pipeline.cuts,
        balance=pipeline.balance,
        strict=strict,
        precision=precision,
        reduce_dtype=reduce_dtype,
        recompute=recompute,
        sequence_parallel=bool(sequence_parallel) and tp > 1,
    )
    sharded = ShardedModule(
        model, ProgramCache(model, settings), runtime=runtime, pipeline=pipeline, loss_fn=loss_fn
    )
    example_inputs, example_kwargs = tuple(example_inputs), dict(example_kwargs or {})
    if not example_inputs and not example_kwargs:
        return sharded  # captured at the first call, with the real batch
    if pipeline.n_stages > 1:
        chunks = runtime.step_chunks(sharded)
        example_inputs, example_kwargs = chunk_batch(example_inputs, example_kwargs, chunks)[0]
    sharded._program_for(example_inputs, example_kwargs)
    return sharded


def _check_precision(model: torch.nn.Module, precision: str) -> None:
    """The precision is known and the model's floating weights can be its fp32 masters."""
    if precision not in DTYPES:
        raise ValueError(
            f"precision={precision!r}: use 'fp32' or 'bf16' (fp16 would need loss scaling, "
            "which autoshard does not do)"
        )
    if precision == "fp32":
        return
    low = sorted(
        {str(p.dtype) for p in model.parameters() if p.is_floating_point()} - {"torch.float32"}
    )
    if low:
        raise ValueError(
            f"precision={precision!r} keeps the model's parameters as the fp32 master weights, "
            f"but they are {', '.join(low)}: pass the model in fp32 (model.float()); the "
            f"program computes in {precision} from them"
        )


def _choose_runtime(
    model: torch.nn.Module, mesh: Mesh, group, on_mesh: bool, compiled: CompileOptions | None
) -> Runtime:
    """The one place that decides how the module runs: a given tp group, the world's mesh, or
    (no process group initialised) every rank simulated in this process."""
    if group is not None:
        return ProcessGroupRuntime(group=group, compile=compiled)
    if on_mesh:
        return ProcessGroupRuntime(build_groups(mesh, _device_type(model)), compile=compiled)
    if compiled is not None:
        raise ValueError(
            "compile= compiles each rank's program inside its process group; without one the "
            "simulator interprets every rank in this process. Initialise torch.distributed "
            "(torchrun, or nxd_autoshard.tools.launch.run_ranks) or drop compile="
        )
    return SimulatorRuntime()


def _device_type(model: torch.nn.Module) -> str:
    for t in model.parameters():
        return t.device.type
    return "cpu"
