"""Benchmark the whole MoE-MT model against transformers' NLLB-MoE configured to the same sizes.

Two numbers per model, both measured in this one process, interleaved round by round (the model that goes
first alternates), the table reporting the median over rounds:
- training: (source + target) tokens per second of a full step — forward with labels (cross-entropy + router
  losses; NLLB-MoE computes its aux loss only with `output_router_logits=True`, so it gets it), backward,
  AdamW step, zero_grad;
- translation: sentences per second of beam-4 `generate`, forced to the same number of new tokens in both
  models (`min_new_tokens == max_new_tokens`), so a random model stopping early cannot win.
Beam-4 translation of ours is also timed, in the same rounds, with a static self-attention cache, without and
with `torch.compile` (fullgraph, static shapes, `--compile-backend`); transformers 5.24 compiles `generate` by
itself only for greedy/sampled decoding, so the compiled copy gets its forward compiled directly.
On CPU ours runs with the CPU backend our commands apply (`hf_moe_mt.backends.enable_fast_cpu`: GEMM library
per use from a measured probe, experts on worker threads), NLLB-MoE as shipped. Three more rows per metric and
round separate the backend from the model: ours without the backend (the model's own kernels, torch's default
GEMMs: what a user's script gets without the call), ours with the backend but plain weights in translation (what
the backend's packed inference weights buy) and NLLB-MoE with the same backend applied (its `nn.Linear`s,
experts included, on the library the probe chose for Linear layers). Every timed translation follows the same
translation untimed: after a training step the backend re-packs its inference weights once (timed on its own,
printed under the table), which is a per-model cost, not translation speed.
Both models also run in bf16, in the same rounds (`--no-bf16` skips it): training under bf16 autocast with fp32
weights, as `Seq2SeqTrainer(bf16=True)` and our `training.bf16` run it, and translation with bf16 weights, loaded
as `hf-moe-mt translate --dtype bfloat16` loads ours (`from_pretrained(dtype=torch.bfloat16)`: each model's
fp32-kept modules stay fp32, ours' routers). Like for like with each other, not with the fp32 rows: bf16 changes
the numerics. On CPU ours trains in bf16 with the attention our train command picks under bf16 autocast (the
bf16 attention probe of `hf_moe_mt.backends.precision`: eager where SDPA's CPU kernel is slower), NLLB-MoE as
shipped (eager: transformers' NLLB-MoE does not support SDPA).

Same sizes on both sides: d_model, layers, heads, vocabulary, one FFN width for dense layers and experts, MoE
in every `--sparse-step`-th layer, `--experts` experts, top-2 (NLLB-MoE's only mode), dropout 0.1, no
layerdrop, no expert token dropout; NLLB-MoE's per-expert capacity is set to ours in training
(ceil(cf·k·T/E)), and both translate without dropping (NLLB: eval token fraction 1.0; ours: dropless).
Targets: training ≥ 3× NLLB-MoE, translation ≥ 2×.

  python scripts/bench_model.py                      # d_model 512, 6+6 layers, 16 experts, top-2 (minutes)
  python scripts/bench_model.py --quick              # tiny sizes: checks that everything runs (seconds)
  python scripts/bench_model.py --experts 32 --json bench_model.json
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout needs no install

from hf_moe_mt.runtime import apply_memory_settings  # noqa: E402

# Before any tensor exists (PyTorch reads THP_MEM_ALLOC_ENABLE at its first allocation); both models alike.
MEMORY_SETTINGS = apply_memory_settings()

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402
from transformers import NllbMoeConfig, NllbMoeForConditionalGeneration  # noqa: E402

import hf_moe_mt  # noqa: E402
from hf_moe_mt.backends import (  # noqa: E402
    choose_gemm, describe_machine, disable_fast_cpu, enable_fast_cpu, forget_packed_weights,
)
from hf_moe_mt.backends.precision import cpu_bf16_attention_choice  # noqa: E402
from hf_moe_mt.moe import GroupedExperts  # noqa: E402

TARGETS = {"train_tokens_per_s": 3.0, "translate_sentences_per_s": 2.0}
QUICK = dict(d_model=64, layers=2, heads=4, ffn_dim=128, experts=4, vocab_size=1000, batch_size=4, seq_len=12,
             train_steps=2, warmup_steps=1, rounds=2, translate_batch_size=2, new_tokens=4)


@dataclass
class Contender:
    """One model, its optimizer and its measurements; `train_step()` / `translate()` run one timed unit."""

    name: str
    model: torch.nn.Module
    extra_forward_kwargs: dict
    generate_kwargs: dict = field(default_factory=dict)
    bf16_attention: str | None = None  # the attention implementation it trains with under bf16 autocast
    optimizer: torch.optim.Optimizer = field(init=False)
    results: dict = field(default_factory=lambda: {"train_tokens_per_s": [], "translate_sentences_per_s": []})

    def __post_init__(self):
        # fused=True: what the Trainer uses by default (`adamw_torch_fused`); one pass over each parameter
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)

    def train_step(self, batch: dict, gemm: str = "default", bf16: bool = False) -> None:
        """One step; under `bf16` with the model's attention already set by `attention(..., bf16_attention)`."""
        self.model.train()
        with gemm_backend(self.model, gemm):
            with torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = self.model(**batch, **self.extra_forward_kwargs).loss
            loss.backward()  # outside autocast, as the Trainer runs it
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def translate(self, inputs: dict, beams: int, new_tokens: int, gemm: str = "default") -> None:
        self.model.eval()
        with torch.no_grad(), gemm_backend(self.model, gemm):
            return self.model.generate(**inputs, num_beams=beams, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                       **self.generate_kwargs)


