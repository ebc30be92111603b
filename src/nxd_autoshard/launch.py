"""Local multi-process runner: run a function on N ranks with an initialised process group."""

from __future__ import annotations

import datetime
import io
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import signal
import socket
import sys
import time
import traceback
import warnings
from typing import Any, Callable

import torch
import torch.distributed as dist

__all__ = ["run_ranks", "RankError"]

# Extra time given to the process group's own timeout beyond the parent's deadline, so that
# the parent always reports a hang itself, while orphaned children still die eventually.
_PG_TIMEOUT_SLACK_S = 60.0
# How long a terminated child may take to die before it is killed.
_TERMINATE_GRACE_S = 2.0
# Retries when the rendezvous port was taken between picking it and binding it.
_PORT_RETRIES = 3
# After a rank reports an error, how long to wait for a peer's death to show (it may be the cause).
_DEATH_GRACE_S = 0.5

_OK = "ok"
_ERR = "error"
_INIT_ERR = "init_error"


class RankError(RuntimeError):
    """A rank failed, died without reporting, or did not finish in time.

    ``ranks`` lists the ranks concerned (failed, died or unfinished), in rank order.
    """

    def __init__(self, message: str, ranks: list[int] | None = None) -> None:
        super().__init__(message)
        self.ranks: list[int] = list(ranks or [])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    args: tuple,
    backend: str,
    port: int,
    env: dict[str, str] | None,
    pg_timeout_s: float,
    conn: mp_connection.Connection,
) -> None:
    """Child entry point: set up env and process group, run fn, send back the result."""
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
            "OMP_NUM_THREADS": "1",
        }
    )
    if sys.platform.startswith("linux"):
        # Keep gloo on loopback; avoids hostname resolution problems in sandboxes.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if env:
        os.environ.update({str(k): str(v) for k, v in env.items()})
    phase = _INIT_ERR
    initialised = False
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout_s),
        )
        initialised = True
        phase = _ERR
        result = fn(rank, world_size, *args)
        buf = io.BytesIO()
        torch.save(result, buf)
        payload: tuple[str, Any] = (_OK, buf.getvalue())
    except BaseException:  # noqa: BLE001 - everything is reported to the parent
        payload = (phase, traceback.format_exc())
    try:
        conn.send(payload)
        conn.close()
    finally:
        if initialised:
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass


def _terminate(procs: list[Any]) -> None:
    for p in procs:
        if p.is_alive():
            try:
                p.terminate()
            except Exception:  # noqa: BLE001
                pass
    deadline = time.monotonic() + _TERMINATE_GRACE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            try:
                p.kill()
            except Exception:  # noqa: BLE001
                pass
            p.join(1.0)


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "is still running"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name}"
    return f"exited with code {exitcode}"


class _Attempt:
    """Outcome of one launch: results, or failure details."""

    def __init__(self) -> None:
        self.results: dict[int, Any] = {}
        self.errors: dict[int, str] = {}  # rank -> message (traceback or exit description)
        self.init_only = True  # all errors happened while initialising the process group
        self.timed_out: list[int] = []


