"""Tests for nxd_autoshard.tools.launch.run_ranks."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

try:
    from nxd_autoshard.tools import launch
    from nxd_autoshard.tools.launch import RankError, run_ranks
except ImportError:  # package not installed: use the src layout directly
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from nxd_autoshard.tools import launch
    from nxd_autoshard.tools.launch import RankError, run_ranks


# Functions run in the children must live at module level.


def _identity(rank: int, world_size: int) -> tuple[int, int]:
    return rank, world_size


def _env_and_threads(rank: int, world_size: int) -> dict:
    keys = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "OMP_NUM_THREADS")
    out = {k: os.environ.get(k) for k in keys}
    out["threads"] = torch.get_num_threads()
    out["initialised"] = dist.is_initialized()
    out["dist_rank"] = dist.get_rank()
    out["dist_world"] = dist.get_world_size()
    out["EXTRA"] = os.environ.get("NXD_TEST_EXTRA")
    return out


def _all_reduce(rank: int, world_size: int) -> float:
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def _with_args(rank: int, world_size: int, a: int, b: str) -> str:
    return f"{rank}:{a}:{b}"


def _raise_on_rank_1(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("boom from rank one")
    dist.barrier()  # the others block in a collective and must be terminated
    return rank


def _exit_on_rank_0(rank: int, world_size: int) -> int:
    if rank == 0:
        os._exit(3)
    dist.barrier()
    return rank


def _rank_1_blocks_in_barrier(rank: int, world_size: int) -> int:
    if rank == 0:
        time.sleep(600)  # never enters the barrier (and stays alive, so rank 1 hangs)
    else:
        dist.barrier()
    return rank


def _rank_1_hangs(rank: int, world_size: int) -> int:
    if rank == 1:
        time.sleep(600)
    return rank


def _rank_0_leaves_early(rank: int, world_size: int) -> int:
    if rank == 1:
        dist.barrier()  # rank 0 returns and tears down its process group instead
    return rank


def _tensors(rank: int, world_size: int) -> dict:
    torch.manual_seed(rank)
    big = torch.randn(256, 128)
    return {
        "rank": rank,
        "big": big,
        "view": big[::2, 3:7],  # a non-contiguous view of a larger storage
        "ints": torch.arange(10, dtype=torch.int64) * rank,
        "bf16": torch.ones(3, dtype=torch.bfloat16) * rank,
        "list": [torch.full((2,), float(rank)), "text"],
    }


def _matmul_then_reduce(rank: int, world_size: int) -> torch.Tensor:
    x = torch.randn(128, 128)
    y = x @ x.T
    s = y.trace().reshape(1) * 0 + torch.tensor([float(rank)])
    dist.all_reduce(s)
    return s


def test_results_in_rank_order() -> None:
    assert run_ranks(_identity, 4) == [(0, 4), (1, 4), (2, 4), (3, 4)]


def test_single_rank() -> None:
    assert run_ranks(_identity, 1) == [(0, 1)]


def test_args_are_passed() -> None:
    assert run_ranks(_with_args, 2, args=(7, "x")) == ["0:7:x", "1:7:x"]


def test_env_threads_and_process_group() -> None:
    out = run_ranks(_env_and_threads, 2, env={"NXD_TEST_EXTRA": "yes"})
    for rank, r in enumerate(out):
        assert r["MASTER_ADDR"] == "127.0.0.1"
        assert int(r["MASTER_PORT"]) > 0
        assert r["RANK"] == str(rank) and r["LOCAL_RANK"] == str(rank)
        assert r["WORLD_SIZE"] == "2"
        assert r["OMP_NUM_THREADS"] == "1"
        assert r["threads"] == 1
        assert r["initialised"] and r["dist_rank"] == rank and r["dist_world"] == 2
        assert r["EXTRA"] == "yes"
    assert out[0]["MASTER_PORT"] == out[1]["MASTER_PORT"]


@pytest.mark.parametrize("world_size", [2, 4])
def test_all_reduce_sum(world_size: int) -> None:
    expected = world_size * (world_size + 1) / 2
    assert run_ranks(_all_reduce, world_size) == [expected] * world_size


def test_repeated_calls_after_parent_used_torch() -> None:
    a = torch.randn(512, 512)
    (a @ a).sum().item()  # warm up the parent's intra-op thread pool before forking
    for _ in range(3):
        out = run_ranks(_matmul_then_reduce, 2, timeout_s=30)
        assert [t.item() for t in out] == [1.0, 1.0]


def test_rank_raises() -> None:
    with pytest.raises(RankError) as info:
        run_ranks(_raise_on_rank_1, 3, timeout_s=30)
    msg = str(info.value)
    assert "rank 1" in msg
    assert "ValueError" in msg and "boom from rank one" in msg
    assert "Traceback" in msg and "_raise_on_rank_1" in msg
    assert 1 in info.value.ranks
    assert isinstance(info.value, RuntimeError)


def test_rank_dies_without_reporting() -> None:
    with pytest.raises(RankError) as info:
        run_ranks(_exit_on_rank_0, 2, timeout_s=30)
    msg = str(info.value)
    assert "rank 0" in msg and "code 3" in msg
    # rank 1 is named too where gloo reports the lost peer before it is terminated (torch 2.9)
    assert 0 in info.value.ranks and set(info.value.ranks) <= {0, 1}


# The deadline counts from when every rank has joined the process group, so a slow start on a
# loaded machine does not change which ranks finish; the wall-time bounds below only check that
# the parent does not wait for the process group's own timeout (the deadline plus this slack),
# and leave the start as long as that slack, whatever the load.
_NOT_THE_PG_TIMEOUT_S = launch._PG_TIMEOUT_SLACK_S


def test_blocked_rank_times_out() -> None:
    start = time.monotonic()
    with pytest.raises(RankError) as info:
        run_ranks(_rank_1_blocks_in_barrier, 2, timeout_s=3)
    assert time.monotonic() - start < _NOT_THE_PG_TIMEOUT_S
    msg = str(info.value)
    assert "timed out" in msg and "[0, 1]" in msg and "did not finish" in msg
    assert info.value.ranks == [0, 1]


def test_only_unfinished_ranks_are_named_on_timeout() -> None:
    start = time.monotonic()
    with pytest.raises(RankError) as info:
        run_ranks(_rank_1_hangs, 3, timeout_s=3)
    assert time.monotonic() - start < _NOT_THE_PG_TIMEOUT_S
    msg = str(info.value)
    assert "timed out" in msg and "finished: [0, 2]" in msg
    assert info.value.ranks == [1]


def test_peer_leaving_early_is_an_error() -> None:
    # Rank 1 waits on a barrier that rank 0 never enters; rank 0 finishes and tears down its
    # process group, so rank 1 fails (connection closed) or hangs: either way, RankError.
    start = time.monotonic()
    with pytest.raises(RankError) as info:
        run_ranks(_rank_0_leaves_early, 2, timeout_s=5)
    assert time.monotonic() - start < _NOT_THE_PG_TIMEOUT_S
    assert 1 in info.value.ranks


def _store_port(rank: int, world_size: int) -> int:
    return int(os.environ["MASTER_PORT"])


_LAUNCH_AND_PRINT = """
import sys
sys.path.insert(0, {tests!r})
from test_launch import _all_reduce
from nxd_autoshard.tools.launch import run_ranks
print(run_ranks(_all_reduce, 2, timeout_s=120))
"""


def test_concurrent_launches_do_not_meet() -> None:
    # each launch owns its rendezvous store: launches started at once (as pytest-xdist workers
    # do) get two ports and two worlds; processes, not threads, since a forking parent must
    # not have other threads running
    import subprocess

    code = _LAUNCH_AND_PRINT.format(tests=str(Path(__file__).parent))
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert outs == ["[3.0, 3.0]"] * 3


def test_tensors_come_back_intact() -> None:
    out = run_ranks(_tensors, 2)
    for rank, r in enumerate(out):
        torch.manual_seed(rank)
        big = torch.randn(256, 128)
        assert r["rank"] == rank
        assert torch.equal(r["big"], big)
        assert torch.equal(r["view"], big[::2, 3:7])
        assert torch.equal(r["ints"], torch.arange(10) * rank)
        assert r["bf16"].dtype == torch.bfloat16 and torch.equal(
            r["bf16"], torch.ones(3, dtype=torch.bfloat16) * rank
        )
        assert torch.equal(r["list"][0], torch.full((2,), float(rank))) and r["list"][1] == "text"


def test_spawn_start_method() -> None:
    assert run_ranks(_all_reduce, 2, start_method="spawn", timeout_s=120) == [3.0, 3.0]


def test_no_children_left_behind() -> None:
    import multiprocessing

    with pytest.raises(RankError):
        run_ranks(_rank_1_blocks_in_barrier, 2, timeout_s=2)
    assert multiprocessing.active_children() == []


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        run_ranks(_identity, 0)
    with pytest.raises(ValueError):
        run_ranks(_identity, 2, start_method="no-such-method")


def _flaky_backend(marker_dir: str):
    """A gloo process group whose creation fails once per rank (a marker file remembers)."""

    def create(store, rank, world_size, timeout):
        marker = Path(marker_dir) / f"failed-{rank}"
        if not marker.exists():
            marker.touch()
            raise RuntimeError("Gloo connectFullMesh failed (simulated)")
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)

    return create


def _count_runs(rank: int, world_size: int, marker_dir: str) -> int:
    with open(Path(marker_dir) / f"ran-{rank}", "a") as f:
        f.write("x")
    t = torch.tensor([1.0])
    dist.all_reduce(t)
    return int(t.item())


def test_failed_rendezvous_is_retried_and_fn_runs_once(tmp_path) -> None:
    # the first launch's process groups fail on every rank; fn must not have run anywhere
    # then, and the second launch runs it once per rank
    name = "nxd_flaky_test"
    if name.upper() not in dist.Backend.backend_list and name not in dist.Backend.backend_list:
        dist.Backend.register_backend(name, _flaky_backend(str(tmp_path)), devices=["cpu"])
    out = run_ranks(_count_runs, 2, args=(str(tmp_path),), backend=name, timeout_s=60)
    assert out == [2, 2]
    assert [(tmp_path / f"ran-{r}").read_text() for r in range(2)] == ["x", "x"]


def test_backend_that_never_forms_a_group_is_named() -> None:
    with pytest.raises(RankError) as info:
        run_ranks(_identity, 2, backend="no-such-backend", timeout_s=30)
    assert "join the process group" in str(info.value) and "none ran the function" in str(
        info.value
    )
