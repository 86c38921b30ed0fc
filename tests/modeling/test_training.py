"""Training: the model owns its loss (label smoothing + router losses), a stock Seq2SeqTrainer trains it,
gradient accumulation keeps the router loss a mean, and a tiny model overfits 32 sentence pairs."""

import torch
from datasets import Dataset
from torch.nn import functional as F
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, default_data_collator

from hf_moe_mt import MoEMTConfig, MoEMTForConditionalGeneration, dropless_routing

from .conftest import make_model, random_batch


def test_loss_is_label_smoothed_ce_plus_router_losses():
    model = make_model(label_smoothing=0.1, router_aux_loss_coef=0.3, router_z_loss_coef=0.05).train()
    batch = random_batch()
    torch.manual_seed(3)
    out = model(**batch)
    ce = F.cross_entropy(out.logits.reshape(-1, 96), batch["labels"].reshape(-1), label_smoothing=0.1)
    torch.testing.assert_close(out.loss, ce + 0.3 * out.aux_loss + 0.05 * out.z_loss)
    assert out.z_loss > 0 and out.aux_loss > 0


def test_router_losses_average_all_moe_layers_and_come_without_labels():
    model = make_model(encoder_layers=4, decoder_layers=2)  # 2 + 1 MoE layers
    batch = random_batch()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                decoder_input_ids=batch["labels"].clamp_min(3), output_router_logits=True)
    assert out.loss is None
    infos = out.encoder_router_info + out.decoder_router_info
    assert len(out.encoder_router_info) == 2 and len(out.decoder_router_info) == 1
    torch.testing.assert_close(out.aux_loss, torch.stack([i.aux_loss for i in infos]).mean())
    torch.testing.assert_close(out.z_loss, torch.stack([i.z_loss for i in infos]).mean())
    torch.testing.assert_close(out.encoder_aux_loss, torch.stack([i.aux_loss for i in out.encoder_router_info]).mean())
    assert out.encoder_router_logits[0].shape == (3, 9, 4)
    assert torch.all(out.encoder_router_logits[0][batch["attention_mask"] == 0] == 0)  # padding is never routed
    # Eval capacity (factor 2.0) may drop pairs: kept + dropped = the real source tokens (top-1).
    num_real = int(batch["attention_mask"].sum())
    kept = int(infos[0].tokens_per_expert.sum())
    assert kept == round((1 - float(infos[0].dropped_fraction)) * num_real)


def test_gradient_accumulation_over_two_copies_equals_the_batch():
    """The Trainer sums micro-batch losses normalised by `num_items_in_batch`; the router loss must not double."""
    model = make_model(router_aux_loss_coef=0.5, router_z_loss_coef=0.1)
    batch = random_batch()
    num_items = 2 * int((batch["labels"] != -100).sum())
    with torch.no_grad():
        accumulated = sum(model(**batch, num_items_in_batch=torch.tensor(num_items)).loss for _ in range(2))
        torch.testing.assert_close(accumulated, model(**batch).loss)


def _trainer(model, dataset, tmp_path, **overrides):
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), logging_steps=1, report_to=[], save_strategy="no",
        label_smoothing_factor=0.0, use_cpu=True, dataloader_num_workers=0, seed=0, **overrides,
    )
    return Seq2SeqTrainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator)


def _dataset(num_rows: int = 8) -> Dataset:
    batch = random_batch(batch_size=num_rows, src_len=12, tgt_len=7)
    return Dataset.from_dict({key: value.tolist() for key, value in batch.items()})


def test_stock_seq2seq_trainer_logs_loss_with_aux_loss(tmp_path):
    # Dropless and a big aux coefficient: the logged loss is deterministic and visibly contains the aux loss.
    model = make_model(router_drop_tokens=False, router_aux_loss_coef=1.0)
    dataset = _dataset()
    trainer = _trainer(model, dataset, tmp_path, max_steps=2, learning_rate=0.0, per_device_train_batch_size=8)
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    batch = {key: torch.tensor(dataset[key]) for key in dataset.column_names}
    model.train()
    with torch.no_grad():
        out = model(**batch)
    ce = F.cross_entropy(out.logits.reshape(-1, 96), batch["labels"].reshape(-1))
    assert len(logged) == 2
    for loss in logged:
        assert abs(loss - float(ce + out.aux_loss)) < 1e-4
        assert abs(loss - float(ce)) > 0.5


