"""Data for hf_moe_mt: corpora that build offline, a tokenizer with language tokens, and multitask
(translation + denoising) training examples. Never imported by modeling/configuration/tokenization code.

The three entry points a training loop needs:

    from hf_moe_mt.data import load_corpus, build_multitask_dataset, MultitaskConfig, MultitaskCollator

    corpus = load_corpus("runs/corpus")          # (a) DatasetDict: train/validation/test with columns
                                                 #     src_lang, tgt_lang, src_text, tgt_text, ref;
                                                 #     monolingual with lang, text, source
    train = build_multitask_dataset(corpus, tokenizer, MultitaskConfig(denoising_ratio=0.25, seed=0))
                                                 # (b) input_ids, attention_mask, labels (+ task,
                                                 #     src_lang, tgt_lang), languages sampled ∝ n^(1/T)
    collator = MultitaskCollator(tokenizer)      # (c) pads, labels -100 on padding
    dev = build_translation_eval_dataset(corpus, tokenizer, "validation")  # every pair, both directions,
                                                 #     plus src_text/tgt_text (BLEU references)
    Seq2SeqTrainer(model=model, train_dataset=train, eval_dataset=dev, data_collator=collator, ...)

Sequence convention (M2M100/NLLB): input `[__src__] x </s>`, labels `[__tgt__] y </s>`; the model makes
decoder_input_ids = shift_tokens_right(labels) with decoder_start_token_id = eos; generation starts from
eos and forces the target language token first (`forced_bos_token_id = tokenizer.get_lang_id(tgt)`).

Corpora too large to index: `build_multitask_stream(iterable_corpus, tokenizer, pair_counts, ...)` gives
the same examples as an IterableDataset. Building: `build_corpus(CorpusConfig(...))` / `hf-moe-mt data
build`, `train_tokenizer(corpus)` / `hf-moe-mt data tokenizer`. Evaluation pairs: `corpus["validation"]`,
`corpus["test"]` (held-out Bible books); `tokenizer._build_translation_inputs(...)` for generation inputs.
"""

from .collator import MultitaskCollator
from .corpus import QUICKSTART_MAX_PAIRS_PER_LANGUAGE, CorpusConfig, build_corpus, load_corpus
from .multitask import MultitaskConfig, build_multitask_dataset, build_multitask_stream, build_translation_eval_dataset
from .noising import NoiseConfig
from .sampling import temperature_probabilities
from .tokenizer_training import save_tokenizer, train_tokenizer

__all__ = [
    "CorpusConfig",
    "MultitaskCollator",
    "MultitaskConfig",
    "NoiseConfig",
    "QUICKSTART_MAX_PAIRS_PER_LANGUAGE",
    "build_corpus",
    "build_multitask_dataset",
    "build_multitask_stream",
    "build_translation_eval_dataset",
    "load_corpus",
    "save_tokenizer",
    "temperature_probabilities",
    "train_tokenizer",
]
