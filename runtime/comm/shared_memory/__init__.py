"""Tensors between processes on one host through shared memory: the ZeroMQ message carries a handle, not the bytes.

A link whose both ends are on this host (an ipc:// endpoint, or tcp:// to one of this host's addresses) may send a
tensor as a `Handle` (segment name, fill, offset, dtype, shape) to a segment in /dev/shm; the receiver maps the
segment and gets a tensor over it without a copy. Fresh pages cost more than the copy (the kernel zeroes and maps each
4 KiB on first touch: ~25 ms for a 47 MB KV against a 2 ms memcpy), so segments are kept and reused, as vLLM's
shm_broadcast ring is:

    sender   `Arena` (one per process, `arena()`): slots of shared memory. `Link.share` copies a tensor into a free
             slot, or sends none of its bytes when the tensor already lives in one (`Arena.empty`: a producer that
             builds its tensor there, e.g. a KV gathered straight into shared memory, sends it without any copy).
    receiver `Mappings` (one per process): maps a slot the first time a handle names it, unlinks its name at once and
             keeps the mapping; a decoded tensor views it. When the last view of it dies the receiver counts the
             slot released in its header, and the sender may fill it again.

Nothing outlives both processes: once mapped a slot has no name, so its memory goes when the last of the two unmaps
it. A name exists only while a slot is on its way, and is removed by whoever learns the receiver will never map it:
the sender when its link closes (at once if the receiver is known dead, after `linger_s` if it never heard from it;
left for a live receiver that still has it queued), and `sweep` (when an arena starts and when a bridge closes) for
names whose creator and heir are both dead. The sender also gives up slots whose receiver died, whose releases will
never come. A slot serves the one receiver that mapped it. A handle to a segment that is gone, stale or too small is
a `SegmentError`, which the wire turns into a `WireError` for that one message. Linux only (`available`); other
links keep ZeroMQ frames.

The rooms: the segments' format (`segments`), the sender (`sender`), the receiver (`receiver`), and this process's
arena and mappings (`this_process`); callers import from here."""

from sagellm.runtime.comm.shared_memory.receiver import Mappings
from sagellm.runtime.comm.shared_memory.segments import HEADER, MAGIC, PREFIX, SHM_DIR, Handle, SegmentError, sweep
from sagellm.runtime.comm.shared_memory.sender import Arena, Link
from sagellm.runtime.comm.shared_memory.this_process import arena, available, is_local, link_to, tensor_of

__all__ = [
    "HEADER",
    "MAGIC",
    "PREFIX",
    "SHM_DIR",
    "Arena",
    "Handle",
    "Link",
    "Mappings",
    "SegmentError",
    "arena",
    "available",
    "is_local",
    "link_to",
    "sweep",
    "tensor_of",
]
