"""Train a MoEMTTokenizer on a corpus with the `tokenizers` library: BPE (default; M2M100 and NLLB use
SentencePiece BPE) or Unigram, byte fallback so no input is ever <unk>, one special token per language,
languages balanced by temperature sampling. Writes atomically (temp dir, then rename).

Why BPE by default: on the 10-language Bible corpus (330k sentences, vocab 32k, 2 shared cores) BPE
trains in ~25 s; the Unigram trainer did not finish within 4 minutes.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter

import datasets
import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from ..tokenization_moe_mt import MoEMTTokenizer, language_token
from .atomic import atomic_directory
from .corpus import column_list
from .sampling import DEFAULT_TEMPERATURE, temperature_sample

# fairseq order (as M2M100/NLLB): pad=1, eos=2 are what the model config's pad/eos/decoder_start ids expect
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
BYTE_TOKENS = tuple(f"<0x{value:02X}>" for value in range(256))
TOKENIZER_MODELS = ("unigram", "bpe")
CHARACTER_COVERAGE = 0.9995  # SentencePiece's default for CJK-rich corpora
_BYTE_SCORE = -1e6  # byte pieces are for fallback only: never preferred by Viterbi over real pieces


def language_texts(corpus: datasets.DatasetDict) -> dict[str, list[str]]:
    """Unique training text per language: both sides of the train pairs plus the monolingual split.
    Never validation/test text, so held-out sentences do not shape the vocabulary."""
    texts: dict[str, dict[str, None]] = {}
    sources = [(corpus["train"], "src_lang", "src_text"), (corpus["train"], "tgt_lang", "tgt_text")]
    if "monolingual" in corpus:
        sources.append((corpus["monolingual"], "lang", "text"))
    for dataset, lang_column, text_column in sources:
        for language, text in zip(column_list(dataset, lang_column), column_list(dataset, text_column)):
            texts.setdefault(language, {})[text] = None
    return {language: list(values) for language, values in sorted(texts.items())}


def balanced_sentences(
    texts: dict[str, list[str]], max_sentences: int | None, temperature: float, seed: int
) -> list[str]:
    """Sentences drawn language-by-temperature (p_l ∝ n_l^(1/T)): small languages are up-sampled so
    they get vocabulary, large ones down-sampled. `max_sentences` defaults to the corpus size."""
    flat = [text for language in texts for text in texts[language]]
    offsets = np.cumsum([0] + [len(texts[language]) for language in texts])
    groups = {language: np.arange(offsets[i], offsets[i + 1]) for i, language in enumerate(texts)}
    total = len(flat) if max_sentences is None else max_sentences
    indices, _ = temperature_sample(groups, total, temperature, np.random.default_rng(seed))
    return [flat[index] for index in indices]


def restrict_alphabet(sentences: list[str], coverage: float, max_chars: int) -> list[str]:
    """Remove the rarest characters (beyond `coverage` of all character occurrences, or beyond the
    `max_chars` most frequent) from the training text, like SentencePiece's character_coverage.

    Why: the trainers must give every character they see its own piece, so thousands of rare CJK
    characters would crowd out subwords (or exceed a small vocabulary). Dropped characters are not
    lost at encode time: byte fallback spells them as <0xXX> pieces.
    """
    counts = Counter(itertools.chain.from_iterable(sentences))
    counts.pop(" ", None)
    total, kept, covered = sum(counts.values()), set(), 0
    for char, count in counts.most_common(max_chars):
        if covered >= coverage * total:
            break
        kept.add(char)
        covered += count
    dropped = {ord(char): None for char in counts if char not in kept}
    return [sentence.translate(dropped) for sentence in sentences] if dropped else sentences


def pipeline_components(tokenizer: Tokenizer) -> Tokenizer:
    """Normalizer / pre-tokenizer / decoder shared by both models; decode(encode(x)) == normalize(x)."""
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tokenizer


def with_byte_fallback(trained: Tokenizer, model_type: str, num_special: int) -> Tokenizer:
    """Rebuild the trained model with the 256 `<0xXX>` pieces placed right after the special tokens and
    byte_fallback on (the trainers do not add byte pieces themselves)."""
    model = json.loads(trained.to_str())["model"]
    if model_type == "unigram":
        vocab = [tuple(item) for item in model["vocab"]]
        vocab = vocab[:num_special] + [(piece, _BYTE_SCORE) for piece in BYTE_TOKENS] + vocab[num_special:]
        rebuilt = models.Unigram(vocab, unk_id=SPECIAL_TOKENS.index("<unk>"), byte_fallback=True)
    else:
        ordered = sorted(model["vocab"], key=model["vocab"].get)
        ordered = ordered[:num_special] + list(BYTE_TOKENS) + [p for p in ordered[num_special:] if p not in BYTE_TOKENS]
        merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in model["merges"]]
        rebuilt = models.BPE(
            {piece: index for index, piece in enumerate(ordered)}, merges, unk_token="<unk>", byte_fallback=True
        )
    tokenizer = pipeline_components(Tokenizer(rebuilt))
    tokenizer.add_special_tokens([token["content"] for token in json.loads(trained.to_str())["added_tokens"]])
    return tokenizer


def train_backend(sentences: list[str], languages: list[str], vocab_size: int, model_type: str) -> Tokenizer:
    """Train the `tokenizers` model; `vocab_size` counts everything (specials, bytes, pieces)."""
    if model_type not in TOKENIZER_MODELS:
        raise ValueError(f"unknown tokenizer model {model_type!r}; choose one of {', '.join(TOKENIZER_MODELS)}")
    specials = [*SPECIAL_TOKENS, *(language_token(language) for language in languages)]
    budget = vocab_size - len(BYTE_TOKENS)
    if budget < len(specials) + 100:
        minimum = len(specials) + len(BYTE_TOKENS) + 100
        raise ValueError(f"--vocab-size {vocab_size} is too small: it must exceed {minimum}")
    if model_type == "unigram":
        tokenizer = pipeline_components(Tokenizer(models.Unigram()))
        trainer = trainers.UnigramTrainer(
            vocab_size=budget, special_tokens=specials, unk_token="<unk>", max_piece_length=16, show_progress=False
        )
    else:
        tokenizer = pipeline_components(Tokenizer(models.BPE(unk_token="<unk>")))
        trainer = trainers.BpeTrainer(vocab_size=budget, special_tokens=specials, show_progress=False)
    sentences = restrict_alphabet(sentences, CHARACTER_COVERAGE, max_chars=(budget - len(specials)) // 2)
    tokenizer.train_from_iterator(sentences, trainer=trainer, length=len(sentences))
    return with_byte_fallback(tokenizer, model_type, len(specials))


def train_tokenizer(
    corpus: datasets.DatasetDict,
    vocab_size: int = 32000,
    model_type: str = "bpe",
    temperature: float = DEFAULT_TEMPERATURE,
    max_sentences: int | None = None,
    seed: int = 0,
) -> MoEMTTokenizer:
    """A MoEMTTokenizer trained on `corpus` (a DatasetDict from corpus.build_corpus), one language token per
    language found in it. Deterministic given the corpus and seed."""
    texts = language_texts(corpus)
    sentences = balanced_sentences(texts, max_sentences, temperature, seed)
    backend = train_backend(sentences, list(texts), vocab_size, model_type)
    return MoEMTTokenizer(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        extra_special_tokens=[language_token(language) for language in texts],
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer: MoEMTTokenizer, output_dir: str, overwrite: bool = False) -> None:
    """save_pretrained into a staging dir, then rename: tokenizer.json, tokenizer_config.json (with auto_map)
    and tokenization_moe_mt.py, so AutoTokenizer loads it with or without hf_moe_mt installed."""
    with atomic_directory(output_dir, overwrite) as staging:
        tokenizer.save_pretrained(staging)
