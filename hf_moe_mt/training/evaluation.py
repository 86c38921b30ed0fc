"""BLEU during training: translate a small dev slice every N steps and log sacrebleu's corpus BLEU.

Owns the generation loop over a slice of `build_translation_eval_dataset` rows (each row may target another
language: the decoder prompt `</s> __tgt__` is given per row instead of one `forced_bos_token_id`) and the
callback that logs `eval_bleu` through the Trainer's loggers. Never imported by modeling code.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from ..tools.scoring import corpus_bleu


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def translate_rows(model, tokenizer, rows, batch_size: int = 16, num_beams: int = 1,
                   max_new_tokens: int = 64) -> list[str]:
    """Hypotheses for dataset rows with `input_ids` and `tgt_lang`, in row order.

    Every rank translates the same rows with `synced_gpus`: under expert parallelism each forward is a
    collective (all-to-all), so ranks must run the same number of decoding steps.
    """
    device = next(model.parameters()).device
    hypotheses = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        inputs = tokenizer.pad({"input_ids": batch["input_ids"]}, return_tensors="pt").to(device)
        prompt = torch.tensor([[model.config.decoder_start_token_id, tokenizer.get_lang_id(lang)]
                               for lang in batch["tgt_lang"]], device=device)  # [B, 2]
        generated = model.generate(**inputs, decoder_input_ids=prompt, num_beams=num_beams,
                                   max_new_tokens=max_new_tokens, synced_gpus=_is_distributed())
        hypotheses += tokenizer.batch_decode(generated[:, prompt.shape[1]:], skip_special_tokens=True)
    return hypotheses


def dev_bleu(model, tokenizer, rows, **generate_kwargs) -> float:
    """sacrebleu corpus BLEU (13a tokenisation: the rows mix target languages) of the rows' translations
    against their `tgt_text`."""
    hypotheses = translate_rows(model, tokenizer, rows, **generate_kwargs)
    return corpus_bleu(hypotheses, list(rows["tgt_text"])).score


class BleuCallback(TrainerCallback):
    """Every `every_n_steps` optimizer steps: BLEU on `rows`, logged as `eval_bleu` by `trainer.log` (on every
    rank, as the Trainer logs; the loggers write from the main process)."""

    def __init__(self, trainer, rows, every_n_steps: int, num_beams: int = 1, max_new_tokens: int = 64):
        if every_n_steps <= 0:
            raise ValueError(f"every_n_steps={every_n_steps} must be positive")
        self.trainer, self.rows, self.every_n_steps = trainer, rows, every_n_steps
        self.generate_kwargs = {"num_beams": num_beams, "max_new_tokens": max_new_tokens}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every_n_steps == 0:
            should_log = control.should_log
            self.log_bleu()
            control.should_log = should_log  # Trainer.log clears it: keep this step's own training log

    def log_bleu(self) -> float:
        model = self.trainer.model
        was_training = model.training
        model.eval()
        try:
            bleu = dev_bleu(model, self.trainer.processing_class, self.rows, **self.generate_kwargs)
        finally:
            model.train(was_training)
        self.trainer.log({"eval_bleu": bleu})
        return bleu