def _reversal_pairs(num_pairs: int = 32, vocab_size: int = 40):
    """A toy translation: target = source words mapped through a fixed dictionary, in reverse order, + EOS."""
    generator = torch.Generator().manual_seed(0)
    dictionary = torch.randperm(vocab_size - 3, generator=generator) + 3
    sources, targets = [], []
    for _ in range(num_pairs):
        length = int(torch.randint(4, 9, (1,), generator=generator))
        words = torch.randint(3, vocab_size, (length,), generator=generator)
        sources.append(words.tolist() + [2])
        targets.append(dictionary[words - 3].flip(0).tolist() + [2])
    return sources, targets


def _pad(rows, value):
    width = max(map(len, rows))
    return torch.tensor([row + [value] * (width - len(row)) for row in rows])


def test_tiny_model_overfits_32_sentence_pairs():
    sources, targets = _reversal_pairs()
    input_ids, labels = _pad(sources, 1), _pad(targets, -100)
    attention_mask = (input_ids != 1).long()
    config = MoEMTConfig(  # paper routing: top-1, capacity 1.0 with RTS in training, aux coef 0.01
        vocab_size=40, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, expert_ffn_dim=128, num_experts=4,
        max_position_embeddings=32, dropout=0.0,
    )
    torch.manual_seed(0)
    model = MoEMTForConditionalGeneration(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(250):
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert float(out.loss - 0.01 * out.aux_loss) < 0.05
    generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=12)
    assert all(generated[i, 1:1 + len(target)].tolist() == target for i, target in enumerate(targets))


def test_dropless_routing_keeps_every_real_token():
    model = make_model(eval_capacity_factor=0.5, min_capacity=0)
    batch = random_batch()
    with dropless_routing(model), torch.no_grad():
        out = model(**batch, output_router_logits=True)
    for info in out.encoder_router_info:
        assert int(info.tokens_per_expert.sum()) == int(batch["attention_mask"].sum())
        assert float(info.dropped_fraction) == 0.0


def test_stock_seq2seq_trainer_learns_the_toy_translation(tmp_path):
    sources, targets = _reversal_pairs()
    input_ids = _pad(sources, 1)
    dataset = Dataset.from_dict({"input_ids": input_ids.tolist(), "attention_mask": (input_ids != 1).long().tolist(),
                                 "labels": _pad(targets, -100).tolist()})
    model = make_model(vocab_size=40, init_std=0.02)
    trainer = _trainer(model, dataset, tmp_path, max_steps=40, learning_rate=1e-2, lr_scheduler_type="constant",
                       per_device_train_batch_size=16)
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert sum(logged[-4:]) / 4 < 0.6 * sum(logged[:4]) / 4


def test_expert_output_masking_zeroes_whole_tokens_in_training_only():
    """moe_eom=p: in training a token's MoE output is zero with probability p (all features at once); in
    evaluation the layer is untouched."""
    model = make_model(moe_eom=0.5, router_drop_tokens=False)  # no capacity drops: only the mask zeroes a token
    layer = model.model.encoder.layers[1]
    assert layer.is_sparse
    hidden = torch.randn(4, 50, model.config.d_model)
    mask = torch.ones(4, 50, dtype=torch.bool)
    reference = make_model(moe_eom=0.0, router_drop_tokens=False).model.encoder.layers[1]
    reference.load_state_dict(layer.state_dict())
    torch.manual_seed(1)
    masked = layer.train()._feed_forward(hidden, mask)[0] - hidden  # the FFN sublayer's contribution
    torch.manual_seed(1)
    full = reference.train()._feed_forward(hidden, mask)[0] - hidden
    zero_tokens = masked.abs().sum(-1) == 0
    assert 0.35 < zero_tokens.float().mean() < 0.65  # ~p of 200 tokens
    assert torch.equal(masked[~zero_tokens], full[~zero_tokens])
    assert not (full.abs().sum(-1) == 0).any()
    with torch.no_grad():
        assert torch.equal(layer.eval()._feed_forward(hidden, mask)[0], reference.eval()._feed_forward(hidden, mask)[0])
