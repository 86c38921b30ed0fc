"""Mixed precision on the whole model as users run it: torch.autocast and Seq2SeqTrainer(bf16=True) on a CPU run
every projection and expert GEMM in bf16 (the router in fp32), with and without the CPU backend; the GEMMs are
observed at the dispatcher (tests/dispatch_spy.py)."""

import pytest
import torch
from datasets import Dataset
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, default_data_collator

from hf_moe_mt.backends import cpu_gemm, enable_fast_cpu

from ..dispatch_spy import GemmSpy
from .conftest import TINY_CONFIG, make_model, random_batch

pytestmark = pytest.mark.skipif(not torch.amp.is_autocast_available("cpu"), reason="no CPU autocast")


def _assert_low_precision_except_the_router(spy: GemmSpy, steps: int, moe_layers: int = 2) -> None:
    """Every GEMM in bf16 — attention (d_model wide), dense FFNs and experts (ffn widths), LM head (vocab), and
    their backward products — but the router's three per MoE layer and step (forward, dx, dW), which stay fp32."""
    fp32 = [columns for _, dtypes, columns, _ in spy.calls if set(dtypes) == {torch.float32}]
    low = {columns for _, dtypes, columns, _ in spy.calls if set(dtypes) == {torch.bfloat16}}
    assert len(fp32) == 3 * moe_layers * steps and fp32.count(TINY_CONFIG["num_experts"]) == moe_layers * steps, fp32
    assert len(spy.calls) == len(fp32) + sum(set(dtypes) == {torch.bfloat16} for _, dtypes, _, _ in spy.calls)
    assert {TINY_CONFIG["d_model"], TINY_CONFIG["encoder_ffn_dim"], TINY_CONFIG["expert_ffn_dim"],
            TINY_CONFIG["vocab_size"]} <= low


@pytest.mark.parametrize("backend", [False, True])
def test_autocast_runs_every_gemm_in_bf16_but_the_router(backend, monkeypatch):
    model, batch = make_model(num_experts_per_tok=2).train(), random_batch()
    if backend:
        monkeypatch.setattr(cpu_gemm, "MIN_FLOPS", 0)
        enable_fast_cpu(model, gemm="onednn" if cpu_gemm.onednn_available() else "torch")
    spy = GemmSpy()
    with spy:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
    _assert_low_precision_except_the_router(spy, steps=1)
    assert all(p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)
               for p in model.parameters())


def test_seq2seq_trainer_bf16_trains_on_cpu_in_bf16(tmp_path):
    model = make_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    batch = random_batch(batch_size=4)
    dataset = Dataset.from_dict({key: value.tolist() for key, value in batch.items()})
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), bf16=True, use_cpu=True, max_steps=2,
                                    per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                                    save_strategy="no", logging_steps=1, dataloader_num_workers=0, seed=0)
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator)
    spy = GemmSpy()
    with spy:
        result = trainer.train()
    _assert_low_precision_except_the_router(spy, steps=2)
    assert torch.isfinite(torch.tensor(result.training_loss))
    changed = [name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert "lm_head.weight" in changed or "model.shared.weight" in changed
    assert any(".experts." in name for name in changed)
    assert all(p.dtype == torch.float32 for p in model.parameters())
