"""One `hf-moe-mt train` run as library calls: startup checks, corpus and tokenizer, model, multitask data,
MoESeq2SeqTrainer (+ BLEU and plot callbacks), training, dev evaluation and the final model.

The same code runs single-process, under `accelerate launch`, `torchrun` and the `deepspeed` launcher: every
process executes all of it; files shared by the ranks (corpus, tokenizer, datasets cache) are produced by the
main process first and loaded by the others. Outputs under `training.output_dir`:

    corpus/, tokenizer/     built when the config does not point to existing ones (reused on --resume)
    checkpoint-N/           complete checkpoints only (staged as .tmp-checkpoint-N, then renamed)
    model/                  the final model: every expert, HF names, safetensors, + tokenizer
    expert_load.png, loss_curve.png, runs/ (TensorBoard), train_summary.json, train_config.json (the resolved config)
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os

from .checkpoints import check_checkpoint_complete, last_complete_checkpoint
from .config import TrainConfig

FINAL_MODEL_DIR, SUMMARY_FILE, CONFIG_FILE = "model", "train_summary.json", "train_config.json"


# --------------------------------------------------------------------------- startup checks (no model, no data)

def world_size_from_env() -> int:
    """Processes of this launch (torchrun, accelerate launch and the deepspeed launcher all set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def deepspeed_config_path(config: TrainConfig):
    """`training.deepspeed`, or the `deepspeed_config_file` of an `accelerate launch` DeepSpeed config (passed
    on as `training.deepspeed`, so both launch styles take the same path through the Trainer)."""
    if config.deepspeed:
        return config.deepspeed
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path == "none":
        raise ValueError("accelerate's inline DeepSpeed settings are not supported; set deepspeed_config_file in the "
                         "accelerate config (see scripts/accelerate/ds_zero2_ep.yaml) or training.deepspeed")
    return path


# MoEMTConfig fields that decide weight shapes: a pretrained model's values cannot be overridden.
SHAPE_FIELDS = ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "expert_ffn_dim", "num_experts",
                "encoder_sparse_step", "decoder_sparse_step", "max_position_embeddings", "position_embedding_type",
                "tie_word_embeddings")


def model_config_of(config: TrainConfig):
    """The MoEMTConfig the run will use (validated: num_experts % expert_parallel_size, sizes, ...)."""
    from ..configuration_moe_mt import MoEMTConfig

    overrides, pretrained = config.model.config, config.model.pretrained
    if not pretrained:
        return MoEMTConfig(**overrides)
    if not os.path.isdir(pretrained):
        raise FileNotFoundError(f"model.pretrained={pretrained} does not exist; give a directory written by "
                                "save_pretrained / hf-moe-mt train (its model/ folder)")
    saved = MoEMTConfig.from_pretrained(pretrained)
    for name in SHAPE_FIELDS:
        if name in overrides and overrides[name] != getattr(saved, name):
            raise ValueError(f"model.config.{name}={overrides[name]} differs from the pretrained model's "
                             f"{getattr(saved, name)}; sizes come from model.pretrained: drop it from model.config "
                             "(model.config={} clears the section)")
    return MoEMTConfig.from_pretrained(pretrained, **overrides)


def check_deepspeed(config: TrainConfig, ep_size: int) -> None:
    deepspeed_config = deepspeed_config_path(config)
    if deepspeed_config is None:
        return
    if importlib.util.find_spec("deepspeed") is None:
        raise ValueError("a DeepSpeed config is set but deepspeed is not installed; pip install deepspeed "
                         "(or hf_moe_mt[deepspeed]), or remove training.deepspeed")
    if isinstance(deepspeed_config, str) and not os.path.isfile(deepspeed_config):
        raise FileNotFoundError(f"DeepSpeed config {deepspeed_config} does not exist; see scripts/accelerate/")
    if ep_size > 1:
        prepare_deepspeed_runtime()
        from .deepspeed_ep import validate_deepspeed_config

        validate_deepspeed_config(deepspeed_config, ep_size)


def resolve_resume(config: TrainConfig, resume: str | bool | None, ep_size: int) -> str | None:
    """`True` → the last complete checkpoint-N of the output dir; a path is checked for missing shards. Without
    resume, an output dir that already holds checkpoints is refused (the runs would interleave)."""
    output_dir = config.output_dir
    if not resume:
        if last_complete_checkpoint(output_dir) is not None:
            raise ValueError(f"{output_dir} already holds checkpoints; pass --resume to continue that run, or "
                             "choose another training.output_dir")
        return None
    path = last_complete_checkpoint(output_dir) if resume is True else resume
    if path is None:
        raise ValueError(f"--resume: no complete checkpoint-N in {output_dir}; train without --resume first")
    check_checkpoint_complete(path, world_size_from_env(), ep_size, deepspeed_config_path(config) is not None,
                              bool(config.training.get("save_only_model", False)))
    return path


