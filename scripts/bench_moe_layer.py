"""Benchmark the sparse MoE layer against DeepSpeed's and transformers' MoE layers and a dense FFN.

Measures forward + backward (of the layer output, with a fixed random output gradient; aux losses are not
back-propagated in any row) for k ∈ --top-k × E ∈ --experts. At each (k, E) point every row is built, warmed
up, then timed round-robin in this one process (rep r starts at row r mod n, so no row always runs first or
last); the table reports the median. The ratio column divides by a dense FFN of equal activated FLOPs
(width k·ffn), re-measured in the same round-robin at every point. Peak memory is a separate, untimed
pass per row: on CPU the torch profiler's allocator events (profile_memory) give the peak of live torch
bytes allocated during one forward+backward above what was live before it (activations, temporaries and
the parameter gradients; not the parameters or inputs); on CUDA, max_memory_allocated above the same baseline.

Rows (--rows): dense (`nn.Linear` FFN with the CPU backend applied: its GEMMs on the library the backend's
probe chose for Linear layers), dense_torch (the same FFN on torch's default GEMMs: MKL on x86 CPUs), floor
(this layer's expert GEMMs alone on perfectly balanced groups of T·k/E rows, backend applied: no router, no
dispatch — what any grouped-GEMM MoE costs at best with this machine's GEMM library), ours_cf1.25 / ours_cf1.0 /
ours_dropless (this layer with the CPU backend, `hf_moe_mt.backends.enable_fast_cpu`, as our commands run it),
ours_standard (cf 1.0, the model's own kernels without the backend: what a user's script gets without the
call), deepspeed (deepspeed.moe.layer.MoE, ep_size=1, cf 1.25, a gloo group of size 1), hf_grouped_mm / hf_eager
(transformers' experts interface on NemotronHExperts, its non-gated 3-D experts), switch
(SwitchTransformersSparseMLP, k=1), nllb (NllbMoeSparseMLP, k=2, only E ≤ --nllb-max-experts). hf_eager is off by
default (slow). The ratio column divides by the faster of the two dense rows at that point.

Two tables: first in this process with the memory settings our commands use (transparent huge pages, glibc
keeping freed memory: hf_moe_mt.runtime.apply_memory_settings), then — on CPU, unless --no-plain — the same
rows in a plain child process without either setting, as users' own scripts run. Every table says which CPU,
how many cores and which backends it ran with.

  python scripts/bench_moe_layer.py                          # the full table (T=4096, d=512, ffn=2048)
  python scripts/bench_moe_layer.py --tokens 256 --d-model 64 --ffn 128 --experts 4,8 --repeats 2
  python scripts/bench_moe_layer.py --device cuda --dtype bf16 --json bench.json
  python scripts/bench_moe_layer.py --device cuda --tokens 32768 --d-model 1024 --ffn 4096 --profile

Anchor rows whose package is missing or fails to build on this machine are skipped with the reason
printed under the table; the dense and hf_moe_mt rows never are.
"""

from __future__ import annotations

import os
import sys

PLAIN_PROCESS = "--plain-process" in sys.argv  # the second table's child: no process memory settings
if "--no-thp" in sys.argv:
    os.environ["THP_MEM_ALLOC_ENABLE"] = "0"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout needs no install

from hf_moe_mt.runtime import apply_memory_settings, release_freed_memory  # noqa: E402

# Before any tensor exists (PyTorch reads THP_MEM_ALLOC_ENABLE at its first allocation); every row alike.
MEMORY_SETTINGS = {} if PLAIN_PROCESS else apply_memory_settings()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from hf_moe_mt.backends import choose_gemm, describe_machine, enable_fast_cpu  # noqa: E402
from hf_moe_mt.moe import GroupedExperts, SparseMoE  # noqa: E402

ANCHOR_CF = 1.25  # DeepSpeed's (and our anchor rows') capacity factor
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ROWS = ("dense", "dense_torch", "floor", "ours_cf1.25", "ours_cf1.0", "ours_dropless", "ours_standard", "deepspeed",
        "hf_grouped_mm", "hf_eager", "switch", "nllb")
MOE_ROWS = ("hf_moe_mt", "DeepSpeed", "transformers")  # name prefixes of the rows that are MoE layers
DEFAULT_ROWS = tuple(r for r in ROWS if r != "hf_eager")