@contextmanager
def gemm_backend(model: torch.nn.Module, gemm: str):
    """gemm: "default" (each model as the benchmark runs it: ours with the CPU backend on CPU, NLLB-MoE as
    shipped), "standard" (the backend taken off ours for the block), "unpacked" (ours with the backend, but its
    inference GEMMs on plain weights: what packed weights buy), "backend" (applied to NLLB-MoE's nn.Linears
    for the block)."""
    if gemm == "standard":
        disable_fast_cpu(model)
    elif gemm == "unpacked":
        enable_fast_cpu(model, packed=False)
    elif gemm == "backend":
        enable_fast_cpu(model)
    try:
        yield
    finally:
        if gemm in ("standard", "unpacked"):
            enable_fast_cpu(model)
        elif gemm == "backend":
            disable_fast_cpu(model)


@contextmanager
def attention(model: torch.nn.Module, implementation: str | None):
    """The model's attention switched to `implementation` for the block (None: unchanged)."""
    before = model.config._attn_implementation
    if implementation is not None and implementation != before:
        model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        if model.config._attn_implementation != before:
            model.set_attn_implementation(before)


# rows that separate the CPU backend from the model: (row name, contender, gemm)
GEMM_VARIANTS = (("ours, no backend", "ours", "standard"),
                 ("ours, backend, unpacked", "ours", "unpacked"),
                 ("NLLB-MoE, with the backend", "nllb_moe", "backend"))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--quick", action="store_true", help=f"tiny default sizes to check that the script runs: {QUICK}")
    add("--d-model", type=int, default=512)
    add("--layers", type=int, default=6, help="encoder layers = decoder layers")
    add("--heads", type=int, default=8)
    add("--ffn-dim", type=int, default=2048, help="dense FFN and expert width (NLLB-MoE uses one width)")
    add("--experts", type=int, default=16)
    add("--top-k", type=int, default=2, help="ours; NLLB-MoE is always top-2")
    add("--sparse-step", type=int, default=2, help="MoE in every n-th layer of both stacks")
    add("--capacity-factor", type=float, default=1.0, help="training capacity factor (both models)")
    add("--vocab-size", type=int, default=32000)
    add("--batch-size", type=int, default=32, help="training sentences per step")
    add("--seq-len", type=int, default=32, help="source = target length (tokens)")
    add("--train-steps", type=int, default=5, help="timed training steps per round")
    add("--warmup-steps", type=int, default=2)
    add("--rounds", type=int, default=3)
    add("--translate-batch-size", type=int, default=16)
    add("--new-tokens", type=int, default=32)
    add("--beams", type=int, default=4)
    add("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    add("--device", default="cpu")
    add("--no-gemm-variants", action="store_true", help="skip the two CPU rows per metric that swap GEMM backends")
    add("--compile-backend", default="inductor", help="torch.compile backend of the compiled translation row")
    add("--no-compile", action="store_true", help="skip the static-cache and compiled beam translation rows")
    add("--no-bf16", action="store_true", help="skip the bf16 rows (autocast training, bf16-weight translation)")
    add("--seed", type=int, default=0)
    add("--json", default=None, help="also write the results to this JSON file")
    if parser.parse_args(argv).quick:  # tiny defaults; flags given explicitly still win
        parser.set_defaults(**QUICK)
    return parser.parse_args(argv)


def build_models(args) -> list[Contender]:
    """Ours and NLLB-MoE with the same sizes, routing budget and regularisation."""
    tokens = args.batch_size * args.seq_len  # per stack and step: source and target have the same length
    capacity = math.ceil(args.capacity_factor * 2 * tokens / args.experts)
    common = dict(
        vocab_size=args.vocab_size, d_model=args.d_model, encoder_layers=args.layers, decoder_layers=args.layers,
        encoder_attention_heads=args.heads, decoder_attention_heads=args.heads, encoder_ffn_dim=args.ffn_dim,
        decoder_ffn_dim=args.ffn_dim, num_experts=args.experts, encoder_sparse_step=args.sparse_step,
        decoder_sparse_step=args.sparse_step, max_position_embeddings=max(256, 2 * args.seq_len + args.new_tokens),
        dropout=0.1, attention_dropout=0.0, activation_dropout=0.0, router_aux_loss_coef=0.01,
        router_z_loss_coef=0.001,
    )
    torch.manual_seed(args.seed)
    ours = hf_moe_mt.MoEMTForConditionalGeneration(hf_moe_mt.MoEMTConfig(
        **common, expert_ffn_dim=args.ffn_dim, num_experts_per_tok=args.top_k, capacity_factor=args.capacity_factor,
    ))
    nllb = NllbMoeForConditionalGeneration(NllbMoeConfig(
        **common, expert_capacity=capacity, encoder_layerdrop=0.0, decoder_layerdrop=0.0, moe_token_dropout=0.0,
        moe_eval_capacity_token_fraction=1.0,
    ))
    bf16_attention = None
    if args.device == "cpu":
        enable_fast_cpu(ours)
        bf16_attention = None if args.no_bf16 else cpu_bf16_attention_choice().implementation
    return [Contender("ours", ours.to(args.device), {}, bf16_attention=bf16_attention),
            Contender("nllb_moe", nllb.to(args.device), {"output_router_logits": True})]


def make_inputs(args) -> tuple[dict, dict]:
    generator = torch.Generator().manual_seed(args.seed)
    ids = lambda rows: torch.randint(3, args.vocab_size, (rows, args.seq_len), generator=generator)  # noqa: E731
    train = {"input_ids": ids(args.batch_size), "labels": ids(args.batch_size)}
    train["attention_mask"] = torch.ones_like(train["input_ids"])
    translate = {"input_ids": ids(args.translate_batch_size)}
    translate["attention_mask"] = torch.ones_like(translate["input_ids"])
    move = lambda batch: {k: v.to(args.device) for k, v in batch.items()}  # noqa: E731
    return move(train), move(translate)


def expert_rows_per_token(contender: Contender, batch: dict) -> float:
    """Rows the expert FFNs process per token and MoE layer in one eval forward (top-k routing: ≤ k).

    Measured, not assumed: transformers 5.24's NLLB-MoE hands its [T, E] 0/1 dispatch mask to the experts as
    if it held expert indices, so expert_0 runs every unchosen (token, expert) pair and expert_1 every chosen
    one — E rows per token on two experts. The table prints this so the speed ratio can be read correctly.
    """
    rows, handles, model = [], [], contender.model
    for name, module in model.named_modules():  # ours: mlp.experts (all experts); NLLB: experts.expert_<e>
        if isinstance(module, GroupedExperts) or re.search(r"\.experts\.expert_\d+$", name):
            handles.append(module.register_forward_hook(lambda m, inputs, out: rows.append(inputs[0].shape[0])))
    config = model.config
    num_moe_layers = sum((i + 1) % config.encoder_sparse_step == 0 for i in range(config.encoder_layers)) + sum(
        (i + 1) % config.decoder_sparse_step == 0 for i in range(config.decoder_layers))
    model.eval()
    with torch.no_grad():
        model(**batch, **contender.extra_forward_kwargs)
    for handle in handles:
        handle.remove()
    return sum(rows) / (num_moe_layers * batch["input_ids"].numel())


# ours translating with a static self-attention cache, eagerly and with its forward compiled
COMPILE_ROWS = ("ours, static cache", "ours, static cache + torch.compile")


def static_cache_translators(ours: Contender, backend: str) -> list[Contender]:
    """Copies of ours that decode into a static cache, the second with its forward compiled (fullgraph, no dynamic
    shapes: a graph break or recompilation in a decoding step raises instead of slowing down unseen)."""
    static = Contender(COMPILE_ROWS[0], copy.deepcopy(ours.model), {}, {"cache_implementation": "static"})
    compiled_model = copy.deepcopy(ours.model)
    compiled_model.forward = torch.compile(compiled_model.forward, fullgraph=True, dynamic=False, backend=backend)
    return [static, Contender(COMPILE_ROWS[1], compiled_model, {}, {"cache_implementation": "static"})]


def warm_up_static_cache_translators(ours: Contender, translators: list[Contender], inputs: dict, args) -> dict:
    """One translation each at the measured sizes (a static cache is sized by them, so a compiled decoding step
    compiles here, not in round 1); returns its seconds and whether every row chose the same tokens as ours."""
    expected = ours.translate(inputs, args.beams, args.new_tokens)
    report = {}
    for contender in translators:
        start = time.perf_counter()
        tokens = contender.translate(inputs, args.beams, args.new_tokens)
        report[contender.name] = {"first_call_s": time.perf_counter() - start,
                                  "same_tokens_as_dynamic_cache": bool(torch.equal(tokens, expected))}
    return report


# the bf16 rows' names: training under bf16 autocast, translation with bf16 weights
BF16_ROWS = {"ours": "ours, bf16", "nllb_moe": "NLLB-MoE, bf16"}


def bf16_translators(contenders: list[Contender], args) -> dict[str, Contender]:
    """A bf16 copy of each model, saved and loaded with `from_pretrained(dtype=torch.bfloat16)` as
    `hf-moe-mt translate --dtype bfloat16` loads ours (each class keeps its fp32 modules, ours' routers, in fp32);
    ours gets the CPU backend as the translate command applies it, NLLB-MoE stays as shipped."""
    copies = {}
    for contender in contenders:
        with tempfile.TemporaryDirectory() as folder:
            contender.model.save_pretrained(folder)
            model = type(contender.model).from_pretrained(folder, dtype=torch.bfloat16).to(args.device)
        if contender.name == "ours" and args.device == "cpu":
            enable_fast_cpu(model)
        copies[contender.name] = Contender(BF16_ROWS[contender.name], model, contender.extra_forward_kwargs,
                                           contender.generate_kwargs)
    return copies


def _timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def translation_seconds(contender: Contender, inputs: dict, args, gemm: str = "default") -> float:
    """One timed beam translation, after the same translation untimed: the first inference after a training
    step re-packs the CPU backend's inference weights, a once-per-model cost (`repack_seconds`), not translation
    speed (a shorter warm-up would leave the experts it did not reach to be packed inside the timed call).
    Every row gets the same warm-up."""
    contender.translate(inputs, args.beams, args.new_tokens, gemm)
    return _timed(lambda: contender.translate(inputs, args.beams, args.new_tokens, gemm), args.device)


def repack_seconds(contender: Contender, inputs: dict, args) -> float:
    """What packing costs: a translation with no packed copies kept, minus the same translation right after."""
    forget_packed_weights()
    cold = _timed(lambda: contender.translate(inputs, args.beams, args.new_tokens), args.device)
    warm = _timed(lambda: contender.translate(inputs, args.beams, args.new_tokens), args.device)
    return cold - warm


def _medians(results: dict[str, list[float]]) -> dict[str, float]:
    """{metric: median over rounds} of {metric: per-round values}."""
    return {metric: statistics.median(values) for metric, values in results.items()}


def run(args) -> dict:
    """1. build and warm up  2. rounds: each model trains, then translates (first model alternates)  3. medians."""
    # 1.
    if args.threads:
        torch.set_num_threads(args.threads)
    contenders = build_models(args)
    train_batch, translate_inputs = make_inputs(args)
    train_tokens = 2 * args.batch_size * args.seq_len
    by_name = {c.name: c for c in contenders}
    variants = [] if args.no_gemm_variants or args.device != "cpu" else GEMM_VARIANTS
    variant_results = {row: {metric: [] for metric in TARGETS} for row, _, _ in variants}
    for contender in contenders:
        for _ in range(args.warmup_steps):
            contender.train_step(train_batch)
        contender.translate(translate_inputs, args.beams, 2)
    choice = choose_gemm() if args.device == "cpu" else None
    packs = choice is not None and (choice.linear_packed or choice.experts_packed)
    repack = repack_seconds(by_name["ours"], translate_inputs, args) if packs else 0.0  # 0: nothing is packed
    compiled_rows = [] if args.no_compile else static_cache_translators(by_name["ours"], args.compile_backend)
    first_calls = warm_up_static_cache_translators(by_name["ours"], compiled_rows, translate_inputs, args)
    bf16_copies = {} if args.no_bf16 else bf16_translators(contenders, args)
    for contender in contenders if bf16_copies else ():
        with attention(contender.model, contender.bf16_attention):
            contender.train_step(train_batch, bf16=True)
        bf16_copies[contender.name].translate(translate_inputs, args.beams, 2)
    # 2.
    for round_index in range(args.rounds):
        order = contenders if round_index % 2 == 0 else contenders[::-1]
        for contender in order:
            seconds = _timed(lambda: [contender.train_step(train_batch) for _ in range(args.train_steps)], args.device)
            contender.results["train_tokens_per_s"].append(args.train_steps * train_tokens / seconds)
        for contender in order:
            seconds = translation_seconds(contender, translate_inputs, args)
            contender.results["translate_sentences_per_s"].append(args.translate_batch_size / seconds)
        for row, name, gemm in variants:
            contender = by_name[name]
            seconds = _timed(lambda: [contender.train_step(train_batch, gemm) for _ in range(args.train_steps)],
                             args.device)
            variant_results[row]["train_tokens_per_s"].append(args.train_steps * train_tokens / seconds)
            seconds = translation_seconds(contender, translate_inputs, args, gemm)
            variant_results[row]["translate_sentences_per_s"].append(args.translate_batch_size / seconds)
        for contender in compiled_rows:
            seconds = translation_seconds(contender, translate_inputs, args)
            contender.results["translate_sentences_per_s"].append(args.translate_batch_size / seconds)
        for contender in order if bf16_copies else ():
            with attention(contender.model, contender.bf16_attention):  # switched once, outside the timing
                seconds = _timed(lambda: [contender.train_step(train_batch, bf16=True)
                                          for _ in range(args.train_steps)], args.device)
            bf16 = bf16_copies[contender.name]  # its row: the model's autocast training, the copy's translation
            bf16.results["train_tokens_per_s"].append(args.train_steps * train_tokens / seconds)
            seconds = translation_seconds(bf16, translate_inputs, args)
            bf16.results["translate_sentences_per_s"].append(args.translate_batch_size / seconds)
        print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)
    # 3.
    medians = {c.name: _medians(c.results) for c in contenders}
    ratios = {metric: medians["ours"][metric] / medians["nllb_moe"][metric] for metric in TARGETS}
    parameters = {c.name: sum(p.numel() for p in c.model.parameters()) for c in contenders}
    rows = {c.name: expert_rows_per_token(c, train_batch) for c in contenders}
    compiled = {c.name: {"per_round": c.results["translate_sentences_per_s"],
                         "median": statistics.median(c.results["translate_sentences_per_s"]), **first_calls[c.name]}
                for c in compiled_rows}
    return {"args": vars(args), "parameters": parameters, "repack_seconds": repack, "expert_rows_per_token": rows,
            "static_cache": compiled,
            "bf16": {name: {"per_round": c.results, "median": _medians(c.results)} for name, c in bf16_copies.items()},
            "per_round": {c.name: c.results for c in contenders},
            "median": medians, "ratio_ours_over_nllb": ratios,
            "gemm_variants": {row: {"per_round": values, "median": _medians(values)}
                              for row, values in variant_results.items()}, "targets": TARGETS,
            "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
            "machine": describe_machine(),
            "cpu_backend": choose_gemm().describe() if args.device == "cpu" else "not used (CUDA)",
            "bf16_attention": cpu_bf16_attention_choice().describe() if bf16_copies and args.device == "cpu" else None,
            "memory_settings": MEMORY_SETTINGS}


