"""The `hf-moe-mt train` configuration: one YAML file with five sections, each a dataclass (the
HfArgumentParser idea, one level deeper), plus `section.key=value` overrides from the command line.

    data:       DataConfig                 corpus, tokenizer, multitask mixing, dev slices
    model:      ModelConfig                a new MoEMTConfig, or a pretrained path (+ config overrides)
    training:   Seq2SeqTrainingArguments   every field of transformers' own arguments (output_dir, max_steps,
                                           deepspeed, save_steps, ...), with CPU-friendly defaults filled in;
                                           `bf16: auto` = bf16 where it is faster on the machine at hand
    evaluation: EvaluationConfig           BLEU every N steps on a dev slice, end-of-training plots
    budget:     BudgetConfig               a wall-clock limit and a learning-rate cooldown at the end of the run

Owns parsing and the checks that need no model (unknown keys, types); no torch.distributed, no deepspeed.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field

import yaml
from transformers import Seq2SeqTrainingArguments


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars: `1e-3` is a float (YAML 1.1 wants `1.0e-3`; a learning rate would
    arrive as the string '1e-3') and only true/false are booleans (YAML 1.1 reads `eval_strategy: no` as False)."""


_Loader.yaml_implicit_resolvers = {
    first: [resolver for resolver in resolvers if resolver[0] != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))

# Same as YAML 1.1's float pattern, plus exponents without a dot. Plain integers still resolve to int (the
# int resolver comes first and this pattern needs a dot or an exponent).
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
               r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


@dataclass
class DataConfig:
    """Where examples come from. `corpus` (a directory from `hf-moe-mt data build`) wins; otherwise the corpus
    is built from `corpus_build` (any `hf_moe_mt.data.CorpusConfig` field: source, inputs, languages, ...)
    into `{output_dir}/corpus`. `tokenizer` (a directory) wins; otherwise the pretrained model's, otherwise
    one is trained on the corpus into `{output_dir}/tokenizer`. Both are reused when the run resumes."""

    corpus: str | None = None
    corpus_build: dict = field(default_factory=dict)
    tokenizer: str | None = None
    tokenizer_vocab_size: int = 8000
    tokenizer_model: str = "bpe"
    denoising_ratio: float = 0.25  # share of mBART-style denoising examples (0 = translation only)
    both_directions: bool = True  # X→Y and Y→X; false: only as the corpus stores pairs (X→pivot)
    temperature: float = 5.0  # language sampling ∝ n^(1/T)
    num_examples: int | None = None  # training examples drawn (default: 2 × train pairs)
    max_source_length: int = 128
    max_target_length: int = 128
    eval_examples: int | None = None  # dev-loss examples (validation pairs, both directions); None = all
    num_proc: int | None = None
    max_tokens: int | None = None  # tokens per device batch, similar lengths together (then
                                   # training.per_device_train_batch_size is unused); None = fixed sentence count
    maxi_batch: int | None = None  # with a fixed sentence count: sort each pool of this many random batches by
                                   # length before cutting it (far less padding; batch order stays random)


@dataclass
class ModelConfig:
    """`pretrained`: a path for `from_pretrained` (then `config` entries override its config); otherwise a new
    model from `config` (MoEMTConfig fields; vocabulary and special-token ids come from the tokenizer).
    `config.expert_parallel_size` is the run's ep size."""

    pretrained: str | None = None
    config: dict = field(default_factory=dict)


@dataclass
class EvaluationConfig:
    """`bleu_steps` > 0: sacrebleu BLEU of greedy (or beam) translations of the first `bleu_examples` dev
    examples every `bleu_steps` steps, logged as `eval_bleu`. `plots`: expert_load.png + loss_curve.png."""

    bleu_steps: int = 0
    bleu_examples: int = 64
    num_beams: int = 1
    max_new_tokens: int = 64
    plots: bool = True


@dataclass
class BudgetConfig:
    """`minutes`: stop after this many minutes of training, or at training.max_steps, whichever comes first.
    `cooldown`: decay the learning rate linearly to zero over this last fraction of the run (of `minutes` or of
    max_steps, whichever ends first): warmup-stable-decay for a run whose step count depends on the machine.
    `hf-moe-mt train --time-budget / --cooldown` set them (hf_moe_mt.training.budget)."""

    minutes: float | None = None
    cooldown: float = 0.0

    def __post_init__(self):
        if self.minutes is not None and not (isinstance(self.minutes, (int, float)) and self.minutes > 0):
            raise ValueError(f"budget.minutes (--time-budget) must be a positive number of minutes, got "
                             f"{self.minutes!r}")
        if not (isinstance(self.cooldown, (int, float)) and 0.0 <= self.cooldown < 1.0):
            raise ValueError(f"budget.cooldown (--cooldown) must be a fraction of the run in [0, 1), got "
                             f"{self.cooldown!r}")


