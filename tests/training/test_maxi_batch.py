"""`data.maxi_batch`: the Trainer's batches hold per_device_train_batch_size sentences of similar lengths, every
example once per epoch, in the sampler's order; it refuses to be combined with token batches; a training run
with it ends normally."""

import json

import datasets
import numpy as np
import pytest
from transformers import Seq2SeqTrainingArguments

from hf_moe_mt.data.batching import MaxiBatchSampler
from hf_moe_mt.training.trainer import MoESeq2SeqTrainer
from tests.modeling.conftest import make_model
from tests.training.conftest import check_ok, run_cli, train_argv


def _lengths_collator(rows):
    import torch

    return {"input_ids": torch.tensor([len(row["input_ids"]) for row in rows])}


def _trainer(tmp_path, lengths, **kwargs):
    dataset = datasets.Dataset.from_dict({"input_ids": [[5] * n for n in lengths], "labels": [[6] * n for n in lengths]})
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, use_cpu=True,
                                    report_to=[], seed=3)
    return MoESeq2SeqTrainer(model=make_model(), args=args, train_dataset=dataset, data_collator=_lengths_collator,
                             **kwargs)


def test_trainer_batches_are_the_maxi_batch_samplers(tmp_path):
    lengths = np.random.default_rng(0).integers(2, 60, 200)
    trainer = _trainer(tmp_path, lengths, maxi_batch=5)
    batches = [batch["input_ids"].tolist() for batch in trainer.get_train_dataloader()]
    expected = MaxiBatchSampler(lengths, 8, 5, seed=3).batches(0)
    assert batches == [sorted(lengths[b].tolist()) for b in expected]
    assert sorted(n for batch in batches for n in batch) == sorted(lengths.tolist())
    assert all(len(batch) == 8 for batch in batches)


def test_maxi_batch_and_max_tokens_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match="max_tokens and maxi_batch both set"):
        _trainer(tmp_path, [3, 4], maxi_batch=4, max_tokens=64)


def test_a_run_with_maxi_batches_trains(fixture_data, tmp_path):
    output = tmp_path / "run"
    check_ok(run_cli(train_argv(fixture_data, output, "data.maxi_batch=4", "training.max_steps=6",
                                "training.eval_strategy=no", "evaluation.bleu_steps=0")))
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["global_step"] == 6 and np.isfinite(summary["train_loss"])
