"""Run per-expert work on single-threaded worker threads, each taking a share of the experts.

Why: a CPU expert GEMM is small (tens of rows × d × ffn). A GEMM library splits each one over every intra-op
thread and loses most of the parallelism; running different experts at the same time, one thread each, is
what a batched GEMM does internally. Part of the CPU backend (never imported by the model's own files).
Thread-local state the workers must share with the caller: grad and inference mode (carried over); autocast
(`grouped_ffn` casts the operands before any worker runs); dispatch modes such as FlopCounterMode or
FakeTensorMode cannot be shared, so under one the experts run on the calling thread, where the mode sees them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

_pool: ThreadPoolExecutor | None = None
_pool_threads = 0
_pool_lock = threading.Lock()


def _make_single_threaded(barrier: threading.Barrier) -> None:
    # MKL's and OpenMP's thread counts are per calling thread, so this pins only this worker...
    torch.set_num_threads(1)
    barrier.wait()  # ...(the barrier makes every pool thread run this once, on its own thread)


def _worker_pool(num_threads: int) -> ThreadPoolExecutor:
    global _pool, _pool_threads
    with _pool_lock:
        if _pool is None or _pool_threads != num_threads:
            if _pool is not None:
                _pool.shutdown(wait=True)
            pool = ThreadPoolExecutor(num_threads, thread_name_prefix="hf_moe_mt_experts")
            barrier = threading.Barrier(num_threads)
            for future in [pool.submit(_make_single_threaded, barrier) for _ in range(num_threads)]:
                future.result()
            # ...but ATen's intra-op count is process-wide: give the caller its threads back.
            torch.set_num_threads(num_threads)
            _pool, _pool_threads = pool, num_threads
        return _pool


def _forget_pool_after_fork() -> None:
    """Threads do not survive fork (DataLoader workers): a child builds its own pool if it needs one."""
    global _pool, _pool_threads, _pool_lock
    _pool, _pool_threads, _pool_lock = None, 0, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_after_fork)


def split_experts(bounds: list[tuple[int, int]], parts: int) -> list[list[int]]:
    """Experts dealt to `parts` workers, largest groups first to the least-loaded worker (by rows)."""
    loads, shares = [0] * parts, [[] for _ in range(parts)]
    for expert in sorted(range(len(bounds)), key=lambda e: bounds[e][0] - bounds[e][1]):
        worker = loads.index(min(loads))
        shares[worker].append(expert)
        loads[worker] += bounds[expert][1] - bounds[expert][0]
    return [share for share in shares if share]


def _must_stay_on_this_thread() -> bool:
    """A dispatch mode is active on this thread (it would not see the workers' ops), or torch.compile traces."""
    return torch._C._len_torch_dispatch_stack() > 0 or torch.compiler.is_compiling()


def for_each_expert(work: Callable[[int, int, int], None], bounds: list[tuple[int, int]], parallel: bool = True) -> None:
    """Call `work(expert, lo, hi)` once per expert; concurrently on single-threaded workers when
    `parallel` and torch has several intra-op threads. `work` must only write its own expert's slices."""
    threads = torch.get_num_threads()
    if not parallel or threads == 1 or len(bounds) < 2 or _must_stay_on_this_thread():
        for expert, (lo, hi) in enumerate(bounds):
            work(expert, lo, hi)
        return
    # Grad and inference mode are thread-local: the workers run under the caller's.
    mode = torch.inference_mode if torch.is_inference_mode_enabled() else torch.no_grad

    def run(share: list[int]) -> None:
        with mode():
            for expert in share:
                work(expert, *bounds[expert])

    pool = _worker_pool(threads)
    futures = [pool.submit(run, share) for share in split_experts(bounds, threads)]
    for future in futures:
        future.result()
