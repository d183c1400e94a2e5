"""Buffers that every rank of a process group can address, for the expert-parallel kernels.

A `CommWorkspace` is made once per process group and shared by all layers (like DeepEP's
`Buffer`). `CommWorkspace.create(group)` picks the implementation:

- `SymmetricMemoryWorkspace` (GPU): PyTorch symmetric memory (`_symmetric_memory.empty` +
  `rendezvous`); kernels store straight into peers' memory over NVLink. Multicast is never used.
- `SharedMemoryWorkspace` (CPU): files in /dev/shm mapped by every rank, so the same kernels run
  under the Triton interpreter with one process per rank (`comet.multiprocess.run_ranks`).

What a kernel gets from it:

- `buffer(name, shape, dtype)`: a named buffer on every rank, zero-filled when made; returns this
  rank's tensor. `ptr_table(name)`: int64 [W] on the workspace's device, rank p's address of it.
- `flags(name, shape)`: an int64 buffer of flags (this workspace's own, not the symmetric-memory
  signal pad). A flag holds the epoch of the last call that raised it, so it is never reset.
- `next_epoch()`: the epoch of a new collective call, 1, 2, 3, ..., kept on the device (int64 [1],
  incremented by a launch on the current stream, read by the kernels), so that a captured CUDA
  graph advances it on every replay. The same on every rank as long as every rank makes the same
  calls. A writer raises a flag to the epoch, a reader waits for flag >= epoch
  (`comet.kernels.signals`). Buffers reused across calls are double-buffered: a leading dimension
  2 indexed by the kernels with `epoch % 2`. This is safe without any host barrier when, in each
  call, every rank waits on data from every rank it writes to (as an all-to-all does): a rank
  cannot then be two calls ahead of a peer that is still reading.
- `errors` and `max_spins`: every wait gives up after `max_spins` polls and leaves a record in
  `errors` (on the device); `check_errors()` (a host sync: call it where one is acceptable) raises
  `CommTimeoutError` naming this rank, the peer and what was waited for. Callers that keep a host
  copy of the record (`comet.ep.ExpertParallelState`) raise from it with `timeout_error`.

Setup-time calls (`create`, `buffer`, `flags`, `free`, `barrier`, `close`) are collective: every rank of
the group makes them in the same order (so make them before capturing a CUDA graph: run one call
first). Nothing here is on a hot path except `next_epoch`.

Kernels reach workspace buffers through the pointer tables, never as tensor arguments: the Triton
interpreter copies tensor arguments back after a launch, which could undo a peer's concurrent
writes.
"""
from __future__ import annotations

import enum
import math
import os
import socket
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

# A wait polls this many times before giving up: over a minute under the Triton interpreter, minutes
# on a GPU (a peer may be legitimately late by host-side work; the poll costs behind these numbers
# are in docs/performance.md). COMET_COMM_MAX_SPINS overrides both.
DEFAULT_MAX_SPINS = {"cpu": 1 << 18, "cuda": 1 << 28}
ERROR_FIELDS = ("kind", "peer", "index", "expected", "seen")  # the error record a timed-out wait writes


class WaitKind(enum.IntEnum):
    """What a kernel waits for; a timeout records it so that the error can say it."""

    PROBE_CHUNK = 1
    DISPATCH_METADATA = 2
    DISPATCH_CHUNK = 3
    COMBINE_CHUNK = 4

    def describe(self) -> str:
        return self.name.lower().replace("_", " ")


class CommTimeoutError(RuntimeError):
    """A kernel's wait on another rank ran past its limit."""


def _require_distributed():
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("CommWorkspace: torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group first")


@dataclass
class _Buffer:
    local: torch.Tensor
    ptr_table: torch.Tensor  # int64 [W] on the workspace's device
    peer_view: Callable[[int], torch.Tensor]  # rank -> that rank's copy (for host-side use)
    keepalive: object = None  # what must outlive the buffer (the symmetric-memory handle)