def check_launch(config: TrainConfig, resume: str | bool | None) -> tuple[int, str | None]:
    """Every one-line error that needs no model or data, before anything heavy: label_smoothing_factor, model
    config (num_experts % ep), world % ep, DeepSpeed (installed, file, ZeRO-3 / ZeRO-0 with EP), the resume checkpoint.
    Returns (ep_size, checkpoint to resume from)."""
    from .trainer import check_label_smoothing

    check_label_smoothing(config.training.get("label_smoothing_factor", 0.0))
    ep_size = model_config_of(config).expert_parallel_size
    world = world_size_from_env()
    if world % ep_size:
        raise ValueError(f"expert_parallel_size={ep_size} does not divide the {world} launched process(es); launch "
                         f"a multiple of {ep_size} processes (accelerate launch --num_processes, torchrun "
                         "--nproc_per_node) or set model.config.expert_parallel_size to a divisor")
    check_deepspeed(config, ep_size)
    return ep_size, resolve_resume(config, resume, ep_size)


def prepare_deepspeed_runtime() -> None:
    """On a machine without CUDA: DeepSpeed's CPU accelerator, without the ~100 s JIT build of its shared-memory
    inference all-reduce (training never uses it; see PLATFORM_NOTES.md). Must run before deepspeed's comm init."""
    import torch

    if torch.cuda.is_available():
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


# --------------------------------------------------------------------------- data, tokenizer, model

def prepare_corpus(config: TrainConfig, args):
    from ..data import CorpusConfig, build_corpus, load_corpus

    if config.data.corpus:
        return load_corpus(config.data.corpus)
    if not config.data.corpus_build:
        raise ValueError("set data.corpus (a directory from `hf-moe-mt data build`) or data.corpus_build "
                         "(e.g. {source: bible, languages: [de, fr]})")
    path = os.path.join(args.output_dir, "corpus")
    with args.main_process_first(desc="corpus", local=False):
        if not os.path.isdir(path):
            try:
                corpus_config = CorpusConfig(output_dir=path, **config.data.corpus_build)
            except TypeError as error:
                raise ValueError(f"data.corpus_build: {error}; use CorpusConfig fields (source, inputs, "
                                 "languages, max_pairs_per_language, ...)") from None
            build_corpus(corpus_config)
    return load_corpus(path)


def prepare_tokenizer(config: TrainConfig, corpus, args):
    from transformers import AutoTokenizer

    from ..data import save_tokenizer, train_tokenizer

    pretrained = config.model.pretrained
    if config.data.tokenizer:
        path = config.data.tokenizer
    elif pretrained and os.path.isfile(os.path.join(pretrained, "tokenizer.json")):
        path = pretrained
    else:
        path = os.path.join(args.output_dir, "tokenizer")
        with args.main_process_first(desc="tokenizer", local=False):
            if not os.path.isdir(path):
                data = config.data
                tokenizer = train_tokenizer(corpus, data.tokenizer_vocab_size, data.tokenizer_model, data.temperature,
                                            seed=args.seed)
                save_tokenizer(tokenizer, path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path} does not exist; build one with `hf-moe-mt data tokenizer`")
    return AutoTokenizer.from_pretrained(path)


def build_model(config: TrainConfig, tokenizer, seed: int):
    """A new model (ids from the tokenizer) or the pretrained one; seeded so every rank holds the same
    weights (expert parallelism slices them, it does not broadcast them)."""
    from transformers import AutoModelForSeq2SeqLM, set_seed

    from ..configuration_moe_mt import MoEMTConfig
    from ..modeling_moe_mt import MoEMTForConditionalGeneration

    set_seed(seed)
    if config.model.pretrained:
        model = AutoModelForSeq2SeqLM.from_pretrained(config.model.pretrained, **config.model.config)
    else:
        token_ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         decoder_start_token_id=tokenizer.eos_token_id)
        model = MoEMTForConditionalGeneration(MoEMTConfig(**{**token_ids, **config.model.config}))
    if model.config.vocab_size < len(tokenizer):
        raise ValueError(f"the model's vocab_size={model.config.vocab_size} is smaller than the tokenizer's "
                         f"{len(tokenizer)} tokens; use the model's own tokenizer or a matching vocab_size")
    return model


def enable_cpu_backend(model, device) -> str | None:
    """The CPU backend on a model that trains on the CPU (a description of the choice), else nothing."""
    if device.type != "cpu":
        return None
    from ..backends import enable_fast_cpu

    return enable_fast_cpu(model).describe()


def choose_cpu_bf16_attention(model, config: TrainConfig, args) -> str | None:
    """Under bf16 autocast on a CPU, the attention the bf16 attention probe measured faster (SDPA's CPU flash
    backward can be several times slower in bf16 than eager attention); a description of the choice, else
    nothing. An `attn_implementation` in the model config is the user's choice and stays; with attention dropout
    SDPA leaves the flash kernel the probe measures, so it stays too."""
    if args.device.type != "cpu" or not args.bf16 or "attn_implementation" in config.model.config:
        return None
    if getattr(model.config, "attention_dropout", 0.0):
        return None
    if model.config._attn_implementation != "sdpa":
        return None
    from ..backends.precision import cpu_bf16_attention_choice

    choice = cpu_bf16_attention_choice()
    if choice.implementation != model.config._attn_implementation:
        model.set_attn_implementation(choice.implementation)
    return choice.describe()


