"""Our placements handed to torch-xla's SPMD partitioner (GSPMD) on 4 CPU devices: loss and
every gradient equal the unsharded model, and GSPMD's all-reduce count is a second opinion on
ours. Each run is its own process (SPMD and the device count are fixed at runtime start)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch_xla")

HERE = Path(__file__).parent
SRC = HERE.parent.parent / "src"


def _spmd(family: str, devices: int, tmp_path: Path) -> dict:
    env = dict(os.environ)
    env.update(
        PJRT_DEVICE="CPU",
        CPU_NUM_DEVICES=str(devices),
        XLA_THREAD_POOL_SIZE=str(max(devices, 4)),
        XLA_FLAGS=f"--xla_dump_to={tmp_path} --xla_dump_hlo_pass_re=spmd-partitioning",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")])),
    )
    proc = subprocess.run(
        [sys.executable, str(HERE / "spmd_check.py"), family, str(devices), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gspmd_with_our_placements_equals_the_unsharded_model(family, tmp_path):
    got = _spmd(family, 4, tmp_path)
    assert got["sharded_params"] > 0  # the placements shard something
    assert got["loss_abs"] < 1e-5, got
    assert got["grad_max_abs"] < 1e-5 and got["grad_max_rel"] < 1e-4, got
    assert got["dump_files"] >= 1, "no module after spmd-partitioning was dumped"
    # GSPMD partitioned the step with collectives over the 4 devices; ours needs no more all-reduces
    assert got["gspmd_all_reduce"] > 0
    assert got["ours_all_reduce"] <= got["gspmd_all_reduce"], got
