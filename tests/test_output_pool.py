"""The CPU kernel's output pool (advserve.kernels.outputs): memory is reused only once nothing refers to it.

What must hold: a live result (a tensor, any torch view of it, any numpy array over it, a slice of
that array) is never handed out again, so a caller that keeps results sees them unchanged; a dropped
one is reused (that is the point: no page faults); the pool keeps at most `max_bytes` of
blocks; small and disabled requests are plain torch.empty; threads never share a live block.
"""

from __future__ import annotations

import gc
import threading

import numpy as np
import torch

import advserve
from advserve.kernels.outputs import OUTPUTS, OutputPool

MIB = 1 << 20
SHAPE = (64, 4096)  # 1 MiB of float32


def test_a_dropped_output_is_reused():
    pool = OutputPool()
    first = pool.empty(SHAPE, torch.float32)
    address = first.data_ptr()
    del first
    again = pool.empty(SHAPE, torch.float32)
    assert again.data_ptr() == address
    assert again.shape == SHAPE and again.dtype == torch.float32 and again.is_contiguous()


def test_nothing_that_refers_to_an_output_lets_it_be_reused():
    """Each way of keeping the memory alive: the tensor, a torch view, a numpy array over it, a numpy
    slice of that array (whose base is the pool's block itself), a dtype view."""
    keepers = [lambda t: t, lambda t: t[3:], lambda t: t.numpy(), lambda t: t.numpy()[5:, 7:],
               lambda t: t.view(torch.int32), lambda t: t.reshape(-1)]
    pool = OutputPool()
    for keep in keepers:
        output = pool.empty(SHAPE, torch.float32)
        output.fill_(1.0)
        kept = keep(output)
        snapshot = torch.as_tensor(kept).clone()
        address = output.data_ptr()
        del output
        gc.collect()
        other = pool.empty(SHAPE, torch.float32)
        assert other.data_ptr() != address
        other.fill_(2.0)
        assert torch.equal(torch.as_tensor(kept), snapshot)
        del kept, other


def test_a_different_size_or_dtype_width_gets_its_own_block():
    pool = OutputPool()
    a = pool.empty(SHAPE, torch.float32)
    address = a.data_ptr()
    del a
    b = pool.empty((64, 2048), torch.float64)  # the same bytes: reused whatever the dtype
    assert b.data_ptr() == address
    del b
    c = pool.empty((128, 4096), torch.float32)  # other bytes: a new block
    assert c.data_ptr() != address


def test_a_smaller_output_reuses_a_free_block_up_to_twice_its_size():
    """A trainer's padded width changes from step to step: a free block serves any output of at least
    half its size (the smallest such block), not a smaller one."""
    pool = OutputPool(min_bytes=0)
    big = pool.empty((64, 4096), torch.float32)
    address = big.data_ptr()
    del big
    smaller = pool.empty((64, 3000), torch.float32)
    assert smaller.data_ptr() == address and smaller.shape == (64, 3000)
    smaller.fill_(3.0)
    del smaller
    tiny = pool.empty((64, 1500), torch.float32)  # under half: a block of its own
    assert tiny.data_ptr() != address


def test_the_pool_never_keeps_more_than_its_limit():
    """Outputs beyond `max_bytes` of blocks are plain tensors, so once the caller drops everything the
    pool holds at most `max_bytes`, however much the caller held at once; free blocks make room for new
    sizes, least recently used first; clear() lets go of every free block."""
    pool = OutputPool(max_bytes=3 * MIB)
    held = [pool.empty(SHAPE, torch.float32) for _ in range(6)]
    del held
    gc.collect()
    assert pool.free_bytes() == 3 * MIB
    other = pool.empty((2 * MIB,), torch.uint8)  # a new size: two free blocks make room
    assert pool.free_bytes() == MIB
    del other
    assert pool.free_bytes() == 3 * MIB
    pool.clear()
    assert pool.free_bytes() == 0


def test_small_or_disabled_requests_are_not_pooled():
    pool = OutputPool(min_bytes=MIB)
    small = pool.empty((4, 4), torch.float32)
    address = small.data_ptr()
    del small
    assert pool.free_bytes() == 0
    pool.enabled = False
    big = pool.empty(SHAPE, torch.float32)
    del big
    assert pool.free_bytes() == 0
    assert address  # a real allocation


def test_threads_never_share_a_live_block():
    pool = OutputPool(max_bytes=4 * MIB)
    live: list[tuple[int, torch.Tensor]] = []
    lock = threading.Lock()
    clashes = []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        mine = []
        for _ in range(200):
            output = pool.empty(SHAPE, torch.float32)
            with lock:
                if any(output.data_ptr() == other.data_ptr() for other in live):
                    clashes.append(output.data_ptr())
                live.append(output)
            mine.append(output)
            if len(mine) > 2 or rng.random() < 0.5:
                dropped = mine.pop(0)
                with lock:
                    live[:] = [t for t in live if t is not dropped]
                del dropped

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not clashes


def test_an_engine_result_kept_by_the_caller_is_never_overwritten(monkeypatch):
    """Two in-process calls: while the first result is held, the second gets other memory and the first
    keeps its values; once both are dropped, a third call makes no new block."""
    monkeypatch.setattr(OUTPUTS, "enabled", True)
    gen = torch.Generator().manual_seed(0)
    batch, width = 64, 4096  # 1 MiB outputs: pooled
    mask = (torch.arange(width) < torch.randint(1, width + 1, (batch, 1), generator=gen)).float()
    values = torch.randn(batch, width, generator=gen)

    def call(scale: float):
        return advserve.compute_advantages("gae", preset="paper", token_rewards=values * scale * mask,
                                           values=values * mask, response_mask=mask, kernels="numba")

    first = call(1.0)
    kept = first.advantages.clone()
    address = first.advantages.data_ptr()
    second = call(-3.0)
    assert second.advantages.data_ptr() != address
    assert torch.equal(first.advantages, kept)
    del first, second
    gc.collect()
    blocks = len(OUTPUTS._blocks)
    third = call(2.0)
    assert len(OUTPUTS._blocks) == blocks
    assert torch.equal(third.advantages, call(2.0).advantages)