def build_datasets(config: TrainConfig, corpus, tokenizer, args):
    """(train examples, dev-loss examples or None, BLEU rows or None)."""
    from ..data import MultitaskConfig, build_multitask_dataset, build_translation_eval_dataset

    data = config.data
    multitask = MultitaskConfig(num_examples=data.num_examples, denoising_ratio=data.denoising_ratio,
                                both_directions=data.both_directions, temperature=data.temperature,
                                max_source_length=data.max_source_length, max_target_length=data.max_target_length,
                                seed=args.seed, num_proc=data.num_proc)
    with args.main_process_first(desc="multitask examples", local=False):
        train = build_multitask_dataset(corpus, tokenizer, multitask)
        dev = build_translation_eval_dataset(corpus, tokenizer, "validation", multitask) if len(
            corpus["validation"]) else None
    if dev is None:
        if args.eval_strategy != "no" or config.evaluation.bleu_steps:
            raise ValueError("evaluation is requested but the corpus has no validation pairs; build the corpus "
                             "with held-out pairs or set training.eval_strategy=no and evaluation.bleu_steps=0")
        return train, None, None
    # The split is stored language by language: a seeded shuffle makes any prefix cover every direction.
    dev = dev.shuffle(seed=args.seed)
    dev_loss = dev.select(range(min(len(dev), data.eval_examples or len(dev))))
    bleu_rows = dev.select(range(min(len(dev), config.evaluation.bleu_examples)))
    return train, dev_loss, bleu_rows


# --------------------------------------------------------------------------- the run

def run_training(config: TrainConfig, resume: str | bool | None = None, callbacks=(), fast_cpu: bool = True) -> dict:
    """1. startup checks  2. training arguments (sets up torch.distributed)  3. corpus, tokenizer  4. model (on a
    CPU with the measured CPU backend unless `fast_cpu=False`, see hf_moe_mt.backends)  5. datasets
    6. trainer + callbacks (the config's time budget and cooldown among them)  7. train  8. dev evaluation,
    final model, summary (main process)."""
    from ..data import MultitaskCollator
    from .budget import budget_callback
    from .evaluation import BleuCallback
    from .metrics import TrainingPlotsCallback
    from .trainer import MoESeq2SeqTrainer

    # 1.
    ep_size, checkpoint = check_launch(config, resume)
    deepspeed_config = deepspeed_config_path(config)
    if deepspeed_config is not None:
        prepare_deepspeed_runtime()
    # 2.
    args = config.training_arguments(deepspeed=deepspeed_config)
    if args.should_save:  # what `hf-moe-mt export` puts in the model card
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, CONFIG_FILE), "w", encoding="utf-8") as handle:
            json.dump(dataclasses.asdict(config), handle, indent=1, default=str)
    # 3. + 4. + 5.
    corpus = prepare_corpus(config, args)
    tokenizer = prepare_tokenizer(config, corpus, args)
    model = build_model(config, tokenizer, args.seed)
    backend = enable_cpu_backend(model, args.device) if fast_cpu else None
    attention = choose_cpu_bf16_attention(model, config, args)
    train, dev, bleu_rows = build_datasets(config, corpus, tokenizer, args)
    # 6.
    trainer = MoESeq2SeqTrainer(model=model, args=args, train_dataset=train, eval_dataset=dev,
                                data_collator=MultitaskCollator(tokenizer), processing_class=tokenizer,
                                callbacks=list(callbacks), expert_parallel_size=ep_size,
                                max_tokens=config.data.max_tokens, maxi_batch=config.data.maxi_batch)
    if (budget := budget_callback(config.budget)) is not None:
        trainer.add_callback(budget)
    if config.evaluation.plots:
        trainer.add_callback(TrainingPlotsCallback(trainer.router_metrics))
    if config.evaluation.bleu_steps:
        evaluation = config.evaluation
        trainer.add_callback(BleuCallback(trainer, bleu_rows, evaluation.bleu_steps, evaluation.num_beams,
                                          evaluation.max_new_tokens))
    # 7.
    result = trainer.train(resume_from_checkpoint=checkpoint)
    # 8.
    summary = {"global_step": result.global_step, "train_loss": result.training_loss, **result.metrics}
    if dev is not None:
        summary.update(trainer.evaluate())
    final_dir = os.path.join(args.output_dir, FINAL_MODEL_DIR)
    trainer.save_model(final_dir)
    summary.update(model_dir=final_dir, expert_parallel_size=ep_size, world_size=args.world_size, cpu_backend=backend,
                   bf16=args.bf16, cpu_bf16_attention=attention)
    if args.should_save:
        with open(os.path.join(args.output_dir, SUMMARY_FILE), "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=1)
    return summary
