"""One process per rank on this machine: `run_ranks(fn, world_size, *args)`; and
`init_torchrun_rank`, the preamble of a script launched by torchrun.

For multi-rank tests on CPU (gloo; kernels under the Triton interpreter, which needs one process
per rank) and for multi-GPU runs (nccl; rank r on GPU r). Processes are started with the spawn
method: they inherit the environment (set TRITON_INTERPRET before calling) but not imported
modules, so `fn` must be importable by name (a module-level function) and `args` and the results
picklable. Scripts that call `run_ranks` need an `if __name__ == "__main__":` guard.
"""
from __future__ import annotations

import contextlib
import multiprocessing.connection
import os
import pickle
import tempfile
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class RankError(RuntimeError):
    """A rank raised or died; the message carries its rank and traceback."""

    def __init__(self, rank: int, message: str):
        super().__init__(message)
        self.rank = rank


def run_ranks(fn, world_size: int, *args, backend: str = "gloo", timeout: float = 300.0,
              env: dict[str, str | None] | None = None) -> list:
    """Run `fn(*args)` in `world_size` processes, each with the default process group initialised
    (its rank is `torch.distributed.get_rank()`); return the results in rank order.

    `env` changes the ranks' environment (None removes a variable), e.g. {"TRITON_INTERPRET": "1"}
    for CPU ranks on a machine that has GPUs. The first rank to fail raises `RankError` here with
    its traceback, and the other ranks are killed. Ranks still running after `timeout` seconds are
    killed and `TimeoutError` is raised.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: expected a positive int, got {world_size!r}")
    if "nccl" in backend and torch.cuda.device_count() < world_size:
        raise ValueError(f"backend {backend!r} with world_size {world_size} needs {world_size} GPUs, "
                         f"found {torch.cuda.device_count()}")
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="comet-ranks-") as folder:
        init_method = "file://" + os.path.join(folder, "store")  # no port to pick, none to collide
        procs, pending, finished = [], {}, False
        try:
            with _environment(env or {}):  # a spawned process starts with the parent's environment
                for rank in range(world_size):
                    receiver, sender = ctx.Pipe(duplex=False)
                    proc = ctx.Process(target=_rank_main, name=f"comet-rank-{rank}",
                                       args=(sender, fn, args, rank, world_size, backend, init_method, timeout))
                    proc.start()
                    sender.close()
                    procs.append(proc)
                    pending[receiver] = rank
            results = _collect(procs, pending, timeout)
            finished = True
            return results
        finally:
            _stop(procs, grace=30.0 if finished else 1.0)


@contextlib.contextmanager
def _environment(changes: dict):
    saved = {key: os.environ.get(key) for key in changes}
    try:
        _set_environment(changes)
        yield
    finally:
        _set_environment(saved)


def _set_environment(values: dict):
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _collect(procs, pending: dict, timeout: float) -> list:
    results = [None] * len(procs)
    deadline = time.monotonic() + timeout
    while pending:
        ready = multiprocessing.connection.wait(list(pending), timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            raise TimeoutError(f"run_ranks: rank(s) {sorted(pending.values())} did not finish within "
                               f"{timeout} s; all ranks were killed")
        for conn in ready:
            rank = pending.pop(conn)
            try:
                status, value = pickle.loads(conn.recv_bytes())
            except EOFError:
                procs[rank].join(5)
                raise RankError(rank, f"rank {rank} exited (exit code {procs[rank].exitcode}) without "
                                      f"returning a result") from None
            if status == "error":
                raise RankError(rank, f"rank {rank} of {len(procs)} failed:\n{value}")
            results[rank] = value
    return results


def _stop(procs, grace: float):
    """Give the ranks `grace` seconds to exit, then kill the rest."""
    deadline = time.monotonic() + grace
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(5)


def _rank_main(conn, fn, args, rank, world_size, backend, init_method, timeout):
    try:
        # Ranks share the machine's cores; more intra-op threads each only oversubscribe it.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        if "nccl" in backend:
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout))
        payload = ("ok", fn(*args))
    except BaseException as e:  # noqa: BLE001  reported to the parent, which raises it
        payload = ("error", "".join(traceback.format_exception(e)))
    try:
        data = pickle.dumps(payload)
    except Exception as e:  # noqa: BLE001
        data = pickle.dumps(("error", f"the result of rank {rank} cannot be pickled: {e!r}"))
    conn.send_bytes(data)
    conn.close()
    if dist.is_initialized():
        dist.destroy_process_group()


def init_torchrun_rank(module: str, cpu_option: str | None = None):
    """Join the NCCL process group of a torchrun launch on this rank's GPU (NVLink multicast off), or
    exit saying how to launch `module` (`cpu_option`: the option that runs it on CPU ranks instead,
    if any)."""
    import sys

    instead = f" (or use {cpu_option} for a CPU run)" if cpu_option else ""
    if "LOCAL_RANK" not in os.environ:
        sys.exit(f"{module}: launch it with torchrun, e.g. torchrun --nproc-per-node 2 -m {module}{instead}")
    if not torch.cuda.is_available():
        sys.exit(f"{module}: needs CUDA GPUs{instead}")
    local_rank = int(os.environ["LOCAL_RANK"])
    if local_rank >= torch.cuda.device_count():
        sys.exit(f"{module}: local rank {local_rank} but only {torch.cuda.device_count()} GPUs visible")
    torch.cuda.set_device(local_rank)
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast is never used
    os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
    dist.init_process_group("nccl")
