"""Check a sharded model against the unsharded one: loss, outputs and every parameter gradient."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree

from nxd_autoshard.api import autoshard
from nxd_autoshard.ir.mesh import Mesh
from nxd_autoshard.runtime.pipeline import chunk_batch
from nxd_autoshard.tools.hf import build_model, load_config, random_batch

__all__ = ["Check", "compare", "verify_config", "loss_of"]


@dataclass
class Check:
    """One comparison: name, max abs difference, max relative difference, pass/fail."""

    name: str
    max_abs: float
    max_rel: float
    ok: bool

    def line(self) -> str:
        status = "ok" if self.ok else "MISMATCH"
        return f"{status:8s} {self.name:60s} max abs {self.max_abs:.2e}  max rel {self.max_rel:.2e}"


def compare(
    name: str, got: torch.Tensor, want: torch.Tensor, *, rtol: float = 1e-4, atol: float = 1e-5
) -> Check:
    """Float32 round-off check scaled by the reference's magnitude."""
    if got.shape != want.shape:
        return Check(
            f"{name} (shape {tuple(got.shape)} vs {tuple(want.shape)})",
            float("inf"),
            float("inf"),
            False,
        )
    got, want = got.detach().double(), want.detach().double()
    diff = (got - want).abs()
    scale = want.abs().max().item() if want.numel() else 0.0
    max_abs = diff.max().item() if diff.numel() else 0.0
    max_rel = max_abs / scale if scale else max_abs
    return Check(name, max_abs, max_rel, max_abs <= atol + rtol * scale)


def loss_of(output) -> torch.Tensor:
    """The model's loss, or a fixed function of its float outputs when it returns none."""
    loss = getattr(output, "loss", None)
    if loss is not None:
        return loss
    leaves = [
        t
        for t in pytree.tree_leaves(output)
        if isinstance(t, torch.Tensor) and t.is_floating_point()
    ]
    return sum((t.float() ** 2).mean() for t in leaves)


def _float_outputs(output) -> dict[str, torch.Tensor]:
    items = output.items() if hasattr(output, "items") else enumerate(pytree.tree_leaves(output))
    return {
        str(k): v
        for k, v in items
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0
    }


# tolerances (rtol, atol) of the checks: fp32 round-off, or bf16's (8-bit mantissa) against
# the unsharded model run in bf16
TOLERANCES = {"fp32": (1e-4, 1e-5), "bf16": (4e-2, 1e-3)}


def _reference(model, args, kwargs, precision: str = "fp32"):
    """The unsharded model's loss, outputs and fp32 gradients; with precision="bf16" its bf16 copy
    (`model.to(bfloat16)`, float inputs cast) as the sharded program computes from fp32 masters."""
    ref = copy.deepcopy(model)
    if precision == "bf16":
        ref = ref.to(torch.bfloat16)
        args, kwargs = pytree.tree_map(
            lambda x: (
                x.to(torch.bfloat16) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
            ),
            (args, kwargs),
        )
    out = ref(*args, **kwargs)
    loss = loss_of(out)
    loss.backward()
    grads = {
        n: p.grad.detach().float().clone() for n, p in ref.named_parameters() if p.grad is not None
    }
    return loss.detach(), {k: v.detach() for k, v in _float_outputs(out).items()}, grads


def _sharded_run(model, tp, args, kwargs, plan, features):
    sharded = autoshard(
        model, tp, example_inputs=args, example_kwargs=kwargs, plan=plan, **features
    )
    out = sharded(*args, **kwargs)
    loss = loss_of(out)
    loss.backward()
    return (
        sharded,
        loss.detach(),
        {k: v.detach() for k, v in _float_outputs(out).items()},
        sharded.gather_grads(),
    )


def _pipelined(model, tp, args, kwargs, plan, mesh: Mesh, microbatches, schedule, features):
    return autoshard(
        model,
        tp,
        pp=mesh.pp,
        dp=mesh.dp,
        microbatches=microbatches,
        schedule=schedule,
        example_inputs=args,
        example_kwargs=kwargs,
        plan=plan,
        loss_fn=lambda output, target: loss_of(output),
        **features,
    )


