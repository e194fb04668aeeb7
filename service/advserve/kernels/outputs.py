"""Memory for the CPU kernel's outputs, reused once nothing refers to it any more.

An output [B, T] the kernel writes is new memory on every call. Where glibc has given freed memory back
to the system (its default thresholds, as in a trainer's process: the server tunes them away at start,
`runtime.tune_allocator`), each of its 4 KiB pages then costs a page fault on first write: at [256, 4096]
float32 about 1,000 faults per GAE call, which doubled it (bench/bench_output_pool.py). So the kernel
takes its outputs from an `OutputPool`:

  * a block is a numpy byte array the pool keeps; an output is a tensor over a view of it
    (`torch.from_numpy`), so every tensor, view or array over the output holds a reference to the block
    (through torch's storage and numpy's `base`);
  * a block is free when the pool's own references are all there are (`sys.getrefcount`, calibrated
    once): the caller has dropped every result over it. The smallest free block that holds an output
    and is at most twice its size is handed out again (its first bytes: a trainer's padded width
    changes from step to step); otherwise a new one is made;
  * the pool tracks at most `max_bytes` of blocks, in use or free: to make room for a new block it lets
    go of free ones, least recently used first, and an output it has no room for is a plain
    torch.empty. So whatever the caller held and dropped, the pool keeps at most `max_bytes` once it is
    done (it cannot see a drop when it happens: it looks at its next call); `clear()` lets go of every
    free block.

Outputs under `min_bytes` come from torch.empty (glibc's heap serves small sizes without faults).
"""

from __future__ import annotations

import math
import sys
import threading

import numpy as np
import torch
from torch import Tensor


def _references_when_free() -> int:
    """sys.getrefcount of a block held only by the pool's list, read as `OutputPool` reads it."""
    blocks = [np.empty(0, np.uint8)]
    return sys.getrefcount(blocks[0])


_FREE = _references_when_free()


class OutputPool:
    """Blocks of memory handed out as output tensors and reused once they are free (see the module's
    docstring). Thread-safe. `enabled` False: `empty` is torch.empty."""

    def __init__(self, max_bytes: int = 256 << 20, min_bytes: int = 1 << 20, enabled: bool = True):
        self.max_bytes, self.min_bytes, self.enabled = max_bytes, min_bytes, enabled
        self._blocks: list[np.ndarray] = []  # least recently handed out first
        self._lock = threading.Lock()

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """An uninitialized contiguous tensor of `shape` and `dtype` on the CPU, over a reused block
        when a free one of its size (up to twice it) is held."""
        nbytes = math.prod(shape) * dtype.itemsize
        if not self.enabled or nbytes < self.min_bytes:
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            fits = [i for i in range(len(self._blocks)) if nbytes <= self._blocks[i].nbytes <= 2 * nbytes
                    and sys.getrefcount(self._blocks[i]) == _FREE]
            block = self._blocks.pop(min(fits, key=lambda i: self._blocks[i].nbytes)) if fits else None
            if block is None:
                self._let_go(self.max_bytes - nbytes)
                if sum(block.nbytes for block in self._blocks) + nbytes > self.max_bytes:
                    return torch.empty(shape, dtype=dtype)  # no room: not tracked
                block = np.empty(nbytes, np.uint8)
            self._blocks.append(block)
            return torch.from_numpy(block[:nbytes]).view(dtype).view(shape)

    def free_bytes(self) -> int:
        """Bytes of the blocks no result refers to any more."""
        with self._lock:
            return sum(self._blocks[i].nbytes for i in range(len(self._blocks))
                       if sys.getrefcount(self._blocks[i]) == _FREE)

    def clear(self) -> None:
        """Let go of every free block (the memory goes back to the allocator)."""
        with self._lock:
            self._let_go(0)

    def _let_go(self, keep: int) -> None:
        """Drop free blocks, least recently used first, until all the blocks left (in use or free) hold
        at most `keep` bytes, or no free one is left."""
        free = [i for i in range(len(self._blocks)) if sys.getrefcount(self._blocks[i]) == _FREE]
        excess = sum(block.nbytes for block in self._blocks) - keep
        dropped = set()
        for i in free:
            if excess <= 0:
                break
            excess -= self._blocks[i].nbytes
            dropped.add(i)
        if dropped:
            self._blocks = [block for i, block in enumerate(self._blocks) if i not in dropped]


# the kernel's; the server turns it off (its allocator keeps freed memory already). Off on a free-threaded
# Python, whose reference counts another thread may still be merging (no `sys.getrefcount` verdict there)
OUTPUTS = OutputPool(enabled=getattr(sys, "_is_gil_enabled", lambda: True)())
