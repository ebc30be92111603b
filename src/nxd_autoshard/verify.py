"""Check a sharded model against the unsharded one: loss, outputs and every parameter gradient."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree

from .hf import build_model, load_config, random_batch
from .sharded import autoshard

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


def compare(name: str, got: torch.Tensor, want: torch.Tensor, *, rtol: float = 1e-4, atol: float = 1e-5) -> Check:
    """Float32 round-off check scaled by the reference's magnitude."""
    if got.shape != want.shape:
        return Check(f"{name} (shape {tuple(got.shape)} vs {tuple(want.shape)})", float("inf"), float("inf"), False)
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
    leaves = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return sum((t.float() ** 2).mean() for t in leaves)


def _float_outputs(output) -> dict[str, torch.Tensor]:
    items = output.items() if hasattr(output, "items") else enumerate(pytree.tree_leaves(output))
    return {str(k): v for k, v in items if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0}


def _reference(model, args, kwargs):
    ref = copy.deepcopy(model)
    out = ref(*args, **kwargs)
    loss = loss_of(out)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in ref.named_parameters() if p.grad is not None}
    return loss.detach(), {k: v.detach() for k, v in _float_outputs(out).items()}, grads


def _sharded_run(model, tp, args, kwargs, plan):
    sharded = autoshard(model, tp, example_inputs=args, example_kwargs=kwargs, plan=plan)
    out = sharded(*args, **kwargs)
    loss = loss_of(out)
    loss.backward()
    return sharded, loss.detach(), {k: v.detach() for k, v in _float_outputs(out).items()}, sharded.gather_grads()


def _rank_worker(rank, world, config_dict, tp, plan, batch, seq, seed):
    model = build_model(config_dict, seed=seed)
    args, kwargs = random_batch(model, batch=batch, seq=seq, seed=seed + 1)
    _, loss, outs, grads = _sharded_run(model, tp, args, kwargs, plan)
    return (loss, outs, grads) if rank == 0 else None


def verify_config(
    config,
    tp: int,
    *,
    world: str = "gloo",
    plan="auto",
    batch: int = 2,
    seq: int = 16,
    seed: int = 0,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> list[Check]:
    """Compare the sharded model (gloo processes or the simulator) with the unsharded one in this process."""
    config = load_config(config)
    model = build_model(config, seed=seed)
    args, kwargs = random_batch(model, batch=batch, seq=seq, seed=seed + 1)
    ref_loss, ref_outs, ref_grads = _reference(model, args, kwargs)
    if world == "sim":
        _, loss, outs, grads = _sharded_run(model, tp, args, kwargs, plan)
    elif world == "gloo":
        from .launch import run_ranks

        config_dict = config.to_dict()
        results = run_ranks(_rank_worker, tp, args=(config_dict, tp, plan, batch, seq, seed))
        loss, outs, grads = results[0]
    else:
        raise ValueError(f"unknown world '{world}': use 'gloo' (processes) or 'sim' (one process)")
    checks = [compare("loss", loss, ref_loss, rtol=rtol, atol=atol)]
    for name, want in ref_outs.items():
        got = outs.get(name)
        checks.append(compare(f"output {name}", got, want, rtol=rtol, atol=atol) if got is not None
                      else Check(f"output {name} (missing)", float("inf"), float("inf"), False))
    for name, want in ref_grads.items():
        got = grads.get(name)
        checks.append(compare(f"grad {name}", got, want, rtol=rtol, atol=atol) if got is not None
                      else Check(f"grad {name} (missing)", float("inf"), float("inf"), False))
    return checks
