"""One SPMD run (a subprocess of test_spmd.py: SPMD and the device count are fixed when the XLA
runtime starts): our placements handed to GSPMD; prints loss and gradient differences against
the unsharded model on CPU, and the all-reduces of GSPMD's partitioned module and of ours."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch_xla.runtime as xr

xr.use_spmd()  # before any XLA tensor exists

import torch_xla  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent.parent))
from conftest import config_dict  # noqa: E402

from nxd_autoshard import autoshard  # noqa: E402
from nxd_autoshard.runtime import xla  # noqa: E402
from nxd_autoshard.tools.hf import build_model, random_batch  # noqa: E402


def main(family: str, tp: int, dump: str) -> None:
    torch_xla.device()
    xr.global_runtime_device_count()  # the runtime starts before any CPU backward (FACTS)
    model = build_model(config_dict(family, num_hidden_layers=2))
    args, kwargs = random_batch(model, batch=2, seq=16)
    sharded = autoshard(model, tp, example_inputs=args, example_kwargs=kwargs)
    ours = xla.program_collectives(sharded.graph_module)
    placements = dict(sharded.placements)
    want = model(*args, **kwargs).loss
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    loss, grads = xla.spmd_step(model, args, kwargs, placements, tp)
    assert set(grads) == set(want_grads), sorted(set(want_grads) ^ set(grads))
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()  # noqa: E731
    partitioned = sorted(
        Path(dump).glob("*after_spmd-partitioning*.txt"), key=lambda p: p.stat().st_size
    )
    text = partitioned[-1].read_text() if partitioned else ""
    gspmd = xla.hlo_collectives(text)
    print(
        "RESULT "
        + json.dumps(
            {
                "loss": loss.item(),
                "want_loss": want.item(),
                "loss_abs": abs(loss.item() - want.item()),
                "grad_max_abs": max(
                    (grads[n] - g).abs().max().item() for n, g in want_grads.items()
                ),
                "grad_max_rel": max(rel(grads[n], g) for n, g in want_grads.items()),
                "sharded_params": sum(1 for p in placements.values() if p.is_shard()),
                "gspmd": {f"{k} {g}": n for (k, g), n in gspmd.items()},
                "gspmd_all_reduce": sum(
                    n for (k, _), n in gspmd.items() if k.startswith("all-reduce")
                ),
                "ours": ours,
                "ours_all_reduce": ours.get("all-reduce", 0) + ours.get("all-reduce/max", 0),
                "dump_files": len(partitioned),
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
