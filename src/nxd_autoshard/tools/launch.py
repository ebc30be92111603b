"""Local multi-process runner: run a function on N ranks with an initialised process group."""

from __future__ import annotations

import datetime
import io
import logging
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import signal
import sys
import time
import traceback
import warnings
from typing import Any, Callable

import torch
import torch.distributed as dist

__all__ = ["run_ranks", "RankError"]

_log = logging.getLogger(__name__)


# Extra time given to the process group's own timeout beyond the parent's deadline, so that
# the parent always reports a hang itself, while orphaned children still die eventually. It also
# bounds joining: generous, so that a start on a heavily loaded machine is never a failure.
_PG_TIMEOUT_SLACK_S = 300.0


# How long a terminated child may take to die before it is killed.
_TERMINATE_GRACE_S = 2.0


# After a rank reports an error, how long to wait for a peer's death to show (it may be the cause).
_DEATH_GRACE_S = 0.5


_JOINED = "joined"  # a rank is in the process group; its result follows


_OK = "ok"


_ERR = "error"


_INIT_ERR = "init error"  # init_process_group failed: fn ran nowhere, the launch can be retried


# Launches whose rendezvous fails before any rank runs fn are retried this many times in all.
# gloo's connectFullMesh sometimes fails on a loaded machine ("Connection closed by peer"
# between two live ranks of one launch); nothing of the user's has run, so a fresh store and
# fresh processes are safe.
_RENDEZVOUS_ATTEMPTS = 3


class RankError(RuntimeError):
    """A rank failed, died without reporting, or did not finish in time.

    ``ranks`` lists the ranks concerned (failed, died or unfinished), in rank order.
    """

    def __init__(self, message: str, ranks: list[int] | None = None) -> None:
        super().__init__(message)
        self.ranks: list[int] = list(ranks or [])


def _parent_store(world_size: int, timeout_s: float) -> dist.TCPStore:
    """The rendezvous store, owned by the parent and bound to a port the OS picks.

    Binding port 0 in the parent is atomic: no other launch can take the port between picking
    and binding it, and no rank of another launch can join this one's store (picking a free
    port and letting rank 0 bind it later allowed both). It is made after the children are
    forked, and its port sent to them: the store runs a thread, and a child forked while a
    thread holds a lock (glibc's resolver lock, say) deadlocks on it.
    """
    return dist.TCPStore(
        "127.0.0.1",
        0,
        world_size,
        is_master=True,
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    args: tuple,
    backend: str,
    port_conn: mp_connection.Connection,
    env: dict[str, str] | None,
    pg_timeout_s: float,
    conn: mp_connection.Connection,
) -> None:
    """Child entry point: set up env and process group, run fn, send back the result."""
    try:
        port = port_conn.recv()  # the parent's store, made once every rank is forked
    except (EOFError, OSError):
        return  # the parent is gone or gave up before the store existed
    finally:
        port_conn.close()
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
    initialised = False
    try:
        torch.set_num_threads(1)
        timeout = datetime.timedelta(seconds=pg_timeout_s)
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timeout)
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timeout
        )
        initialised = True
        # fn starts only once every rank is in the process group: a rendezvous that fails on
        # one rank then leaves nothing run on the others, and the parent may retry the launch
        if store.add("nxd/joined", 1) == world_size:
            store.set("nxd/all_joined", "1")
        store.wait(["nxd/all_joined"])
    except BaseException:  # noqa: BLE001 - everything is reported to the parent
        _report(conn, (_INIT_ERR, traceback.format_exc()), initialised)
        return
    try:
        conn.send((_JOINED, None))
        result = fn(rank, world_size, *args)
        buf = io.BytesIO()
        torch.save(result, buf)
        payload: tuple[str, Any] = (_OK, buf.getvalue())
    except BaseException:  # noqa: BLE001 - everything is reported to the parent
        payload = (_ERR, traceback.format_exc())
    _report(conn, payload, initialised)


