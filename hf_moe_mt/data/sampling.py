"""Temperature-based language sampling (p_l ∝ n_l^(1/T), Arivazhagan et al. 2019; the paper uses T=5),
shared by the multitask mixer and the tokenizer trainer. numpy only, deterministic given a Generator."""

from __future__ import annotations

import numpy as np

DEFAULT_TEMPERATURE = 5.0


def temperature_probabilities(counts: dict[str, int], temperature: float = DEFAULT_TEMPERATURE) -> dict[str, float]:
    """p_l = n_l^(1/T) / Σ_k n_k^(1/T). T=1 keeps the data distribution, T→∞ tends to uniform."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    languages = [language for language, count in counts.items() if count > 0]
    if not languages:
        raise ValueError("cannot sample languages: every language has 0 examples")
    weights = np.array([counts[language] for language in languages], dtype=np.float64) ** (1.0 / temperature)
    return dict(zip(languages, (weights / weights.sum()).tolist()))


def draw_language_counts(
    probabilities: dict[str, float], num_samples: int, rng: np.random.Generator
) -> dict[str, int]:
    """How many of `num_samples` examples each language gets: one multinomial draw."""
    languages = list(probabilities)
    counts = rng.multinomial(num_samples, np.array([probabilities[language] for language in languages]))
    return dict(zip(languages, counts.tolist()))


def draw_rows(pool: np.ndarray, num_rows: int, rng: np.random.Generator) -> np.ndarray:
    """`num_rows` rows of `pool`: whole shuffled passes while more are needed than the pool holds
    (up-sampling a small language repeats every row before any row repeats twice), then a partial pass."""
    if num_rows == 0 or len(pool) == 0:
        return np.empty(0, dtype=np.int64)
    full_passes, remainder = divmod(num_rows, len(pool))
    parts = [rng.permutation(pool) for _ in range(full_passes)]
    parts.append(rng.permutation(pool)[:remainder])
    return np.concatenate(parts).astype(np.int64)


def temperature_sample(
    groups: dict[str, np.ndarray], num_samples: int, temperature: float, rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, int]]:
    """Row indices for `num_samples` examples drawn language-by-temperature from `groups`
    ({language: row indices}); returns (indices in language-block order, per-language counts)."""
    probabilities = temperature_probabilities({language: len(rows) for language, rows in groups.items()}, temperature)
    counts = draw_language_counts(probabilities, num_samples, rng)
    indices = [draw_rows(groups[language], counts[language], rng) for language in probabilities]
    return np.concatenate(indices) if indices else np.empty(0, dtype=np.int64), counts
