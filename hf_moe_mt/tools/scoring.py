"""sacrebleu BLEU and chrF of translations: the one place the package scores text (the translate and evaluate
commands, the quickstart, the training BLEU callback), so every number agrees with sacrebleu's own CLI.

BLEU takes the target language: sacrebleu then picks the tokenizer its CLI picks for `-l src-tgt` (zh for
Chinese, mecab for Japanese/Korean, 13a otherwise). chrF is sacrebleu's default chrF2 (character 6-grams).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.metrics.bleu import BLEUScore


def _check_aligned(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references; they must align line by line")


def _bleu_metric(target_language: str | None) -> BLEU:
    """BLEU with the tokenizer sacrebleu's CLI uses for this target language (one-line error without mecab)."""
    try:
        return BLEU(trg_lang=target_language or "")
    except RuntimeError as error:  # Japanese/Korean tokenizers are optional extras of sacrebleu
        extra = "ja" if target_language == "ja" else "ko"
        raise ValueError(f"BLEU into {target_language!r} needs sacrebleu's tokenizer extra; install it with: "
                         f"pip install 'sacrebleu[{extra}]'") from error


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str], target_language: str | None = None) -> BLEUScore:
    """Corpus BLEU of line-aligned hypotheses and references (one reference per line)."""
    _check_aligned(hypotheses, references)
    return _bleu_metric(target_language).corpus_score(list(hypotheses), [list(references)])


def score_translations(hypotheses: Sequence[str], references: Sequence[str],
                       target_language: str | None = None) -> dict:
    """{"bleu", "chrf", "bleu_signature", "chrf_signature"}: full-precision scores and the sacrebleu
    signatures that say how to reproduce them."""
    _check_aligned(hypotheses, references)
    bleu, chrf = _bleu_metric(target_language), CHRF()
    bleu_score = bleu.corpus_score(list(hypotheses), [list(references)])
    chrf_score = chrf.corpus_score(list(hypotheses), [list(references)])
    return {"bleu": bleu_score.score, "chrf": chrf_score.score,
            "bleu_signature": str(bleu.get_signature()), "chrf_signature": str(chrf.get_signature())}


def max_ngram_repeats(text: str, n: int = 3) -> int:
    """How often the most frequent word n-gram of `text` occurs: a degenerate decoding loop ("the son of the son of
    the son of ...") repeats one n-gram many times, a translation rarely more than twice."""
    words = text.split()
    counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return max(counts.values(), default=0)


def looping_fraction(hypotheses: Sequence[str], n: int = 3, max_repeats: int = 2) -> float:
    """Share of hypotheses in which some word n-gram occurs more than `max_repeats` times."""
    if not hypotheses:
        return 0.0
    return sum(max_ngram_repeats(text, n) > max_repeats for text in hypotheses) / len(hypotheses)
