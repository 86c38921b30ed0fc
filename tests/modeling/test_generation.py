"""generate: cache == no cache, beam search, padding invariance (dropless MoE at decode time), forced BOS."""

import pytest
import torch

from hf_moe_mt import SparseMoE

from .conftest import make_model, random_batch

GENERATE = dict(max_new_tokens=8, min_new_tokens=8, output_scores=True, return_dict_in_generate=True)


def _generate(model, input_ids, attention_mask, **kwargs):
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, **{**GENERATE, **kwargs})


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_with_cache_equals_without_cache(tiny_model, num_beams):
    batch = random_batch()
    cached = _generate(tiny_model, batch["input_ids"], batch["attention_mask"], num_beams=num_beams, use_cache=True)
    uncached = _generate(tiny_model, batch["input_ids"], batch["attention_mask"], num_beams=num_beams, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    for step_cached, step_uncached in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(step_cached, step_uncached, atol=1e-5, rtol=1e-5)


def test_beam_search_returns_ranked_hypotheses(tiny_model):
    batch = random_batch()
    out = _generate(tiny_model, batch["input_ids"], batch["attention_mask"], num_beams=4, num_return_sequences=2)
    assert out.sequences.shape == (3 * 2, 9)
    scores = out.sequences_scores.view(3, 2)
    assert torch.all(scores[:, 0] >= scores[:, 1])


@pytest.mark.parametrize("num_beams", [1, 3])
def test_sentence_alone_equals_sentence_in_padded_batch(num_beams):
    # Capacity 0.5 would drop tokens (and so depend on the batch) if generate did not run dropless.
    model = make_model(eval_capacity_factor=0.5, min_capacity=0)
    batch = random_batch()
    together = _generate(model, batch["input_ids"], batch["attention_mask"], num_beams=num_beams)
    for row in range(3):
        length = int(batch["attention_mask"][row].sum())
        alone = _generate(model, batch["input_ids"][row:row + 1, :length], None, num_beams=num_beams)
        assert torch.equal(alone.sequences[0], together.sequences[row])
        for step_alone, step_together in zip(alone.scores, together.scores):
            rows = slice(row * num_beams, (row + 1) * num_beams)
            torch.testing.assert_close(step_alone, step_together[rows], atol=1e-5, rtol=1e-5)


def test_generate_restores_capacity_setting():
    model = make_model(eval_capacity_factor=0.5, min_capacity=0)
    batch = random_batch()
    model.generate(**{k: batch[k] for k in ("input_ids", "attention_mask")}, max_new_tokens=2)
    assert all(m.drop_tokens for m in model.modules() if isinstance(m, SparseMoE))


def test_capacity_in_eval_forward_depends_on_batch_but_generate_does_not():
    """Guards the test above: with this capacity an eval-mode forward really does drop tokens."""
    model = make_model(eval_capacity_factor=0.5, min_capacity=0)
    batch = random_batch()
    with torch.no_grad():
        out = model(**batch, output_router_logits=True)
    assert max(float(info.dropped_fraction) for info in out.encoder_router_info) > 0


def test_forced_bos_token_starts_every_translation(tiny_model):
    batch = random_batch()
    out = tiny_model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              forced_bos_token_id=7, max_new_tokens=4, num_beams=2)
    assert torch.all(out[:, 0] == tiny_model.config.decoder_start_token_id)
    assert torch.all(out[:, 1] == 7)


def test_beam_search_keeps_cross_attention_cache_and_matches_full_reordering(monkeypatch):
    """Our `_reorder_cache` skips the cross-attention half; transformers' own reorder gives the same beams."""
    from transformers.cache_utils import EncoderDecoderCache

    from hf_moe_mt import MoEMTForConditionalGeneration

    model, batch = make_model(num_experts_per_tok=2), random_batch(batch_size=4)
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], num_beams=4,
                  num_return_sequences=2, output_scores=True, return_dict_in_generate=True,
                  max_new_tokens=10, min_new_tokens=10)
    cross_reorders = []
    real_reorder = EncoderDecoderCache.reorder_cache

    def counting_reorder(cache, beam_idx):
        cross_reorders.append(beam_idx)
        real_reorder(cache, beam_idx)

    ours = model.generate(**kwargs)
    monkeypatch.setattr(EncoderDecoderCache, "reorder_cache", counting_reorder)
    monkeypatch.delattr(MoEMTForConditionalGeneration, "_reorder_cache")  # transformers' default path
    full = model.generate(**kwargs)
    assert len(cross_reorders) >= 9  # the default path really reordered both halves every step
    assert all(torch.equal(idx.view(4, 4) // 4, torch.arange(4).view(4, 1).expand(4, 4)) for idx in cross_reorders)
    assert torch.equal(ours.sequences, full.sequences)
    torch.testing.assert_close(ours.sequences_scores, full.sequences_scores)