@dataclass
class Row:
    """One implementation at one (k, E) point: `step()` runs forward + backward once."""

    name: str
    capacity: str  # capacity factor as printed ("1.25", "dropless", …)
    module: nn.Module
    forward: object  # callable(x) -> output tensor
    note: str = ""
    times_ms: list[float] = field(default_factory=list)
    peak_mib: float | None = None

    def step(self, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        self.clear_grads(x)
        self.forward_backward(x, grad_out)

    def clear_grads(self, x: torch.Tensor) -> None:
        """Like zero_grad(set_to_none=True): allocating the gradients is part of every timed step."""
        for p in self.module.parameters():
            p.grad = None
        x.grad = None

    def forward_backward(self, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        self.forward(x).backward(grad_out)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="T, tokens per step (one sequence)")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=2048, help="expert FFN width (the dense row uses k·ffn)")
    parser.add_argument("--experts", type=_int_list, default=[8, 32, 64, 128], help="comma list, e.g. 8,32")
    parser.add_argument("--top-k", type=_int_list, default=[1, 2], help="comma list of 1 and/or 2")
    parser.add_argument("--repeats", type=int, default=5, help="timed round-robin repetitions per point")
    parser.add_argument("--warmup", type=int, default=2, help="untimed round-robin repetitions first")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--activation", choices=["relu", "gelu"], default="relu", help="used by every row")
    parser.add_argument("--rows", type=_str_list, default=list(DEFAULT_ROWS), help=f"subset of {','.join(ROWS)}")
    parser.add_argument("--nllb-max-experts", type=int, default=16,
                        help="NllbMoeSparseMLP runs only at E ≤ this (its cost grows ~linearly with E, see notes)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip the (untimed) peak-memory pass")
    parser.add_argument("--no-thp", action="store_true", help="THP_MEM_ALLOC_ENABLE=0 for this run (all rows)")
    parser.add_argument("--gemm", choices=["auto", "onednn", "torch"], default="auto",
                        help="the CPU backend's GEMM library: auto = its cached probe (or HF_MOE_MT_CPU_GEMM)")
    parser.add_argument("--no-plain", action="store_true", help="skip the second table (plain child process)")
    parser.add_argument("--plain-process", action="store_true", help=argparse.SUPPRESS)  # set for the child
    parser.add_argument("--json", type=str, default=None, help="write every number to this JSON file")
    parser.add_argument("--profile", action="store_true",
                        help="after each point, print the ops/kernels of one hf_moe_mt cf1.0 step by self time (stderr)")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    _check_args(args)
    return args


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _check_args(args) -> None:
    unknown = sorted(set(args.rows) - set(ROWS))
    if unknown:
        raise SystemExit(f"error: unknown --rows {unknown}; choose from {','.join(ROWS)}")
    if not set(args.top_k) <= {1, 2}:
        raise SystemExit(f"error: --top-k {args.top_k}: only 1 and 2 are supported")
    if any(e < max(args.top_k) for e in args.experts):
        raise SystemExit(f"error: --experts {args.experts} must all be >= top-k")
    if min(args.tokens, args.d_model, args.ffn, args.repeats) < 1:
        raise SystemExit("error: --tokens, --d-model, --ffn and --repeats must be positive")


# ----------------------------------------------------------------------------------------------- rows


SKIPPED_ANCHORS: dict[str, str] = {}  # row name -> why it could not be built on this machine