def _rank_worker(
    rank,
    world,
    config_dict,
    tp,
    plan,
    batch,
    seq,
    seed,
    pp=1,
    dp=1,
    microbatches=None,
    schedule="1f1b",
    features=None,
):
    features = features or {}
    model = build_model(config_dict, seed=seed)
    args, kwargs = random_batch(model, batch=batch, seq=seq, seed=seed + 1)
    if pp == 1 and dp == 1:
        _, loss, outs, grads = _sharded_run(model, tp, args, kwargs, plan, features)
        return (loss, outs, grads) if rank == 0 else None
    mesh = Mesh(dp, pp, tp)
    where = mesh.coords(rank)
    args, kwargs = chunk_batch(args, kwargs, dp)[where["dp"]]
    sharded = _pipelined(model, tp, args, kwargs, plan, mesh, microbatches, schedule, features)
    loss = sharded.train_step(*args, **kwargs)
    grads = sharded.gather_grads()  # every rank joins its tp group's gathers
    # one rank per stage reports: its stage's gradients (the loss is the same everywhere)
    return (loss, {}, grads) if where["tp"] == 0 and where["dp"] == 0 else None


def verify_config(
    config,
    tp: int,
    *,
    pp: int = 1,
    dp: int = 1,
    microbatches: int | None = None,
    schedule: str = "1f1b",
    world: str = "gloo",
    plan="auto",
    batch: int | None = None,
    seq: int = 16,
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
    activation_checkpointing: str | None = None,
    precision: str = "fp32",
    reduce_dtype: str | None = None,
    sequence_parallel: bool = False,
) -> list[Check]:
    """Compare the sharded model (gloo processes or the simulator) with the unsharded one in this process.

    With pp or dp > 1 the sharded side runs `train_step` on dp x microbatches chunks of the batch
    and its loss and gradients are compared with the unsharded model's on the whole batch.
    activation_checkpointing / precision / reduce_dtype / sequence_parallel go to autoshard; with precision="bf16" the reference is
    the unsharded model in bf16 and rtol / atol default to bf16's round-off (`TOLERANCES`).
    """
    if precision not in TOLERANCES:
        raise ValueError(f"unknown precision '{precision}': use one of {', '.join(TOLERANCES)}")
    rtol = TOLERANCES[precision][0] if rtol is None else rtol
    atol = TOLERANCES[precision][1] if atol is None else atol
    features = {
        "activation_checkpointing": activation_checkpointing,
        "precision": precision,
        "reduce_dtype": reduce_dtype,
        "sequence_parallel": sequence_parallel,
    }
    if world not in ("gloo", "sim"):
        raise ValueError(f"unknown world '{world}': use 'gloo' (processes) or 'sim' (one process)")
    config = load_config(config)
    microbatches = microbatches or (pp if pp > 1 else 1)
    batch = batch or max(2, dp * microbatches)
    model = build_model(config, seed=seed)
    args, kwargs = random_batch(model, batch=batch, seq=seq, seed=seed + 1)
    ref_loss, ref_outs, ref_grads = _reference(model, args, kwargs, precision)
    mesh = Mesh(dp, pp, tp)
    if world == "sim" and mesh.size == tp:
        _, loss, outs, grads = _sharded_run(model, tp, args, kwargs, plan, features)
    elif world == "sim":
        sharded = _pipelined(model, tp, args, kwargs, plan, mesh, microbatches, schedule, features)
        with torch.no_grad():
            outs = _float_outputs(sharded.simulate(*args, **kwargs))
        loss = sharded.train_step(*args, **kwargs)
        grads = sharded.gather_grads()
    else:
        from nxd_autoshard.tools.launch import run_ranks

        results = run_ranks(
            _rank_worker,
            mesh.size,
            args=(
                config.to_dict(),
                tp,
                plan,
                batch,
                seq,
                seed,
                pp,
                dp,
                microbatches,
                schedule,
                features,
            ),
        )
        loss, outs, grads = results[0]
        for part in results[1:]:
            if part is not None:
                grads.update(part[2])
        if mesh.size != tp:
            ref_outs = {}  # outputs stay on the last stage, per microbatch; loss and grads are checked
    checks = [compare("loss", loss, ref_loss, rtol=rtol, atol=atol)]
    for name, want in ref_outs.items():
        got = outs.get(name)
        checks.append(
            compare(f"output {name}", got, want, rtol=rtol, atol=atol)
            if got is not None
            else Check(f"output {name} (missing)", float("inf"), float("inf"), False)
        )
    for name, want in ref_grads.items():
        got = grads.get(name)
        checks.append(
            compare(f"grad {name}", got, want, rtol=rtol, atol=atol)
            if got is not None
            else Check(f"grad {name} (missing)", float("inf"), float("inf"), False)
        )
    return checks
