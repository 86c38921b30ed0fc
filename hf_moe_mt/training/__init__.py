"""Training MoE translation models: `MoESeq2SeqTrainer` (expert parallelism, router metrics, MoE-aware
checkpoints), the `hf-moe-mt train` run and its YAML config. See docs/training.md."""

from .trainer import MoESeq2SeqTrainer

__all__ = ["MoESeq2SeqTrainer"]
