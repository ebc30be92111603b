"""Train an unmodified HF model with autoshard under torchrun (tp x pp x dp on gloo or NCCL).

    torchrun --standalone --nproc-per-node 4 examples/train.py --tp 2 --pp 2 --steps 5
    torchrun --standalone --nproc-per-node 8 examples/train.py --tp 2 --pp 2 --schedule interleaved \\
        --layers 4 --microbatches 4        # dp = 8 / (tp x pp) = 2

Every rank builds the same model (same seed) and the same global batch; each data-parallel
replica trains on its slice. Rank 0 prints the loss of every step.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from nxd_autoshard import autoshard
from nxd_autoshard.ir.mesh import Mesh
from nxd_autoshard.runtime.pipeline import chunk_batch
from nxd_autoshard.tools.hf import build_model, random_batch


def tiny_llama(layers: int) -> dict:
    return dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="config.json of an HF model (default: a tiny Llama)")
    ap.add_argument("--layers", type=int, default=4, help="layers of the default tiny Llama")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--microbatches", type=int, default=None)
    ap.add_argument("--schedule", default="1f1b")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8, help="global batch (all dp replicas)")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ns = ap.parse_args()

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    model = build_model(ns.config or tiny_llama(ns.layers), seed=0)
    args, kwargs = random_batch(model, batch=ns.batch, seq=ns.seq, seed=1)
    dp = world // (ns.tp * ns.pp)
    mine = chunk_batch(args, kwargs, dp)[Mesh(dp, ns.pp, ns.tp).coords(rank)["dp"]]

    # no example inputs: this rank's shards come from the plan of the model's own dummy inputs,
    # captured when the optimizer asks for them; each step's microbatch shape is captured once
    sharded = autoshard(
        model, tp=ns.tp, pp=ns.pp, microbatches=ns.microbatches, schedule=ns.schedule
    )
    optimizer = sharded.optimizer(torch.optim.AdamW, lr=ns.lr)
    for step in range(ns.steps):
        optimizer.zero_grad()
        loss = sharded.train_step(*mine[0], **mine[1])
        optimizer.step()
        if rank == 0:
            print(f"step {step} loss {loss.item():.6f}", flush=True)
    if rank == 0:
        print(f"done: tp {ns.tp} x pp {ns.pp} x dp {dp} on {world} ranks", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
