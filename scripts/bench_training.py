"""Benchmark `hf-moe-mt train` steps on 2 processes: expert_parallel_size 1 (plain data parallel, every expert
replicated and all-reduced) vs 2 (experts split, tokens exchanged by all-to-all), and the all-to-all volume.

Both runs execute the training command's own code (`run_training` on configs/tiny.yaml, or --config) under
torchrun with the same corpus, tokenizer, seed and batches; evaluation, BLEU, checkpoints and plots are off,
and routing is dropless so that every (token, expert) pair travels (the volume check is then exact).
Reported per run: the median step time (steps after --warmup), tokens/s (real source + target tokens of the
global batch per second). Target (issue 5): step time with EP=2 ≤ 1.3 × EP=1. The workers run as
`hf-moe-mt train` does: process memory settings and the CPU backend on; the report names the CPU, its core
count and the backend's GEMM choice.

All-to-all volume, counted where it happens (every `all_to_all_single` of token rows during training, bytes
of the rows each rank passes in, including the rows that stay on the rank; the off-rank share is printed
too), per MoE layer per step and checked against 2·T·k·d·bytes (dispatch + combine of the layer's forward,
T = the rank's real tokens at that layer, k = top-k, d = d_model); the backward pass moves the same again.

  python scripts/bench_training.py --quick                 # tiny sizes on the test fixtures (seconds)
  python scripts/bench_training.py --steps 40 --json bench_training.json [section.key=value ...]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout needs no install

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_STEP_TIME_RATIO = 1.3
QUICK = ["model.config.d_model=32", "model.config.encoder_ffn_dim=64", "model.config.decoder_ffn_dim=64",
         "model.config.expert_ffn_dim=48", "model.config.num_experts=4", "training.per_device_train_batch_size=4"]
BENCH = ["training.eval_strategy=no", "training.save_strategy=no", "evaluation.bleu_steps=0", "evaluation.plots=false",
         "training.report_to=none", "training.logging_steps=1000000", "model.config.router_drop_tokens=false"]


# --------------------------------------------------------------------------- worker (one rank of one run)

class Probe:
    """Step times (a TrainerCallback), training tokens (a model pre-hook), and all-to-all rows per MoE layer
    (SparseMoE hooks + a wrapper around torch.distributed.all_to_all_single)."""

    def __init__(self):
        self.step_times, self.step_tokens, self.layer_calls, self.backward_bytes = [], [], [], 0
        self._tokens, self._layer, self._in_layer = 0, None, False

    def callback(self):
        from transformers import TrainerCallback

        probe = self

        class StepTimer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                probe._start, probe._tokens = time.perf_counter(), 0

            def on_step_end(self, args, state, control, **kwargs):
                probe.step_times.append(time.perf_counter() - probe._start)
                probe.step_tokens.append(probe._tokens)

        return StepTimer()

    def attach(self, model) -> None:
        from hf_moe_mt.moe import SparseMoE

        def count_tokens(module, args, kwargs):
            if module.training:
                self._tokens += int(kwargs["attention_mask"].sum()) + int((kwargs["labels"] != -100).sum())

        model.register_forward_pre_hook(count_tokens, with_kwargs=True)
        for name, module in model.named_modules():
            if isinstance(module, SparseMoE):
                module.register_forward_pre_hook(self._enter_layer(name), with_kwargs=True)
                module.register_forward_hook(self._leave_layer)

    def _enter_layer(self, name):
        def hook(module, args, kwargs):
            self._in_layer = True
            if not module.training:  # evaluation forwards are not counted
                self._layer = None
                return
            hidden, mask = args[0], kwargs.get("padding_mask")
            tokens = int(mask.sum()) if mask is not None else hidden.numel() // hidden.shape[-1]
            self._layer = {"layer": name, "pairs": tokens * module.top_k, "row_bytes": hidden.shape[-1] *
                           hidden.element_size(), "exchanges": [], "off_rank_bytes": 0}
            self.layer_calls.append(self._layer)
        return hook

    def _leave_layer(self, module, args, output):
        self._in_layer, self._layer = False, None  # all-to-alls outside a MoE layer's forward: its backward

    def wrap_all_to_all(self, ep_rank_of) -> None:
        import torch.distributed as dist

        original = dist.all_to_all_single

        def counted(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            if input_split_sizes is not None and input.dim() == 2:  # token rows (not the [E] count exchange)
                row_bytes = input.shape[1] * input.element_size()
                sent = input.shape[0] * row_bytes
                off_rank = sent - input_split_sizes[ep_rank_of(group)] * row_bytes
                if self._layer is not None:  # inside a training forward of a MoE layer: dispatch, then combine
                    self._layer["exchanges"].append(sent)
                    self._layer["off_rank_bytes"] += off_rank
                elif not self._in_layer:
                    self.backward_bytes += sent
            return original(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

        dist.all_to_all_single = counted


def run_worker(args) -> None:
    from hf_moe_mt.runtime import apply_memory_settings

    apply_memory_settings()  # as `hf-moe-mt train` does, before any tensor exists
    import torch.distributed as dist

    from hf_moe_mt.training import trainer as trainer_module
    from hf_moe_mt.training.commands import leave_process_group
    from hf_moe_mt.training.config import load_train_config
    from hf_moe_mt.training.run import run_training

    probe = Probe()
    probe.wrap_all_to_all(lambda group: dist.get_rank(group))
    setup = trainer_module.setup_expert_parallelism

    def setup_and_attach(model, training_args, expert_parallel_size):  # the model every rank trains
        groups = setup(model, training_args, expert_parallel_size)
        probe.attach(model)
        return groups

    trainer_module.setup_expert_parallelism = setup_and_attach
    config = load_train_config(args.config, args.overrides)
    run_training(config, callbacks=[probe.callback()])
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, {"step_times": probe.step_times, "step_tokens": probe.step_tokens,
                                     "layer_calls": probe.layer_calls, "backward_bytes": probe.backward_bytes})
    if dist.get_rank() == 0:
        with open(args.result, "w", encoding="utf-8") as handle:
            json.dump(results, handle)
    leave_process_group()
    # The result is written and the group left: skip interpreter teardown, where C++ threads of gloo and the
    # TCP store can still abort a finished worker (std::terminate) and fail a run that has nothing left to do.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# --------------------------------------------------------------------------- parent (prepare, launch, report)

def prepare_data(workdir: str, args) -> list[str]:
    """Corpus + tokenizer built once, shared by both runs: the test fixtures with --quick, else the config's
    (its data.corpus / data.tokenizer when given, built from data.corpus_build otherwise)."""
    from hf_moe_mt.data import CorpusConfig, build_corpus, load_corpus, save_tokenizer, train_tokenizer
    from hf_moe_mt.training.config import load_train_config

    data = load_train_config(args.config, args.overrides).data
    corpus_dir, tokenizer_dir = os.path.join(workdir, "corpus"), os.path.join(workdir, "tokenizer")
    if args.quick:
        fixtures = os.path.join(REPO, "tests", "data", "fixtures")
        corpus = build_corpus(CorpusConfig(output_dir=corpus_dir, source="jsonl", validation_fraction=0.15,
                                           test_fraction=0.15, inputs=[os.path.join(fixtures, "pairs.jsonl"),
                                                                       os.path.join(fixtures, "pairs_es.tsv")]))
        vocab_size = 700
    elif data.corpus:
        corpus, corpus_dir, vocab_size = load_corpus(data.corpus), data.corpus, data.tokenizer_vocab_size
    else:
        corpus = build_corpus(CorpusConfig(output_dir=corpus_dir, **data.corpus_build))
        vocab_size = data.tokenizer_vocab_size
    if data.tokenizer and not args.quick:
        tokenizer_dir = data.tokenizer
    else:
        save_tokenizer(train_tokenizer(corpus, vocab_size=vocab_size), tokenizer_dir)
    return [f"data.corpus={corpus_dir}", f"data.tokenizer={tokenizer_dir}"]


def launch(ep_size: int, args, overrides: list[str], workdir: str) -> list[dict]:
    result = os.path.join(workdir, f"ep{ep_size}.json")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--worker", "--result", result, "--config", args.config, *overrides,
               f"training.output_dir={workdir}/ep{ep_size}", f"model.config.expert_parallel_size={ep_size}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if completed.returncode != 0:
        raise SystemExit(f"EP={ep_size} run failed:\n{completed.stdout[-2000:]}\n{completed.stderr[-4000:]}")
    with open(result, encoding="utf-8") as handle:
        return json.load(handle)


def summarize(ranks: list[dict], warmup: int) -> dict:
    """Median step time (slowest rank per step), global tokens/s over the measured steps."""
    steps = range(warmup, len(ranks[0]["step_times"]))
    times = [max(rank["step_times"][s] for rank in ranks) for s in steps]
    tokens = [sum(rank["step_tokens"][s] for rank in ranks) for s in steps]
    return {"steps_measured": len(times), "median_step_s": statistics.median(times),
            "tokens_per_s": sum(tokens) / sum(times), "tokens_per_step": sum(tokens) / len(tokens)}


def all_to_all_volume(ranks: list[dict], num_steps: int) -> dict:
    """Bytes per MoE layer per step over the EP group (the ranks' forward calls line up one to one: every
    forward is a collective), checked call by call: each rank's dispatch sends its T·k rows, and dispatch +
    combine over the group move exactly 2·T·k·d·bytes (T = the group's real tokens at that layer); the
    backward moves the same total again."""
    per_layer, exact = {}, True
    for calls in zip(*(rank["layer_calls"] for rank in ranks)):
        expected = 2 * sum(call["pairs"] for call in calls) * calls[0]["row_bytes"]
        sent = sum(sum(call["exchanges"]) for call in calls)
        exact &= sent == expected and all(
            len(c["exchanges"]) == 2 and c["exchanges"][0] == c["pairs"] * c["row_bytes"] for c in calls)
        entry = per_layer.setdefault(calls[0]["layer"], {"sent_bytes": 0, "expected_bytes": 0, "off_rank_bytes": 0})
        entry["sent_bytes"] += sent
        entry["expected_bytes"] += expected
        entry["off_rank_bytes"] += sum(call["off_rank_bytes"] for call in calls)
    forward = sum(sum(c["exchanges"]) for rank in ranks for c in rank["layer_calls"])
    backward = sum(rank["backward_bytes"] for rank in ranks)
    per_step = {layer: {key: value / num_steps for key, value in entry.items()} for layer, entry in per_layer.items()}
    return {"per_layer_per_step": per_step,
            "forward_equals_2Tkd_bytes_every_call": bool(exact), "backward_equals_forward": backward == forward}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(REPO, "configs", "tiny.yaml"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    parser.add_argument("--quick", action="store_true", help="tiny model on the test fixtures, 8 steps")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    args = parser.parse_args()
    if args.worker:
        return run_worker(args)
    machine_and_backend(args.threads)  # a first run probes the GEMM libraries here, undisturbed by the workers
    steps = 8 if args.quick else args.steps
    warmup = min(args.warmup, steps - 1)
    with tempfile.TemporaryDirectory(prefix="bench_training_") as workdir:
        overrides = [*prepare_data(workdir, args), *(QUICK if args.quick else []), *BENCH,
                     f"training.max_steps={steps}", *args.overrides]
        runs = {ep: launch(ep, args, overrides, workdir) for ep in (1, 2)}
    report = {f"ep{ep}": summarize(ranks, warmup) for ep, ranks in runs.items()}
    report["step_time_ratio_ep2_over_ep1"] = report["ep2"]["median_step_s"] / report["ep1"]["median_step_s"]
    report["target_ratio"] = TARGET_STEP_TIME_RATIO
    report["all_to_all"] = all_to_all_volume(runs[2], steps)
    report.update(machine_and_backend(args.threads))
    print_report(report)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=1)


def machine_and_backend(threads: int) -> dict:
    """The CPU and the CPU backend's choice at the workers' thread count (the same cached probe they read)."""
    import torch

    from hf_moe_mt.backends import choose_gemm, describe_machine

    torch.set_num_threads(threads)
    return {"machine": describe_machine(), "cpu_backend": choose_gemm().describe()}


def print_report(report: dict) -> None:
    print(f"machine: {report['machine']} per process, 2 processes; CPU backend: {report['cpu_backend']}")
    print(f"{'run':<6}{'median step (ms)':>18}{'tokens/s':>12}{'tokens/step':>13}")
    for name in ("ep1", "ep2"):
        r = report[name]
        print(f"{name:<6}{1000 * r['median_step_s']:>18.1f}{r['tokens_per_s']:>12.0f}{r['tokens_per_step']:>13.0f}")
    ratio = report["step_time_ratio_ep2_over_ep1"]
    verdict = "meets" if ratio <= report["target_ratio"] else "MISSES"
    print(f"step time EP=2 / EP=1 = {ratio:.2f} ({verdict} the ≤ {report['target_ratio']} target)")
    volume = report["all_to_all"]
    print("all-to-all per MoE layer per step, EP group of 2 ranks (forward: dispatch + combine):")
    for layer, entry in volume["per_layer_per_step"].items():
        sent, expected, off_rank = (entry[key] / 1024 for key in ("sent_bytes", "expected_bytes", "off_rank_bytes"))
        print(f"  {layer:<28} sent {sent:9.1f} KiB   2·T·k·d·bytes {expected:9.1f} KiB   "
              f"off-rank {off_rank:9.1f} KiB")
    print(f"every forward call moved exactly 2·T·k·d·bytes: {volume['forward_equals_2Tkd_bytes_every_call']}; "
          f"backward moved the same total: {volume['backward_equals_forward']}")


if __name__ == "__main__":
    main()
