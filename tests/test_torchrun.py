"""The real launcher: examples/train.py under torchrun (env:// rendezvous, not our fork launcher)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nxd_autoshard.tools.hf import build_model, random_batch

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "examples"))


def test_torchrun_tp2_pp2_trains_like_the_unsharded_model():
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside this python")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            # gloo's full-mesh connect can fail on a loaded machine before any step runs;
            # torchrun's own remedy is restarting the worker group (the last run is checked)
            "--max-restarts",
            "2",
            "--nproc-per-node",
            "4",
            str(ROOT / "examples" / "train.py"),
            "--tp",
            "2",
            "--pp",
            "2",
            "--steps",
            "3",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"step \d+ loss ([0-9.]+)", out.stdout)][-3:]
    assert len(losses) == 3 and losses[2] < losses[0]
    assert "tp 2 x pp 2 x dp 1 on 4 ranks" in out.stdout

    from train import tiny_llama

    model = build_model(tiny_llama(4), seed=0)
    args, kwargs = random_batch(model, batch=8, seq=32, seed=1)
    assert abs(model(*args, **kwargs).loss.item() - losses[0]) < 1e-5
