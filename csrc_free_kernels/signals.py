"""Device-side helpers for talking to other ranks from inside a Triton kernel.

Peers' buffers are reached through a pointer table (`CommWorkspace.ptr_table`): an int64 tensor of
W addresses, turned into a typed pointer with `peer_ptr`. Flags are int64 words in a workspace flag
buffer (`CommWorkspace.flags`) holding the epoch of the last call that raised them, so they never
need resetting: a writer stores its data, then `signal_set(flag, epoch)`; a reader
`wait_flag_ge(flag, epoch, ...)` and then reads.

Every wait is bounded. Past `max_spins` polls the waiting program writes an error record into the
workspace's error buffer (`CommWorkspace.errors`, int64 [5]: wait kind, peer, index, expected
epoch, flag value seen; the first failure wins) and returns False; later waits of the same
workspace see the record and give up at once, so a lost peer costs one timeout, not one per wait.
The host turns the record into an exception in `CommWorkspace.check_errors`.

The same code runs compiled (GPU) and under the Triton interpreter (CPU; programs run one after
another there, and ranks are separate processes, so a wait on another rank still completes).
"""
import triton
import triton.language as tl


@triton.jit
def peer_ptr(ptr_table, peer, like):
    """Address of rank `peer`'s copy of a buffer, typed like the pointer `like`.

    Workspace buffers start at least 16-byte aligned; saying so lets accesses vectorise.
    """
    return tl.multiple_of(tl.load(ptr_table + peer).to(tl.pointer_type(like.dtype.element_ty)), 16)


@triton.jit
def signal_set(flag_ptr, value):
    """Publish everything this program stored so far, then set the flag (int64) to `value`."""
    # The barrier orders all threads' stores before the (single-thread) release atomic.
    tl.debug_barrier()
    tl.atomic_xchg(flag_ptr, tl.cast(value, tl.int64), sem="release", scope="sys")


@triton.jit
def wait_flag_ge(flag_ptr, expected, max_spins, error_ptr, kind, peer, index):
    """Spin until the flag (int64) reaches `expected`; True if it did.

    On timeout, or if an earlier wait on this workspace already timed out, returns False; the
    first timeout records (kind, peer, index, expected, seen) at `error_ptr` for the host.
    """
    expected = tl.cast(expected, tl.int64)
    already_failed = tl.load(error_ptr, volatile=True) != 0
    spins_left = tl.cast(tl.where(already_failed, 0, max_spins), tl.int64)
    seen = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")
    while (seen < expected) & (spins_left > 0):
        seen = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")
        spins_left -= 1
    arrived = seen >= expected
    if seen < expected:  # only the first failure's record sticks: the others find it taken
        if tl.atomic_cas(error_ptr, tl.cast(0, tl.int64), tl.cast(kind, tl.int64)) == 0:
            tl.store(error_ptr + 1, tl.cast(peer, tl.int64))
            tl.store(error_ptr + 2, tl.cast(index, tl.int64))
            tl.store(error_ptr + 3, expected)
            tl.store(error_ptr + 4, seen)
    # The other threads of the program read the data only after the acquire above.
    tl.debug_barrier()
    return arrived


@triton.jit
def wait_flags_ge(flag_ptrs, needed, expected, max_spins, error_ptr, kind, peers, indices):
    """`wait_flag_ge` over a block of flags where `needed`: each poll reads them all at once, so
    waiting for n flags that are already up costs one round trip, not n. True if all arrived; on
    timeout the record names the first missing lane's peer and index."""
    expected = tl.cast(expected, tl.int64)
    already_failed = tl.load(error_ptr, volatile=True) != 0
    spins_left = tl.cast(tl.where(already_failed, 0, max_spins), tl.int64)
    seen = tl.where(needed, tl.atomic_add(flag_ptrs, 0, mask=needed, sem="acquire", scope="sys"), expected)
    while (tl.min(seen, axis=0) < expected) & (spins_left > 0):
        seen = tl.where(needed, tl.atomic_add(flag_ptrs, 0, mask=needed, sem="acquire", scope="sys"), expected)
        spins_left -= 1
    lowest = tl.min(seen, axis=0)
    if lowest < expected:
        missing = seen < expected
        lane = tl.arange(0, flag_ptrs.shape[0])
        first = tl.min(tl.where(missing, lane, flag_ptrs.shape[0]), axis=0)
        if tl.atomic_cas(error_ptr, tl.cast(0, tl.int64), tl.cast(kind, tl.int64)) == 0:
            tl.store(error_ptr + 1, tl.sum(tl.where(lane == first, peers, 0), axis=0).to(tl.int64))
            tl.store(error_ptr + 2, tl.sum(tl.where(lane == first, indices, 0), axis=0).to(tl.int64))
            tl.store(error_ptr + 3, expected)
            tl.store(error_ptr + 4, lowest)
    tl.debug_barrier()
    return lowest >= expected