def build_rows(args, k: int, num_experts: int) -> list[Row]:
    """Every requested row for one (k, E) point; rows that do not apply at this point are skipped, and
    so are anchor rows that cannot be built here (missing package, no kernel for this device)."""
    builders = {
        "dense": _dense_row, "dense_torch": _dense_row, "floor": _floor_row,
        "ours_cf1.25": _ours_row, "ours_cf1.0": _ours_row, "ours_dropless": _ours_row, "ours_standard": _ours_row,
        "deepspeed": _deepspeed_row, "hf_grouped_mm": _hf_experts_row, "hf_eager": _hf_experts_row,
        "switch": _switch_row, "nllb": _nllb_row,
    }
    rows = []
    for name in ["dense", "dense_torch"] + [r for r in args.rows if not r.startswith("dense")]:
        torch.manual_seed(args.seed)
        if name in SKIPPED_ANCHORS:
            continue
        try:
            row = builders[name](args, k, num_experts, name)
        except Exception as error:  # noqa: BLE001  an anchor's failure must not hide the other rows
            if name == "dense" or name.startswith("ours"):
                raise
            SKIPPED_ANCHORS[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
            print(f"  row {name} skipped: {SKIPPED_ANCHORS[name]}", file=sys.stderr, flush=True)
            continue
        if row is not None:
            row.module.to(args.device, DTYPES[args.dtype]).train()
            if name in BACKEND_ROWS and args.device == "cpu":
                enable_fast_cpu(row.module, args.gemm)
            rows.append(row)
    return rows


BACKEND_ROWS = ("dense", "floor", "ours_cf1.25", "ours_cf1.0", "ours_dropless")  # CPU backend applied, as we run


def _dense_row(args, k, num_experts, name) -> Row:
    """The ratio anchor: a dense FFN of equal activated FLOPs (width k·ffn), `nn.Linear` layers; "dense" gets the
    CPU backend (its GEMM library for Linear layers), "dense_torch" keeps torch's default GEMMs."""
    width = k * args.ffn
    act = nn.ReLU() if args.activation == "relu" else nn.GELU()
    module = nn.Sequential(nn.Linear(args.d_model, width), act, nn.Linear(width, args.d_model))
    label = "dense FFN, backend GEMMs" if name == "dense" else "dense FFN, torch's default GEMMs"
    return Row(label, "–", module, module)


def _floor_row(args, k, num_experts, name) -> Row:
    """GroupedExperts on k copies of the tokens split into equal groups; the k copies are summed back."""
    module = GroupedExperts(num_experts, args.d_model, args.ffn, args.activation)
    rows = k * args.tokens
    counts = torch.full((num_experts,), rows // num_experts, dtype=torch.int64)
    counts[: rows % num_experts] += 1
    counts = counts.to(args.device)

    def forward(x):
        flat = x.reshape(-1, args.d_model)
        out = module(flat if k == 1 else flat.repeat(k, 1), counts)
        return (out if k == 1 else out.view(k, -1, args.d_model).sum(0)).view(x.shape)

    return Row("expert GEMMs alone, balanced groups (floor)", "–", module, forward,
               f"{rows // num_experts} rows per expert; no routing, dispatch or combine")


def _ours_row(args, k, num_experts, name) -> Row:
    factor = {"ours_cf1.25": ANCHOR_CF, "ours_cf1.0": 1.0, "ours_dropless": 1.0, "ours_standard": 1.0}[name]
    dropless = name == "ours_dropless"
    module = SparseMoE(args.d_model, args.ffn, num_experts, top_k=k, capacity_factor=factor, min_capacity=4,
                       use_rts=True, drop_tokens=not dropless, activation=args.activation)
    label = "hf_moe_mt SparseMoE" + {"ours_cf1.0": " (paper default)", "ours_standard": ", no backend"}.get(name, "")
    note = "the model's own kernels (experts_kernel auto), no CPU backend" if name == "ours_standard" else ""
    return Row(label, "dropless" if dropless else f"{factor}", module, lambda x: module(x)[0], note)


def _deepspeed_row(args, k, num_experts, name) -> Row:
    _init_deepspeed(args.device)
    from deepspeed.moe.layer import MoE

    act = nn.ReLU() if args.activation == "relu" else nn.GELU()
    expert = nn.Sequential(nn.Linear(args.d_model, args.ffn), act, nn.Linear(args.ffn, args.d_model))
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints its group creation; keep stdout the table
        module = MoE(args.d_model, expert, num_experts, ep_size=1, k=k, capacity_factor=ANCHOR_CF,
                     eval_capacity_factor=ANCHOR_CF, min_capacity=4, drop_tokens=True, use_rts=True)
        module.set_deepspeed_parallelism()
    note = "ep_size=1, RTS" + (", 2nd expert Gumbel-sampled (DeepSpeed default)" if k == 2 else "")
    return Row(f"DeepSpeed {_version('deepspeed')} moe.layer.MoE", f"{ANCHOR_CF}", module,
               lambda x: module(x)[0], note)


DISTRIBUTED_ENV_SET: set[str] = set()


def _init_deepspeed(device: str) -> None:
    """A process group of size 1 (gloo on CPU); skip the ~100 s JIT build of the shm op DeepSpeed never uses here."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.startswith("cuda") else "cpu")
    import deepspeed

    if torch.distributed.is_initialized():
        return
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(_free_port())}.items():
        if key not in os.environ:
            os.environ[key] = value
            DISTRIBUTED_ENV_SET.add(key)  # not for the plain child process: it needs its own port
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="nccl" if device.startswith("cuda") else "gloo")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _HFExpertsBlock(nn.Module):
    """Softmax top-k router (renormalised for k=2, like Qwen3-MoE's norm_topk_prob) + transformers 5.x experts."""

    def __init__(self, experts: nn.Module, d_model: int, num_experts: int, top_k: int):
        super().__init__()
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.experts, self.top_k = experts, top_k

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        probs = torch.softmax(self.gate(flat).float(), dim=-1)
        weights, index = probs.topk(self.top_k, dim=-1)
        if self.top_k > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return self.experts(flat, index, weights.to(flat.dtype)).view(x.shape)


def _hf_experts_row(args, k, num_experts, name) -> Row:
    """NemotronHExperts: transformers' non-gated (up → act → down) 3-D experts, the same FLOPs as ours."""
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

    implementation = "grouped_mm" if name == "hf_grouped_mm" else "eager"
    config = types.SimpleNamespace(n_routed_experts=num_experts, hidden_size=args.d_model, moe_intermediate_size=args.ffn,
                                   moe_latent_size=None, mlp_hidden_act=args.activation,
                                   _experts_implementation=implementation)
    experts = NemotronHExperts(config)
    nn.init.normal_(experts.up_proj, std=0.02)
    nn.init.normal_(experts.down_proj, std=0.02)
    module = _HFExpertsBlock(experts, args.d_model, num_experts, k)
    return Row(f"transformers {_version('transformers')} experts, {implementation}", "dropless", module, module,
               "NemotronHExperts (non-gated, no bias) + softmax top-k router")


def _switch_row(args, k, num_experts, name) -> Row | None:
    if k != 1:
        return None
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

    capacity = math.ceil(ANCHOR_CF * args.tokens / num_experts)
    config = SwitchTransformersConfig(d_model=args.d_model, d_ff=args.ffn, num_experts=num_experts,
                                      expert_capacity=capacity, router_jitter_noise=0.0, dropout_rate=0.0,
                                      dense_act_fn=args.activation, router_dtype="float32")
    module = SwitchTransformersSparseMLP(config)
    return Row("transformers SwitchTransformersSparseMLP", f"{ANCHOR_CF}", module, module,
               f"expert_capacity={capacity}; per-expert nn.Linear modules, no bias")


def _nllb_row(args, k, num_experts, name) -> Row | None:
    if k != 2 or num_experts > args.nllb_max_experts:
        return None
    from transformers import NllbMoeConfig
    from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeSparseMLP

    capacity = math.ceil(ANCHOR_CF * 2 * args.tokens / num_experts)
    config = NllbMoeConfig(d_model=args.d_model, num_experts=num_experts, expert_capacity=capacity,
                           moe_token_dropout=0.0, activation_dropout=0.0, activation_function=args.activation,
                           router_dtype="float32")
    module = NllbMoeSparseMLP(config, ffn_dim=args.ffn)
    return Row("transformers NllbMoeSparseMLP", f"{ANCHOR_CF}", module, module,
               f"expert_capacity={capacity}; as shipped it runs expert_0 on (E-1)·T rows and expert_1 on T rows")


def _version(package: str) -> str:
    try:
        return importlib.import_module(package).__version__
    except ImportError:
        return "?"


# ------------------------------------------------------------------------------------------ measuring


def measure_point(args, k: int, num_experts: int) -> list[Row]:
    """Build every row, then warm-up and timed repetitions round-robin; then the memory pass."""
    rows = build_rows(args, k, num_experts)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(1, args.tokens, args.d_model, generator=gen).to(args.device, DTYPES[args.dtype])
    x.requires_grad_(True)
    grad_out = torch.randn(x.shape, generator=gen).to(args.device, DTYPES[args.dtype])
    for rep in range(args.warmup + args.repeats):
        for i in range(len(rows)):
            row = rows[(rep + i) % len(rows)]
            elapsed = _timed(lambda: row.step(x, grad_out), args.device)
            row.clear_grads(x)  # untimed: no row keeps its expert gradients while the others run (memory)
            if rep >= args.warmup:
                row.times_ms.append(elapsed * 1e3)
    if args.profile:
        _print_profile(args, k, num_experts, rows, x, grad_out)
    if not args.no_memory:
        for row in rows:
            row.clear_grads(x)  # free the previous step's gradients before the baseline
            row.peak_mib = _peak_mib(lambda: row.forward_backward(x, grad_out), args.device)
    for row in rows:  # free parameters and gradients before the next point
        row.module = None
    return rows


def _print_profile(args, k, num_experts, rows, x, grad_out) -> None:
    """Where one step of the paper-default row spends its time (kernels on CUDA, ops on CPU)."""
    from torch.profiler import ProfilerActivity, profile

    row = next((r for r in rows if r.name.startswith("hf_moe_mt") and r.capacity == "1.0"), None)
    if row is None:
        return
    cuda = args.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        _timed(lambda: row.step(x, grad_out), args.device)
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"\n--- profile k={k} E={num_experts} {row.name} cf {row.capacity}", file=sys.stderr)
    print(prof.key_averages().table(sort_by=sort_by, row_limit=14, max_name_column_width=60), file=sys.stderr)


def _timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _peak_mib(fn, device: str) -> float:
    """Peak live torch bytes during fn() above what was live before it (see the module docstring)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak / 2**20


# ------------------------------------------------------------------------------------------ reporting


def activated_flops(args, k: int) -> float:
    """Forward + backward GEMM FLOPs of k experts per token: 3 passes × 2 GEMMs × 2·T·d·ffn each."""
    return 3 * 2 * 2 * args.tokens * args.d_model * args.ffn * k


def summarize(args, k: int, num_experts: int, rows: list[Row]) -> list[dict]:
    """One record per row; the ratio divides by the faster dense FFN of this point."""
    dense_ms = min(statistics.median(row.times_ms) for row in rows if row.name.startswith("dense"))
    records = []
    for row in rows:
        median = statistics.median(row.times_ms)
        records.append({
            "top_k": k, "experts": num_experts, "implementation": row.name, "capacity_factor": row.capacity,
            "median_ms": median, "times_ms": row.times_ms, "ratio_to_dense": median / dense_ms,
            "tflops": activated_flops(args, k) / (median * 1e-3) / 1e12, "peak_mib": row.peak_mib, "note": row.note,
        })
    return records


def header_lines(args) -> list[str]:
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE", "unset")
    if args.device.startswith("cuda"):
        machine, backend = f"{torch.cuda.get_device_name()}, torch {torch.__version__}", "CPU backend not used (CUDA)"
    else:
        machine, backend = describe_machine(), "CPU backend: " + choose_gemm(args.gemm).describe()
    process = ("plain process: no THP or glibc settings" if args.plain_process else
               f"THP_MEM_ALLOC_ENABLE={thp}, glibc keeps freed memory: {MEMORY_SETTINGS.get('keep_freed_memory')}")
    return [
        f"MoE layer benchmark — forward+backward, median of {args.repeats} interleaved repetitions "
        f"({args.warmup} warm-up), {args.dtype}",
        f"machine: {machine}; {backend}",
        f"T={args.tokens} tokens, d={args.d_model}, expert ffn={args.ffn}, activation={args.activation} in every row; "
        f"{process} (all rows); capacity factors as listed (min_capacity 4 where it applies)",
        "ratio = median ms / median ms of the faster dense FFN of width k·ffn measured in the same round-robin; "
        "TFLOP/s = activated GEMM FLOPs (12·T·k·d·ffn) / median time; peak MiB = live torch bytes above the "
        "step's start (activations + gradients)",
    ]


def format_table(args, records: list[dict]) -> str:
    lines = header_lines(args) + [
        "",
        "| k | E | implementation | capacity factor | median ms | × dense | TFLOP/s | peak MiB | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        peak = "–" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
        lines.append(f"| {r['top_k']} | {r['experts']} | {r['implementation']} | {r['capacity_factor']} | "
                     f"{r['median_ms']:.2f} | {r['ratio_to_dense']:.2f}× | {r['tflops']:.3f} | {peak} | {r['note']} |")
    lines += _footer(args, records)
    return "\n".join(lines)


def _footer(args, records) -> list[str]:
    lines = [""]
    for name, reason in SKIPPED_ANCHORS.items():
        lines.append(f"row {name} not measured on this machine: {reason}")
    skipped = [e for e in args.experts if e > args.nllb_max_experts]
    if "nllb" in args.rows and 2 in args.top_k and skipped:
        lines.append(f"NllbMoeSparseMLP skipped at E={skipped} (> --nllb-max-experts {args.nllb_max_experts}): "
                     "transformers 5.24 dispatches it with one_hot(top_1_mask), so expert_0 processes (E-1)·T rows.")
    lines += _points_summary(records)
    for k in args.top_k:
        for cf in (f"{ANCHOR_CF}", "1.0", "dropless"):
            ours = {r["experts"]: r["median_ms"] for r in records if r["top_k"] == k and _is_ours(r, backend=True)
                    and r["capacity_factor"] == cf}
            if len(ours) > 1:
                lo, hi = min(ours), max(ours)
                lines.append(f"flatness, k={k}, hf_moe_mt cf {cf}: E={hi} / E={lo} = {ours[hi] / ours[lo]:.2f}×")
    if args.device.startswith("cuda"):
        paper = [r for r in records if r["implementation"].startswith("hf_moe_mt") and r["capacity_factor"] == "1.0"]
        if paper:
            share = [f"k={r['top_k']} E={r['experts']}: {100 / r['ratio_to_dense']:.0f}%" for r in paper]
            lines.append("hf_moe_mt cf 1.0 TFLOP/s as a share of the dense FFN's (same activated FLOPs): " + ", ".join(share))
    return lines


def _is_ours(record: dict, backend: bool) -> bool:
    return record["implementation"].startswith("hf_moe_mt") and ("no backend" in record["implementation"]) != backend


def _points_summary(records: list[dict]) -> list[str]:
    """Per (k, E): the fastest MoE row, and ours (cf 1.0, backend) against the floor."""
    lines = []
    for point in sorted({(r["top_k"], r["experts"]) for r in records}):
        here = [r for r in records if (r["top_k"], r["experts"]) == point]
        moe = [r for r in here if r["implementation"].startswith(MOE_ROWS)]
        ours = next((r for r in here if _is_ours(r, backend=True) and r["capacity_factor"] == "1.0"), None)
        floor = next((r for r in here if r["implementation"].startswith("expert GEMMs alone")), None)
        if not moe:
            continue
        fastest = min(moe, key=lambda r: r["median_ms"])
        line = f"k={point[0]} E={point[1]}: fastest MoE row {fastest['implementation']} cf {fastest['capacity_factor']}"
        if ours and floor:
            line += f"; ours cf 1.0 / floor = {ours['median_ms'] / floor['median_ms']:.2f}×"
        lines.append(line)
    return lines


def write_json(path: str, args, records: list[dict], plain: dict | None = None) -> None:
    """Write to a temporary name, then rename: a reader never sees a half-written file."""
    payload = {"header": header_lines(args), "args": {k: v for k, v in vars(args).items()}, "rows": records}
    if plain is not None:
        payload["plain_process"] = plain
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def run_plain_process(argv: list[str]) -> tuple[str, dict]:
    """The same benchmark in a child process without THP or glibc settings (as users' own scripts run);
    returns its table and its JSON payload."""
    env = {key: value for key, value in os.environ.items()
           if key != "THP_MEM_ALLOC_ENABLE" and key not in DISTRIBUTED_ENV_SET}
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "plain.json")
        rest = [a for i, a in enumerate(argv) if a != "--json" and (i == 0 or argv[i - 1] != "--json")]
        result = subprocess.run([sys.executable, os.path.abspath(__file__), *rest, "--plain-process", "--json", out],
                                stdout=subprocess.PIPE, text=True, env=env)
        if result.returncode != 0:
            raise SystemExit(f"error: the plain-process run failed (exit {result.returncode})")
        with open(out, encoding="utf-8") as f:
            return result.stdout, json.load(f)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    records = []
    for k in args.top_k:
        for num_experts in args.experts:
            rows = measure_point(args, k, num_experts)
            records += summarize(args, k, num_experts, rows)
            del rows  # every point builds new models: hand their memory back before the next, bigger ones
            gc.collect()
            release_freed_memory()
            print(f"  measured k={k} E={num_experts}", file=sys.stderr, flush=True)
    print(format_table(args, records), flush=True)
    plain = None
    if args.device == "cpu" and not (args.no_plain or args.plain_process):
        print("\nThe same rows in a plain process (no THP, no glibc settings):\n", flush=True)
        table, plain = run_plain_process(argv)
        print(table)
    if args.json:
        write_json(args.json, args, records, plain)


if __name__ == "__main__":
    main()