class CommWorkspace:
    """Named buffers addressable by every rank of a process group; see the module docstring."""

    def __init__(self, group, device: torch.device, max_spins: int | None):
        _require_distributed()
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.device = device
        if max_spins is None:
            max_spins = int(os.environ.get("COMET_COMM_MAX_SPINS", DEFAULT_MAX_SPINS[device.type]))
        if max_spins < 1:
            raise ValueError(f"max_spins: expected >= 1, got {max_spins}")
        self.max_spins = max_spins
        self.epoch = torch.zeros(1, dtype=torch.int64, device=device)  # see next_epoch
        # Local only: each rank's kernels record their own timeouts here.
        self.errors = torch.zeros(len(ERROR_FIELDS), dtype=torch.int64, device=device)
        self._buffers: dict[str, _Buffer] = {}
        self._closed = False

    @staticmethod
    def create(group=None, device=None, max_spins: int | None = None) -> "CommWorkspace":
        """The workspace for `group` (default: the world group) on `device` (default: the current
        CUDA device if the group's backend is NCCL, else the CPU)."""
        _require_distributed()
        if device is None:
            backend = str(dist.get_backend(group))
            device = "cuda" if "nccl" in backend else "cpu"
        device = torch.device(device)
        if device.type == "cuda":
            return SymmetricMemoryWorkspace(group, device, max_spins)
        if device.type == "cpu":
            return SharedMemoryWorkspace(group, max_spins)
        raise ValueError(f"device: expected a cuda or cpu device, got {device}")

    # ------------------------------------------------------------------------------------------
    # Buffers
    # ------------------------------------------------------------------------------------------
    def buffer(self, name: str, shape, dtype: torch.dtype) -> torch.Tensor:
        """This rank's copy of the named buffer, made (zero-filled, collectively) on first use.

        Asking again for an existing name returns it (no communication); shape and dtype must match.
        """
        self._check_open()
        shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise ValueError(f"shape: expected non-negative sizes, got {shape}")
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype: expected a torch.dtype, got {dtype!r}")
        found = self._buffers.get(name)
        if found is not None:
            if tuple(found.local.shape) != shape or found.local.dtype != dtype:
                raise ValueError(f"buffer {name!r} exists with shape {tuple(found.local.shape)} and dtype "
                                 f"{found.local.dtype}; asked for {shape} and {dtype}")
            return found.local
        self._check_same_call(name, shape, dtype)
        made = self._allocate(len(self._buffers), shape, dtype)
        made.local.zero_()
        self.barrier()  # nobody may write into a peer's buffer before the peer has zeroed it
        self._buffers[name] = made
        return made.local

    def flags(self, name: str, shape) -> torch.Tensor:
        """A named buffer of int64 flags (starting at 0, raised to epochs); see `buffer`."""
        return self.buffer(name, shape, torch.int64)

    def ptr_table(self, name: str) -> torch.Tensor:
        """int64 [W] on the workspace's device: entry p is rank p's address of buffer `name`."""
        return self._get(name).ptr_table

    def peer_buffer(self, name: str, peer: int) -> torch.Tensor:
        """Rank `peer`'s copy of buffer `name`, as a tensor this process can read and write."""
        if not 0 <= peer < self.world_size:
            raise ValueError(f"peer: expected a rank in [0, {self.world_size}), got {peer}")
        return self._get(name).peer_view(peer)

    def _get(self, name: str) -> _Buffer:
        self._check_open()
        if name not in self._buffers:
            raise KeyError(f"no buffer named {name!r} in this workspace; make it with buffer() or flags()")
        return self._buffers[name]

    # ------------------------------------------------------------------------------------------
    # Calls, errors, lifetime
    # ------------------------------------------------------------------------------------------
    def next_epoch(self) -> torch.Tensor:
        """Advance to a new collective call's epoch (1, 2, ...: the flag value its writers raise)
        on the device, in stream order; returns the int64 [1] tensor the kernels read it from."""
        self.epoch.add_(1)
        return self.epoch

    def check_errors(self):
        """Raise `CommTimeoutError` if a kernel's wait timed out (waits for this rank's queued work,
        then reads the record: a host sync).

        The workspace stays broken afterwards (later waits give up at once): make a new one.
        """
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        record = self.errors.tolist()
        if record[0] != 0:
            raise self.timeout_error(record)

    def timeout_error(self, record) -> CommTimeoutError:
        """The `CommTimeoutError` an error record (`ERROR_FIELDS` values) describes."""
        record = dict(zip(ERROR_FIELDS, (int(v) for v in record)))
        kind = record["kind"]
        what = WaitKind(kind).describe() if kind in WaitKind._value2member_map_ else f"wait of kind {kind}"
        return CommTimeoutError(
            f"rank {self.rank} timed out waiting for rank {record['peer']}'s {what} {record['index']} "
            f"(epoch {record['expected']}, its flag reads {record['seen']}) after {self.max_spins} polls; "
            f"the peer is dead, hung, or not making the same calls. This workspace is unusable now.")

    def barrier(self):
        """Host barrier over the group after this rank's queued device work (setup/teardown only)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def free(self, name: str):
        """Collective: free the named buffer once no rank can still write into it."""
        self._get(name)
        self.barrier()
        del self._buffers[name]

    def close(self):
        """Collective: wait until no rank can still write into this one's buffers, then free them."""
        if self._closed:
            return
        self.barrier()
        self._buffers.clear()
        self._closed = True

    def __enter__(self) -> "CommWorkspace":
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_open(self):
        if self._closed:
            raise RuntimeError("CommWorkspace: used after close()")

    def _check_same_call(self, name: str, shape: tuple, dtype: torch.dtype):
        """Buffers are made collectively; a rank asking for something else is a bug: say so."""
        calls = [None] * self.world_size
        dist.all_gather_object(calls, (name, shape, str(dtype)), group=self.group)
        if any(c != calls[0] for c in calls):
            listing = "; ".join(f"rank {r}: {c}" for r, c in enumerate(calls))
            raise ValueError(f"CommWorkspace.buffer must be called with the same name, shape and dtype "
                             f"in the same order on every rank; got {listing}")

    def _allocate(self, index: int, shape: tuple, dtype: torch.dtype) -> _Buffer:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size}, device={self.device}, "
                f"buffers={list(self._buffers)})")