def _launch_once(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple,
    backend: str,
    timeout_s: float,
    start_method: str,
    env: dict[str, str] | None,
) -> _Attempt:
    ctx = mp.get_context(start_method)
    port = _free_port()
    pg_timeout_s = timeout_s + _PG_TIMEOUT_SLACK_S
    attempt = _Attempt()
    procs: list[Any] = []
    readers: dict[Any, int] = {}  # readers still expected to deliver, -> rank
    all_readers: list[Any] = []
    clean = False
    try:
        for rank in range(world_size):
            reader, writer = ctx.Pipe(duplex=False)
            all_readers.append(reader)
            p = ctx.Process(
                target=_worker,
                args=(fn, rank, world_size, args, backend, port, env, pg_timeout_s, writer),
                name=f"nxd-rank-{rank}",
            )
            try:
                with warnings.catch_warnings():
                    # We fork on purpose (fast start); children use one thread and a fresh
                    # process group, so the multi-threaded-fork warning is noise here.
                    warnings.filterwarnings("ignore", message=r".*use of fork\(\) may lead to")
                    p.start()
            finally:
                writer.close()
            procs.append(p)
            readers[reader] = rank

        pending = set(range(world_size))
        sentinels = {p.sentinel: rank for rank, p in enumerate(procs)}
        deadline = time.monotonic() + timeout_s

        def receive(reader: Any, rank: int) -> None:
            try:
                kind, data = reader.recv()
            except (EOFError, OSError):
                return
            pending.discard(rank)
            readers.pop(reader, None)
            if kind == _OK:
                try:
                    attempt.results[rank] = torch.load(io.BytesIO(data), weights_only=False)
                except Exception:  # noqa: BLE001
                    attempt.errors[rank] = (
                        "result could not be deserialised in the parent:\n" + traceback.format_exc()
                    )
                    attempt.init_only = False
            else:
                attempt.errors[rank] = data
                if kind != _INIT_ERR:
                    attempt.init_only = False

        while pending and not attempt.errors:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                attempt.timed_out = sorted(pending)
                break
            waitables = [r for r, rank in readers.items() if rank in pending]
            waitables += [s for s, rank in sentinels.items() if rank in pending]
            ready = mp_connection.wait(waitables, timeout=remaining)
            # Read results first: a child may have reported and then exited.
            for obj in ready:
                if obj in readers:
                    receive(obj, readers[obj])
            for obj in ready:
                rank = sentinels.get(obj)  # type: ignore[arg-type]
                if rank is None or rank not in pending:
                    continue
                # The child is gone; drain anything it sent just before exiting.
                reader = next((r for r, rk in readers.items() if rk == rank), None)
                if reader is not None and reader.poll():
                    receive(reader, rank)
                if rank in pending:
                    pending.discard(rank)
                    _record_death(attempt, procs, rank)

        if attempt.errors:
            # Collect any other reports that are already available, for a fuller message.
            for reader, rank in list(readers.items()):
                if rank in pending and reader.poll():
                    receive(reader, rank)
            # a rank that died may be why another failed (torch 2.9's gloo reports the lost peer
            # at once, later torch blocks until terminated): name it too, it is the cause
            gone = mp_connection.wait([procs[r].sentinel for r in pending], timeout=_DEATH_GRACE_S)
            for rank in sorted(r for r in pending if procs[r].sentinel in gone):
                reader = next((r for r, rk in readers.items() if rk == rank), None)
                if reader is not None and reader.poll():
                    receive(reader, rank)
                if rank in pending:
                    _record_death(attempt, procs, rank)
        clean = not attempt.errors and not attempt.timed_out
    finally:
        if clean:
            # All results are in; let children tear down, then clean up any straggler.
            deadline = time.monotonic() + 10.0
            for p in procs:
                p.join(max(0.0, deadline - time.monotonic()))
        _terminate(procs)
        for reader in all_readers:
            reader.close()
        for p in procs:
            try:
                p.close()
            except Exception:  # noqa: BLE001
                pass
    return attempt


def _record_death(attempt: _Attempt, procs: list[Any], rank: int) -> None:
    procs[rank].join(1.0)
    attempt.errors[rank] = f"process {_describe_exit(procs[rank].exitcode)} without reporting a result"
    attempt.init_only = False


def _is_port_clash(attempt: _Attempt) -> bool:
    if not attempt.errors or not attempt.init_only:
        return False
    text = "\n".join(attempt.errors.values()).lower()
    return "address already in use" in text or "eaddrinuse" in text


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *,
    args: tuple = (),
    backend: str = "gloo",
    timeout_s: float = 600.0,
    start_method: str = "fork",
    env: dict[str, str] | None = None,
) -> list:
    """Run fn(rank, world_size, *args) in world_size processes with an initialised process group.

    Returns the per-rank results in rank order.

    Each child gets MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK, one torch thread, the
    ``env`` overrides, and a process group from ``init_process_group(backend, ...)``. Results
    travel back serialised with ``torch.save`` (so CPU tensors are safe). If any rank raises,
    dies without reporting, or the ranks do not all finish within ``timeout_s`` seconds, all
    children are terminated and :class:`RankError` is raised. With ``start_method="spawn"``,
    ``fn`` and ``args`` must be picklable (``fn`` defined at module level).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if start_method not in mp.get_all_start_methods():
        raise ValueError(
            f"start method {start_method!r} is not available here "
            f"(choose from {mp.get_all_start_methods()})"
        )
    args = tuple(args)
    for try_no in range(_PORT_RETRIES + 1):
        attempt = _launch_once(fn, world_size, args, backend, timeout_s, start_method, env)
        if not (_is_port_clash(attempt) and try_no < _PORT_RETRIES):
            break

    if attempt.errors:
        failed = sorted(attempt.errors)
        parts = [f"run_ranks: rank(s) {failed} of {world_size} failed"]
        for rank in failed:
            parts.append(f"--- rank {rank} ---\n{attempt.errors[rank].rstrip()}")
        raise RankError("\n".join(parts), failed)
    if attempt.timed_out:
        finished = sorted(attempt.results)
        raise RankError(
            f"run_ranks: timed out after {timeout_s:g}s; rank(s) {attempt.timed_out} of "
            f"{world_size} did not finish (finished: {finished})",
            attempt.timed_out,
        )
    return [attempt.results[rank] for rank in range(world_size)]
