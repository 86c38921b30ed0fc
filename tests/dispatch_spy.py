"""A dispatch-level spy on the GEMMs that actually run: op, operand dtypes and thread, on the calling thread and,
through `on_worker_threads`, on the CPU backend's expert worker threads (dispatch modes are thread-local)."""

import contextlib
import threading

import torch
from torch.utils._python_dispatch import TorchDispatchMode

GEMM_OPS = {"mm", "addmm", "bmm", "baddbmm", "_grouped_mm", "_linear_pointwise"}


class GemmSpy(TorchDispatchMode):
    """Records (op, (dtypes of its floating-point operands), output columns, thread name) for every GEMM, and
    its output shape in `shapes`."""

    def __init__(self):
        super().__init__()
        self.calls, self.shapes = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name.split("::")[-1]
        if name in GEMM_OPS:
            dtypes = tuple(a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
            self.calls.append((name, dtypes, out.shape[-1], threading.current_thread().name))
            self.shapes.append(tuple(out.shape))
        return out

    def dtypes(self, worker_threads_only: bool = False) -> set:
        return {dtype for _, dtypes, _, thread in self.calls
                if not worker_threads_only or thread.startswith("hf_moe_mt_experts") for dtype in dtypes}

    def on_workers(self) -> int:
        return sum(thread.startswith("hf_moe_mt_experts") for *_, thread in self.calls)


@contextlib.contextmanager
def on_worker_threads(spy: GemmSpy):
    """Push `spy` onto every expert worker thread's dispatch-mode stack for the block (the calling thread gets
    none: under a mode the backend keeps the experts on the calling thread, which is not what is tested)."""
    from hf_moe_mt.backends import expert_threads

    threads = torch.get_num_threads()
    pool = expert_threads._worker_pool(threads)
    barrier = threading.Barrier(threads)

    def on_each_worker(action):
        action()
        barrier.wait()  # every pool thread takes exactly one of these tasks

    for future in [pool.submit(on_each_worker, lambda: torch._C._push_on_torch_dispatch_stack(spy))
                   for _ in range(threads)]:
        future.result()
    try:
        yield spy
    finally:
        for future in [pool.submit(on_each_worker, lambda: torch._C._pop_torch_dispatch_stack(None))
                       for _ in range(threads)]:
            future.result()