def _report(conn: mp_connection.Connection, payload: tuple[str, Any], initialised: bool) -> None:
    """Send a rank's last message to the parent, then leave the process group."""
    try:
        conn.send(payload)
        conn.close()
    except (BrokenPipeError, EOFError, OSError):
        pass  # the parent is gone: it has given up on this launch
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
        self.timed_out: list[int] = []
        self.joined: set[int] = set()  # ranks that are in the process group
        self.init_failed: set[int] = set()  # ranks whose init_process_group failed

    @property
    def retryable(self) -> bool:
        """The rendezvous failed before any rank ran fn."""
        return bool(self.init_failed) and not self.joined


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
    pg_timeout_s = timeout_s + _PG_TIMEOUT_SLACK_S
    store = None
    port_writers = []
    attempt = _Attempt()
    procs: list[Any] = []
    readers: dict[Any, int] = {}  # readers still expected to deliver, -> rank
    all_readers: list[Any] = []
    clean = False
    try:
        for rank in range(world_size):
            reader, writer = ctx.Pipe(duplex=False)
            port_reader, port_writer = ctx.Pipe(duplex=False)
            port_writers.append(port_writer)
            all_readers.append(reader)
            p = ctx.Process(
                target=_worker,
                args=(fn, rank, world_size, args, backend, port_reader, env, pg_timeout_s, writer),
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
                port_reader.close()
            procs.append(p)
            readers[reader] = rank
        store = _parent_store(world_size, pg_timeout_s)
        for port_writer in port_writers:
            port_writer.send(store.port)
            port_writer.close()

        pending = set(range(world_size))
        sentinels = {p.sentinel: rank for rank, p in enumerate(procs)}
        # joining is bounded by the process group's own timeout; timeout_s counts from when
        # every rank has joined, so a slow start on a loaded machine is not a hang
        deadline = time.monotonic() + pg_timeout_s

        def receive(reader: Any, rank: int) -> None:
            nonlocal deadline
            try:
                kind, data = reader.recv()
            except (EOFError, OSError):
                readers.pop(reader, None)  # the rank closed its end: nothing more will come
                return
            if kind == _JOINED:
                attempt.joined.add(rank)
                if len(attempt.joined) == world_size:
                    deadline = time.monotonic() + timeout_s
                return
            pending.discard(rank)
            readers.pop(reader, None)
            if kind == _INIT_ERR:
                attempt.init_failed.add(rank)
            if kind == _OK:
                try:
                    attempt.results[rank] = torch.load(io.BytesIO(data), weights_only=False)
                except Exception:  # noqa: BLE001
                    attempt.errors[rank] = (
                        "result could not be deserialised in the parent:\n" + traceback.format_exc()
                    )
            else:
                attempt.errors[rank] = data

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
                _drain(readers, rank, receive)
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
                _drain(readers, rank, receive)
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
        for port_writer in port_writers:
            port_writer.close()
        del store  # closes the rendezvous port
    return attempt


def _drain(readers: dict, rank: int, receive: Callable[[Any, int], None]) -> None:
    """Read every message a rank sent before it exited (its join, then its result)."""
    reader = next((r for r, rk in readers.items() if rk == rank), None)
    while reader is not None and reader in readers and reader.poll():
        receive(reader, rank)


def _record_death(attempt: _Attempt, procs: list[Any], rank: int) -> None:
    procs[rank].join(1.0)
    attempt.errors[rank] = (
        f"process {_describe_exit(procs[rank].exitcode)} without reporting a result"
    )


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
    children are terminated and :class:`RankError` is raised. ``timeout_s`` counts from when
    every rank has joined the process group (the rendezvous store is the parent's, on a port
    the OS assigns, so concurrent launches cannot meet). With ``start_method="spawn"``,
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
    for number in range(1, _RENDEZVOUS_ATTEMPTS + 1):
        attempt = _launch_once(fn, world_size, tuple(args), backend, timeout_s, start_method, env)
        if not attempt.retryable or number == _RENDEZVOUS_ATTEMPTS:
            break
        first = attempt.errors[min(attempt.init_failed)].strip().splitlines()[-1]
        _log.warning(
            "run_ranks: the process group did not form (%s); nothing ran, launching again "
            "(%d of %d)",
            first,
            number + 1,
            _RENDEZVOUS_ATTEMPTS,
        )

    if attempt.errors:
        failed = sorted(attempt.errors)
        parts = [f"run_ranks: rank(s) {failed} of {world_size} failed"]
        if attempt.retryable:
            parts[0] += (
                f" to join the process group ({_RENDEZVOUS_ATTEMPTS} launches, none ran the "
                "function)"
            )
        for rank in failed:
            parts.append(f"--- rank {rank} ---\n{attempt.errors[rank].rstrip()}")
        raise RankError("\n".join(parts), failed)
    if attempt.timed_out:
        finished = sorted(attempt.results)
        if len(attempt.joined) < world_size:
            missing = sorted(set(range(world_size)) - attempt.joined)
            raise RankError(
                f"run_ranks: rank(s) {missing} of {world_size} did not join the process group "
                f"within {timeout_s + _PG_TIMEOUT_SLACK_S:g}s",
                missing,
            )
        raise RankError(
            f"run_ranks: timed out after {timeout_s:g}s; rank(s) {attempt.timed_out} of "
            f"{world_size} did not finish (finished: {finished})",
            attempt.timed_out,
        )
    return [attempt.results[rank] for rank in range(world_size)]