class SharedMemoryWorkspace(CommWorkspace):
    """CPU workspace: one /dev/shm file per buffer holding every rank's copy, mapped by all ranks.

    The pointer table holds this process's addresses of the peers' copies. Rank 0 creates each file
    and removes its name as soon as every rank has mapped it, so nothing is left behind even if a
    process dies later; the memory goes when the last mapping does.
    """

    SLOT_ALIGN = 4096  # each rank's copy starts on its own page

    def __init__(self, group=None, max_spins: int | None = None):
        super().__init__(group, torch.device("cpu"), max_spins)
        hosts = [None] * self.world_size
        dist.all_gather_object(hosts, socket.gethostname(), group=self.group)
        if len(set(hosts)) > 1:
            raise RuntimeError(f"SharedMemoryWorkspace needs every rank on one host; got {hosts}")
        prefix = [f"comet-comm-{os.getpid()}-{uuid.uuid4().hex[:12]}" if self.rank == 0 else None]
        dist.broadcast_object_list(prefix, src=dist.get_global_rank(self.group, 0), group=self.group)
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        self._prefix = os.path.join(folder, prefix[0])

    def _allocate(self, index: int, shape: tuple, dtype: torch.dtype) -> _Buffer:
        nbytes = math.prod(shape) * dtype.itemsize
        slot = max(1, math.ceil(nbytes / self.SLOT_ALIGN)) * self.SLOT_ALIGN
        path = f"{self._prefix}-{index}"
        total = slot * self.world_size
        try:
            if self.rank == 0:
                whole = torch.from_file(path, shared=True, size=total, dtype=torch.uint8)
            dist.barrier(group=self.group)
            if self.rank != 0:
                # from_file would silently create a missing file: check it is rank 0's.
                if not os.path.exists(path) or os.path.getsize(path) != total:
                    raise RuntimeError(f"SharedMemoryWorkspace: {path} is missing or has the wrong size")
                whole = torch.from_file(path, shared=True, size=total, dtype=torch.uint8)
            dist.barrier(group=self.group)
        finally:
            if self.rank == 0:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

        def view(peer: int) -> torch.Tensor:
            return whole[peer * slot: peer * slot + nbytes].view(dtype).view(shape)

        base = whole.data_ptr()
        table = torch.tensor([base + p * slot for p in range(self.world_size)], dtype=torch.int64)
        return _Buffer(view(self.rank), table, view)


class SymmetricMemoryWorkspace(CommWorkspace):
    """GPU workspace: each buffer is a PyTorch symmetric-memory allocation, rendezvoused over the
    group; the pointer table comes from the handle's peer addresses."""

    def __init__(self, group=None, device=None, max_spins: int | None = None):
        # Multicast (NVLS) objects are never used; do not let the rendezvous set them up.
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        if not torch.cuda.is_available():
            raise RuntimeError("SymmetricMemoryWorkspace needs CUDA; use SharedMemoryWorkspace on CPU")
        device = torch.device("cuda") if device is None else torch.device(device)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        try:
            import torch.distributed._symmetric_memory as symm_mem
        except ImportError as e:
            raise RuntimeError(f"SymmetricMemoryWorkspace: this torch ({torch.__version__}) has no "
                               f"symmetric memory: {e}") from e
        super().__init__(group, device, max_spins)
        self._symm_mem = symm_mem
        self._group_name = self.group.group_name
        # Older torch needs the group registered before a rendezvous; newer ones deprecate this
        # as unnecessary, and refuse a second registration made behind Python's back.
        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is not None and not symm_mem.is_symm_mem_enabled_for_group(self._group_name):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                try:
                    enable(self._group_name)
                except RuntimeError:  # already registered directly
                    pass

    def _allocate(self, index: int, shape: tuple, dtype: torch.dtype) -> _Buffer:
        local = self._symm_mem.empty(shape, dtype=dtype, device=self.device)
        handle = self._symm_mem.rendezvous(local, self._group_name)
        if handle.world_size != self.world_size or handle.rank != self.rank:
            raise RuntimeError(f"symmetric memory rendezvous gave rank {handle.rank} of {handle.world_size}, "
                               f"expected rank {self.rank} of {self.world_size}")
        # The handle's addresses are those of whole allocations; the tensor may sit inside one.
        bases = list(handle.buffer_ptrs)
        offset = local.data_ptr() - bases[self.rank]
        nbytes = local.numel() * dtype.itemsize
        if offset < 0 or offset + nbytes > handle.buffer_size or offset % dtype.itemsize:
            raise RuntimeError(f"symmetric memory: tensor at offset {offset} does not fit its allocation "
                               f"of {handle.buffer_size} bytes")
        table = torch.tensor([b + offset for b in bases], dtype=torch.int64, device=self.device)

        def view(peer: int) -> torch.Tensor:
            return handle.get_buffer(peer, shape, dtype, offset // dtype.itemsize)

        return _Buffer(local, table, view, keepalive=handle)