def format_table(report: dict) -> str:
    args, median, ratio = report["args"], report["median"], report["ratio_ours_over_nllb"]
    lines = [
        f"d_model {args['d_model']}, {args['layers']}+{args['layers']} layers, {args['experts']} experts, "
        f"top-{args['top_k']} (NLLB-MoE top-2), MoE every {args['sparse_step']} layers, ffn {args['ffn_dim']}, "
        f"vocab {args['vocab_size']}; train batch {args['batch_size']}x{args['seq_len']}+{args['seq_len']}, "
        f"translate {args['translate_batch_size']} sentences, beam {args['beams']}, {args['new_tokens']} new tokens; "
        f"{report['torch_threads']} threads, median of {args['rounds']} rounds; memory settings (both models): "
        f"{report['memory_settings']}",
        f"machine: {report['machine']}; ours: CPU backend {report['cpu_backend']}",
        f"parameters: ours {report['parameters']['ours'] / 1e6:.1f} M, NLLB-MoE "
        f"{report['parameters']['nllb_moe'] / 1e6:.1f} M",
        "",
        f"| {'metric':<27} | {'ours':>10} | {'NLLB-MoE':>10} | {'ratio':>6} | {'target':>6} |",
        f"|{'-' * 29}|{'-' * 12}|{'-' * 12}|{'-' * 8}|{'-' * 8}|",
    ]
    for metric, target in TARGETS.items():
        lines.append(f"| {metric:<27} | {median['ours'][metric]:>10.1f} | {median['nllb_moe'][metric]:>10.1f} | "
                     f"{ratio[metric]:>5.2f}x | {target:>5.1f}x |")
    variants = report["gemm_variants"]
    if variants:
        lines += ["", "with and without the CPU backend (same rounds; ours runs with it, NLLB-MoE as shipped without):",
                  f"| {'row':<27} | {'train tok/s':>11} | {'÷ NLLB':>6} | {'translate sent/s':>16} | {'÷ NLLB':>6} |",
                  f"|{'-' * 29}|{'-' * 13}|{'-' * 8}|{'-' * 18}|{'-' * 8}|"]
        for row, values in [("ours (with the backend)", median["ours"]), ("NLLB-MoE (as shipped)", median["nllb_moe"]),
                             *((row, v["median"]) for row, v in variants.items())]:
            train, translate = values["train_tokens_per_s"], values["translate_sentences_per_s"]
            lines.append(f"| {row:<27} | {train:>11.1f} | {train / median['nllb_moe']['train_tokens_per_s']:>5.2f}x | "
                         f"{translate:>16.1f} | "
                         f"{translate / median['nllb_moe']['translate_sentences_per_s']:>5.2f}x |")
    if report["repack_seconds"]:
        lines.append(f"translations are timed after the same translation untimed (all rows): the first inference "
                     f"after a training step re-packs ours' inference weights, {report['repack_seconds']:.2f} s here")
    lines += format_static_cache_rows(report)
    lines += format_bf16_rows(report)
    rows = report["expert_rows_per_token"]
    lines.append(f"expert FFN rows per token and MoE layer (eval forward): ours {rows['ours']:.2f}, "
                 f"NLLB-MoE {rows['nllb_moe']:.2f}")
    if rows["nllb_moe"] > 2.01:
        lines.append("  note: NLLB-MoE (transformers 5.24) computes more than its top-2 expert rows: it passes its "
                     "0/1 dispatch mask to the experts as expert indices (expert_0 runs every unchosen pair)")
    return "\n".join(lines)


