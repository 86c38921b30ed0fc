"""Router metrics: exact values on a routing known in closed form (every token tied → expert 0), agreement
with the RouterInfo the model itself reports on real routing with padding, and only training forwards count."""

import math

import pytest
import torch
from datasets import Dataset
from transformers import Seq2SeqTrainingArguments, default_data_collator

from hf_moe_mt.training.metrics import RouterMetrics, layer_label
from hf_moe_mt.training.trainer import MoESeq2SeqTrainer
from tests.modeling.conftest import make_model, random_batch

LAYERS = ("encoder.1", "decoder.1")
SRC_LEN, TGT_LEN, BATCH = 8, 6, 2  # no padding: encoder T = 16, decoder T = 12 per step


def _all_to_expert_zero(model):
    """Zero, frozen router weights: all logits tie, top-1 picks expert 0 (the lowest id) for every token."""
    for name, param in model.named_parameters():
        if name.endswith("mlp.gate.weight"):
            param.data.zero_()
            param.requires_grad_(False)
    return model


def _expected_tied_routing(tokens: int, num_experts: int = 4) -> dict[str, float]:
    """Load [kept, 0, 0, 0] with kept = capacity = ceil(T / E) (capacity factor 1, min_capacity 0)."""
    kept = math.ceil(tokens / num_experts)
    load = torch.tensor([kept] + [0] * (num_experts - 1), dtype=torch.float64)
    return {"load_cv": float(load.std(unbiased=False) / load.mean()), "max_load": float(load.max() / load.mean()),
            "dropped_fraction": 1 - kept / tokens}


def test_logged_router_metrics_match_a_known_routing(tmp_path):
    model = _all_to_expert_zero(make_model(min_capacity=0, router_z_loss_coef=0.01)).train()
    generator = torch.Generator().manual_seed(0)
    rows = {"input_ids": torch.randint(3, 96, (8, SRC_LEN), generator=generator).tolist(),
            "labels": torch.randint(3, 96, (8, TGT_LEN), generator=generator).tolist()}
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), max_steps=4, logging_steps=2, learning_rate=1e-3,
                                    per_device_train_batch_size=BATCH, report_to=[], save_strategy="no", use_cpu=True)
    trainer = MoESeq2SeqTrainer(model=model, args=args, train_dataset=Dataset.from_dict(rows),
                                data_collator=default_data_collator)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [2, 4]
    encoder, decoder = _expected_tied_routing(BATCH * SRC_LEN), _expected_tied_routing(BATCH * TGT_LEN)
    assert encoder == pytest.approx({"load_cv": math.sqrt(3), "max_load": 4.0, "dropped_fraction": 0.75})
    for entry in logs:
        for layer, expected in zip(LAYERS, (encoder, decoder)):
            for key, value in expected.items():
                assert entry[f"router/{layer}/{key}"] == pytest.approx(value, abs=1e-9), (layer, key)
        assert entry["router/load_cv"] == pytest.approx(math.sqrt(3))
        assert entry["router/dropped_fraction"] == pytest.approx((12 + 9) / (16 + 12))
        assert entry["router/aux_loss"] == pytest.approx(1.0)  # E · mean p(e0)=1/4 · frac(e0)=1
        assert entry["router/z_loss"] == pytest.approx(math.log(4) ** 2)  # logsumexp of 4 zeros, squared


def test_hook_statistics_equal_the_models_router_info_with_padding():
    model = make_model(router_use_rts=False).train()
    metrics = RouterMetrics(model)
    batch = random_batch()  # padded sources and -100 labels
    out = model(**batch, output_router_logits=True)
    logged = metrics.compute()
    infos = dict(zip(LAYERS, out.encoder_router_info + out.decoder_router_info))
    for layer, info in infos.items():
        load = info.tokens_per_expert.double()
        assert logged[f"router/{layer}/load_cv"] == pytest.approx(float(load.std(unbiased=False) / load.mean()))
        assert logged[f"router/{layer}/max_load"] == pytest.approx(float(load.max() / load.mean()))
        assert logged[f"router/{layer}/dropped_fraction"] == pytest.approx(float(info.dropped_fraction), abs=1e-6)
    assert logged["router/aux_loss"] == pytest.approx(out.aux_loss.detach().item(), rel=1e-6)
    assert logged["router/z_loss"] == pytest.approx(out.z_loss.detach().item(), rel=1e-6)
    assert sum(float(info.dropped_fraction) for info in infos.values()) > 0  # capacity dropped something
    assert metrics.compute() == {}  # the window was reset
    assert metrics.total_load.sum() == sum(int(i.tokens_per_expert.sum()) for i in infos.values())


def test_evaluation_and_generation_forwards_are_not_counted():
    model = make_model().eval()
    metrics = RouterMetrics(model)
    batch = random_batch()
    with torch.no_grad():
        model(**batch)
        model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=3)
    assert metrics.compute() == {}
    metrics.remove()
    model.train()(**batch)
    assert metrics.compute() == {}


def test_layer_labels_are_short():
    assert layer_label("model.encoder.layers.1.mlp") == "encoder.1"
    assert layer_label("model.decoder.layers.11.mlp") == "decoder.11"
