"""Command line: `nxd-autoshard verify --config cfg.json --tp 4 [--pp 2 --dp 2] [--world gloo|sim]`."""

from __future__ import annotations

import argparse
import sys

from .pipeline import SCHEDULES

__all__ = ["main"]


def _verify(ns: argparse.Namespace) -> int:
    from .verify import verify_config

    checks = verify_config(ns.config, ns.tp, pp=ns.pp, dp=ns.dp, microbatches=ns.microbatches,
                           schedule=ns.schedule, world=ns.world, plan=ns.plan, batch=ns.batch,
                           seq=ns.seq, seed=ns.seed, rtol=ns.rtol, atol=ns.atol)
    for check in checks:
        print(check.line())
    bad = [c for c in checks if not c.ok]
    print(f"{len(checks) - len(bad)} passed, {len(bad)} failed")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nxd-autoshard", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="compare a sharded HF model with the unsharded one")
    v.add_argument("--config", required=True, help="config.json, or a folder holding one")
    v.add_argument("--tp", type=int, required=True, help="tensor-parallel degree")
    v.add_argument("--pp", type=int, default=1, help="pipeline stages")
    v.add_argument("--dp", type=int, default=1, help="data-parallel replicas")
    v.add_argument("--microbatches", type=int, default=None, help="per step (default: pp)")
    v.add_argument("--schedule", choices=sorted(SCHEDULES), default="1f1b",
                   help="torch.distributed.pipelining schedule")
    v.add_argument("--world", choices=("gloo", "sim"), default="gloo",
                   help="gloo: dp x pp x tp local processes; sim: one process, emulated collectives")
    v.add_argument("--plan", default="auto", help="auto, a family name (llama, gpt2, ...) or a YAML file")
    v.add_argument("--batch", type=int, default=None, help="default: max(2, dp x microbatches)")
    v.add_argument("--seq", type=int, default=16)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--rtol", type=float, default=1e-4)
    v.add_argument("--atol", type=float, default=1e-5)
    v.set_defaults(func=_verify)
    ns = parser.parse_args(argv)
    return ns.func(ns)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