def format_static_cache_rows(report: dict) -> list[str]:
    rows = report["static_cache"]
    if not rows:
        return []
    args, dynamic = report["args"], report["median"]["ours"]["translate_sentences_per_s"]
    lines = ["", f"ours, beam-{args['beams']} translation by cache and compilation (same rounds; torch.compile "
                 f"backend {args['compile_backend']}, fullgraph):",
             f"| {'row':<36} | {'sent/s':>8} | {'÷ dynamic':>9} | {'first call s':>12} | {'same tokens':>11} |",
             f"|{'-' * 38}|{'-' * 10}|{'-' * 11}|{'-' * 14}|{'-' * 13}|",
             f"| {'ours, dynamic cache (row above)':<36} | {dynamic:>8.2f} | {1:>8.2f}x | {'':>12} | {'':>11} |"]
    for name, row in rows.items():
        lines.append(f"| {name:<36} | {row['median']:>8.2f} | {row['median'] / dynamic:>8.2f}x | "
                     f"{row['first_call_s']:>12.1f} | {str(row['same_tokens_as_dynamic_cache']):>11} |")
    return lines


def format_bf16_rows(report: dict) -> list[str]:
    rows = report["bf16"]
    if not rows:
        return []
    nllb_fp32, nllb_bf16 = report["median"]["nllb_moe"], rows["nllb_moe"]["median"]
    lines = ["", "bf16 (same rounds): training under bf16 autocast (fp32 weights), beam translation with bf16 weights "
                 "(from_pretrained(dtype=bfloat16), fp32-kept modules stay fp32):",
             f"| {'row':<16} | {'train tok/s':>11} | {'÷ NLLB fp32':>11} | {'÷ NLLB bf16':>11} | "
             f"{'translate sent/s':>16} | {'÷ NLLB fp32':>11} | {'÷ NLLB bf16':>11} |",
             f"|{'-' * 18}|{'-' * 13}|{'-' * 13}|{'-' * 13}|{'-' * 18}|{'-' * 13}|{'-' * 13}|"]
    if report.get("bf16_attention"):
        lines[1:1] = [f"ours trains with {report['bf16_attention']}; NLLB-MoE with eager attention (as shipped)", ""]
    for name, row_name in BF16_ROWS.items():
        train, translate = (rows[name]["median"][metric] for metric in TARGETS)
        lines.append(f"| {row_name:<16} | {train:>11.1f} | {train / nllb_fp32['train_tokens_per_s']:>10.2f}x | "
                     f"{train / nllb_bf16['train_tokens_per_s']:>10.2f}x | {translate:>16.2f} | "
                     f"{translate / nllb_fp32['translate_sentences_per_s']:>10.2f}x | "
                     f"{translate / nllb_bf16['translate_sentences_per_s']:>10.2f}x |")
    return lines


def main(argv=None) -> dict:
    args = parse_args(argv)
    report = run(args)
    print(format_table(report))
    if args.json:
        tmp = f"{args.json}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, args.json)  # never a half-written file
    return report


if __name__ == "__main__":
    main()
