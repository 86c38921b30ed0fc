"""Train transformers' `M2M100ForConditionalGeneration` and our model — dense, and with its MoE layers — of the
same shape, on the same batches in the same order, with the same optimizer, schedule, label-smoothed loss and
dropout, and compare their dev cross-entropy. A reference nobody here wrote: when our dense model's dev loss is
more than --tolerance above M2M100's at any evaluation point, the recipe or the model is broken, and the script
says so and exits 1.

Everything comes from a training config (`hf-moe-mt train` YAML): corpus, tokenizer, multitask examples, token
batches (`data.max_tokens` or `data.maxi_batch`), model shape (`model.config`), and AdamW / schedule / warmup / clipping
(`training`). The three models train interleaved, one batch each in turn, so a stopped run still compares them
on every point it reached. Writes `reference_curves.json` and `reference_curves.png` under --output.

  python scripts/compare_reference_training.py --config configs/bible-small.yaml --steps 1500 --eval-every 250
  python scripts/compare_reference_training.py --config configs/tiny.yaml --steps 20 --eval-every 10 \\
      data.corpus=... data.tokenizer=...          # any `section.key=value` override of the config
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout needs no install

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

MODELS = ("m2m100", "ours_dense", "ours_moe")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training YAML (e.g. configs/bible-small.yaml)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: training.max_steps); "
                        "the learning-rate schedule spans these steps")
    parser.add_argument("--eval-every", type=int, default=250, help="dev loss every N steps (and at 0 and the end)")
    parser.add_argument("--tolerance", type=float, default=0.02,
                        help="largest allowed relative excess of ours_dense's dev loss over M2M100's")
    parser.add_argument("--output", default="results/reference", help="directory for the JSON and the PNG")
    parser.add_argument("--work-dir", default=None, help="where the corpus/tokenizer are built when the config "
                        "builds them (default: a temporary directory)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- models

def m2m100_like(config):
    """transformers' M2M100 with our config's shape, dropout and special tokens (pre-LN, sinusoidal positions,
    scaled embeddings: the layout our model copies)."""
    from transformers import M2M100Config, M2M100ForConditionalGeneration

    reference = M2M100Config(
        vocab_size=config.vocab_size, d_model=config.d_model, encoder_layers=config.encoder_layers,
        decoder_layers=config.decoder_layers, encoder_attention_heads=config.encoder_attention_heads,
        decoder_attention_heads=config.decoder_attention_heads, encoder_ffn_dim=config.encoder_ffn_dim,
        decoder_ffn_dim=config.decoder_ffn_dim, max_position_embeddings=config.max_position_embeddings,
        activation_function=config.activation_function, dropout=config.dropout,
        attention_dropout=config.attention_dropout, activation_dropout=config.activation_dropout,
        encoder_layerdrop=0.0, decoder_layerdrop=0.0, scale_embedding=config.scale_embedding,
        init_std=config.init_std, pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id, decoder_start_token_id=config.decoder_start_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    return M2M100ForConditionalGeneration(reference)


def build_models(train_config, tokenizer, seed: int) -> dict:
    """The three models, each initialised from the same seed by its own code."""
    from transformers import set_seed

    from hf_moe_mt import MoEMTConfig, MoEMTForConditionalGeneration
    from hf_moe_mt.training.run import build_model

    moe = build_model(train_config, tokenizer, seed)
    if not any(moe.config.sparse_layers(stack) for stack in ("encoder", "decoder")):
        raise ValueError("the config has no MoE layers (encoder_sparse_step/decoder_sparse_step are 0); "
                         "compare a MoE config, the dense model is derived from it")
    dense_config = MoEMTConfig(**{**moe.config.to_dict(), "encoder_sparse_step": 0, "decoder_sparse_step": 0})
    set_seed(seed)
    dense = MoEMTForConditionalGeneration(dense_config)
    set_seed(seed)
    return {"m2m100": m2m100_like(moe.config), "ours_dense": dense, "ours_moe": moe}


# --------------------------------------------------------------------------- training pieces

def optimizer_and_schedule(model, args, steps: int):
    """AdamW as the Trainer builds it (no weight decay on biases and LayerNorms) + the configured schedule."""
    from transformers import get_scheduler

    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        (no_decay if parameter.ndim < 2 or "layer_norm" in name else decay).append(parameter)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    schedule = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(steps),
                             num_training_steps=steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    return optimizer, schedule


def training_loss(name: str, model, batch: dict, label_smoothing: float) -> torch.Tensor:
    """Ours return CE(label smoothing) + router losses themselves; M2M100's CE is computed with the same function."""
    from hf_moe_mt.modeling_moe_mt import translation_loss

    if name == "m2m100":
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=batch["decoder_input_ids"]).logits
        return translation_loss(logits, batch["labels"], label_smoothing)
    return model(**batch).loss


