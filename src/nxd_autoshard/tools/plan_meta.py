"""Plan a model from its config alone: build it on the meta device, shard it, report the plan.

No weight is materialized, so a 70B config plans on a laptop: the model's tensors, the
captured program and the plan hold shapes only.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from contextlib import ExitStack

import torch

from nxd_autoshard.compiler.driver import on_pass

__all__ = ["build_meta_model", "plan_on_meta"]


def build_meta_model(config) -> torch.nn.Module:
    """The HF model of a config with every parameter and buffer on the meta device."""
    from nxd_autoshard.tools.hf import _head_class, load_config

    config = load_config(config)
    cls = _head_class(config)
    # the config's own dtype (bf16 for most released checkpoints) sets the bytes reported
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.device("meta"):
        build = cls.from_config if hasattr(cls, "from_config") else cls._from_config
        model = build(config, dtype=dtype)  # transformers >= 4.56 spells it dtype
    return model.eval()


def meta_batch(model: torch.nn.Module, *, batch: int, seq: int) -> tuple[tuple, dict]:
    """Token ids (and labels, when the forward takes them) as meta tensors."""
    ids = torch.zeros((batch, seq), dtype=torch.long, device="meta")
    params = inspect.signature(model.forward).parameters
    kwargs = (
        {"labels": torch.zeros((batch, seq), dtype=torch.long, device="meta")}
        if "labels" in params
        else {}
    )
    return (ids,), kwargs


def plan_on_meta(
    config,
    tp: int,
    *,
    plan: str = "auto",
    batch: int = 2,
    seq: int = 128,
    step: Callable[[str, float], None] | None = None,
    pp: int = 1,
    microbatches: int | None = None,
    schedule: str = "1f1b",
    balance: str = "flops",
    sequence_parallel: bool = False,
):
    """Build on meta, autoshard at tp (x pp), return the ShardedModule; `step(name, seconds)` per
    stage. With pp > 1, `batch` is one microbatch."""
    from nxd_autoshard.api import autoshard

    started = time.perf_counter()
    model = build_meta_model(config)
    if step:
        step("build model on meta", time.perf_counter() - started)
    microbatches = microbatches or (pp if pp > 1 else 1)
    args, kwargs = meta_batch(model, batch=batch * (microbatches if pp > 1 else 1), seq=seq)
    with ExitStack() as stack:
        if step:
            stack.enter_context(on_pass(lambda r: step(r.name, r.seconds)))
        sharded = autoshard(
            model,
            tp,
            example_inputs=args,
            example_kwargs=kwargs,
            plan=plan,
            pp=pp,
            microbatches=microbatches,
            schedule=schedule,
            balance=balance,
            sequence_parallel=sequence_parallel,
        )
    return sharded