@dataclass
class TrainConfig:
    data: DataConfig
    model: ModelConfig
    training: dict  # Seq2SeqTrainingArguments kwargs; built by `training_arguments()` (that sets up devices)
    evaluation: EvaluationConfig
    budget: BudgetConfig = field(default_factory=BudgetConfig)

    @property
    def output_dir(self) -> str:
        return self.training["output_dir"]

    def training_arguments(self, **overrides) -> Seq2SeqTrainingArguments:
        """`bf16: auto` is decided here, for the device the run will use (hf_moe_mt.backends.precision); any
        other word is refused with one line."""
        values = {**self.training, **overrides}
        if isinstance(values.get("bf16"), str):
            import torch

            from ..backends.precision import resolve_bf16

            on_cuda = torch.cuda.is_available() and not values.get("use_cpu")
            values["bf16"] = resolve_bf16(values["bf16"], on_cuda=on_cuda)
        return Seq2SeqTrainingArguments(**values)

    @property
    def deepspeed(self) -> dict | str | None:
        return self.training.get("deepspeed")


SECTIONS = {"data": DataConfig, "model": ModelConfig, "training": Seq2SeqTrainingArguments,
            "evaluation": EvaluationConfig, "budget": BudgetConfig}


def parse_value(text: str):
    """An override's value as YAML (`true`, `1e-3`, `[de, fr]`, `null`); anything else stays a string."""
    return yaml.load(text, Loader=_Loader)


def apply_override(raw: dict, override: str) -> None:
    """`section.key=value` or `section.key.subkey=value` (e.g. model.config.d_model=64) into `raw`."""
    key, separator, value = override.partition("=")
    path = key.strip().split(".")
    if not separator or len(path) < 2 or path[0] not in SECTIONS:
        raise ValueError(f"override {override!r} is not SECTION.KEY=VALUE with SECTION one of {', '.join(SECTIONS)} "
                         "(e.g. training.max_steps=100)")
    node = raw
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {override!r}: {'.'.join(path[:-1])} is not a mapping in the config")
    node[path[-1]] = parse_value(value)


def _check_section(name: str, cls, values) -> dict:
    """Unknown keys name the section and some valid ones."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"config section '{name}' must be a mapping of {cls.__name__} fields, got {values!r}")
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)} in config section '{name}'; valid keys are the "
                         f"fields of {cls.__name__} (e.g. {', '.join(sorted(known)[:6])}, ...)")
    return dict(values)


def training_defaults() -> dict:
    """What `hf-moe-mt train` sets unless the config says otherwise: CPU when there is no GPU (gloo when the
    launcher started several processes; for one process accelerate must get no backend), TensorBoard when
    installed, and a checkpoint every 100 steps."""
    import importlib.util

    import torch

    defaults = {"output_dir": "runs/train", "save_steps": 100, "logging_steps": 10, "report_to": []}
    if importlib.util.find_spec("tensorboard") is not None:
        defaults["report_to"] = ["tensorboard"]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        defaults["ddp_find_unused_parameters"] = False  # every parameter takes part in every forward
    if not torch.cuda.is_available():
        defaults["use_cpu"] = True
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            defaults["ddp_backend"] = "gloo"
    return defaults


def load_train_config(path: str | None, overrides: list[str] = ()) -> TrainConfig:
    """Read the YAML, apply the overrides, check every section; one-line errors for missing files, unknown
    sections or keys, and bad override syntax."""
    raw: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {path} does not exist; see configs/ for examples")
        with open(path, encoding="utf-8") as handle:
            raw = yaml.load(handle, Loader=_Loader) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path} must hold a mapping with sections {', '.join(SECTIONS)}")
    for override in overrides:
        apply_override(raw, override)
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown config section(s) {', '.join(unknown)}; use {', '.join(SECTIONS)}")
    sections = {name: _check_section(name, cls, raw.get(name)) for name, cls in SECTIONS.items()}
    budget = BudgetConfig(**sections["budget"])
    if budget.cooldown and sections["training"].get("lr_scheduler_type") == "reduce_lr_on_plateau":
        raise ValueError("budget.cooldown (--cooldown) scales a step-based schedule; training.lr_scheduler_type="
                         "reduce_lr_on_plateau has none (use constant_with_warmup, inverse_sqrt, linear or cosine)")
    return TrainConfig(
        data=DataConfig(**sections["data"]),
        model=ModelConfig(**sections["model"]),
        training={**training_defaults(), **sections["training"]},
        evaluation=EvaluationConfig(**sections["evaluation"]),
        budget=budget,
    )


__all__ = ["BudgetConfig", "DataConfig", "EvaluationConfig", "ModelConfig", "TrainConfig", "apply_override",
           "load_train_config", "parse_value"]