@torch.no_grad()
def dev_loss(model, batches: list[dict]) -> float:
    """Token-weighted cross-entropy (no smoothing) over the dev batches, in eval mode."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=batch["decoder_input_ids"]).logits
        labels = batch["labels"]
        total += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                                   reduction="sum").item()
        tokens += int((labels != -100).sum())
    model.train(was_training)
    return total / tokens


def batches_of(dataset, collator, sampler) -> list[dict]:
    return [collator([dataset[i] for i in indices]) for indices in sampler]


def train_batches(dataset, collator, data, batch_size: int, seed: int):
    """Endless batches, identical for every model, cut as `hf-moe-mt train` cuts them: token batches with
    `data.max_tokens`, length-sorted pools with `data.maxi_batch`, else shuffled fixed-size ones."""
    from hf_moe_mt.data.batching import length_batch_sampler

    sampler = length_batch_sampler(dataset, batch_size, max_tokens=data.max_tokens, maxi_batch=data.maxi_batch,
                                   seed=seed)
    for epoch in range(10**9):
        if sampler is not None:
            order = sampler.batches(epoch)
        else:
            permutation = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
            order = [permutation[i:i + batch_size] for i in range(0, len(permutation), batch_size)]
        for indices in order:
            yield collator([dataset[i] for i in indices])


# --------------------------------------------------------------------------- report

def lag_report(curves: dict, tolerance: float) -> list[str]:
    """One line per evaluation point where ours_dense's dev loss exceeds M2M100's by more than `tolerance`."""
    lines = []
    for point_ours, point_ref in zip(curves["ours_dense"]["dev"], curves["m2m100"]["dev"]):
        excess = point_ours["loss"] / point_ref["loss"] - 1
        if excess > tolerance:
            lines.append(f"step {point_ours['step']}: ours_dense dev loss {point_ours['loss']:.4f} is "
                         f"{100 * excess:.1f} % above M2M100's {point_ref['loss']:.4f} (tolerance {100 * tolerance:.0f} %)")
    return lines


def write_results(output: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output.mkdir(parents=True, exist_ok=True)
    staging = output / "reference_curves.json.tmp"
    staging.write_text(json.dumps(result, indent=1) + "\n")
    staging.replace(output / "reference_curves.json")
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in MODELS:
        curve = result["curves"][name]
        axes[0].plot([p["step"] for p in curve["dev"]], [p["loss"] for p in curve["dev"]], marker="o", label=name)
        axes[1].plot([p["step"] for p in curve["train"]], [p["loss"] for p in curve["train"]], label=name)
    axes[0].set(xlabel="step", ylabel="dev cross-entropy (nats/token)", title="dev loss")
    axes[1].set(xlabel="step", ylabel="training loss (label-smoothed + router)", title="training loss")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(result["title"], fontsize=9)
    figure.tight_layout()
    figure.savefig(output / "reference_curves.png", dpi=120)
    plt.close(figure)


def print_table(curves: dict) -> None:
    print(f"{'step':>6} " + " ".join(f"{name:>12}" for name in MODELS) + "   dense/M2M100  moe/M2M100")
    for points in zip(*(curves[name]["dev"] for name in MODELS)):
        losses = [point["loss"] for point in points]
        print(f"{points[0]['step']:>6} " + " ".join(f"{loss:>12.4f}" for loss in losses)
              + f"   {losses[1] / losses[0]:>12.4f}  {losses[2] / losses[0]:>10.4f}")


# --------------------------------------------------------------------------- main

def prepare(options):
    """(train config, training arguments, tokenizer, train examples, dev batches) from the config."""
    from hf_moe_mt.data import MultitaskCollator
    from hf_moe_mt.training.config import load_train_config
    from hf_moe_mt.training.run import build_datasets, prepare_corpus, prepare_tokenizer

    work_dir = options.work_dir or tempfile.mkdtemp(prefix="reference-")
    config = load_train_config(options.config, [f"training.output_dir={work_dir}", "evaluation.bleu_steps=0",
                                                *options.overrides])
    args = config.training_arguments()
    corpus = prepare_corpus(config, args)
    tokenizer = prepare_tokenizer(config, corpus, args)
    train, dev, _ = build_datasets(config, corpus, tokenizer, args)
    if dev is None:
        raise ValueError("the corpus has no validation split; the comparison needs dev pairs")
    collator = MultitaskCollator(tokenizer, make_decoder_input_ids=True)
    dev = dev.select(sorted(range(len(dev)), key=lambda i: len(dev[i]["labels"])))  # fewer pad tokens per batch
    size = args.per_device_eval_batch_size
    dev_batches = [collator([dev[i] for i in range(start, min(start + size, len(dev)))])
                   for start in range(0, len(dev), size)]
    return config, args, tokenizer, train, collator, dev_batches


def run(options) -> int:
    """1. data and models  2. interleaved training with dev loss every --eval-every steps  3. JSON/PNG + check."""
    from transformers import set_seed

    from hf_moe_mt.runtime import keep_freed_memory

    keep_freed_memory()
    # 1.
    config, args, tokenizer, train, collator, dev_batches = prepare(options)
    steps = options.steps or args.max_steps
    models = build_models(config, tokenizer, args.seed)
    optimizers = {name: optimizer_and_schedule(model, args, steps) for name, model in models.items()}
    label_smoothing = models["ours_moe"].config.label_smoothing
    curves = {name: {"dev": [], "train": [], "seconds": 0.0,
                     "parameters": sum(p.numel() for p in model.parameters())} for name, model in models.items()}
    result = {"config": options.config, "overrides": options.overrides, "steps": steps,
              "title": f"{Path(options.config).name} {' '.join(options.overrides)}".strip(), "curves": curves}

    def evaluate(step: int) -> None:
        for name, model in models.items():
            curves[name]["dev"].append({"step": step, "loss": round(dev_loss(model, dev_batches), 5)})
        write_results(Path(options.output), result)

    # 2.
    evaluate(0)
    running = {name: 0.0 for name in models}
    for step, batch in enumerate(train_batches(train, collator, config.data,
                                               args.per_device_train_batch_size, args.seed), start=1):
        for name, model in models.items():
            set_seed(args.seed + step)  # the same dropout stream for each model's step (shapes differ anyway)
            start = time.perf_counter()
            model.train()
            loss = training_loss(name, model, batch, label_smoothing)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer, schedule = optimizers[name]
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            curves[name]["seconds"] += time.perf_counter() - start
            running[name] += loss.item()
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"{name}: training loss is {loss.item()} at step {step}")
        if step % args.logging_steps == 0:
            for name in models:
                curves[name]["train"].append({"step": step, "loss": round(running[name] / args.logging_steps, 5)})
                running[name] = 0.0
            print(f"step {step}/{steps}: " + ", ".join(f"{n} {curves[n]['train'][-1]['loss']:.3f}" for n in MODELS),
                  flush=True)
        if step % options.eval_every == 0 or step == steps:
            evaluate(step)
        if step == steps:
            break
    # 3.
    print_table(curves)
    lags = lag_report(curves, options.tolerance)
    result["lagging"] = lags
    write_results(Path(options.output), result)
    for line in lags:
        print(f"FAIL: {line}", file=sys.stderr)
    return 1 if lags else 0


if __name__ == "__main__":
    sys.exit(run(parse_args()))
