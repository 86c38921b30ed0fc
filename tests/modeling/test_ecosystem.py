"""The ecosystem finds and handles the model's layers: torch.ao dynamic quantization, PEFT LoRA on the attention
projections, accelerate's device_map="auto" (with disk offload, never splitting a layer) — with and without the
CPU backend applied."""

import re
import warnings

import pytest
import torch
from accelerate import infer_auto_device_map
from torch import nn
from transformers import AutoModelForSeq2SeqLM

from hf_moe_mt.backends import cpu_gemm, enable_fast_cpu

from .conftest import make_model, random_batch


def _generate(model, batch, **kwargs):
    return model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=6,
                          **kwargs)


def test_dynamic_quantization_replaces_every_linear_and_the_model_still_translates():
    from torch.ao.nn.quantized.dynamic import Linear as QuantizedLinear

    model, batch = make_model(num_experts_per_tok=2), random_batch()
    linears = sum(type(m) is nn.Linear for m in model.modules())
    with warnings.catch_warnings():  # torch.ao.quantization points to torchao; it still ships and works
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(make_model(num_experts_per_tok=2), {nn.Linear},
                                                           dtype=torch.qint8)
    assert sum(type(m) is QuantizedLinear for m in quantized.modules()) == linears
    assert not any(type(m) is nn.Linear for m in quantized.modules())
    with torch.no_grad():
        expected, logits = model(**batch).logits, quantized(**batch).logits
    assert (logits - expected).norm() / expected.norm() < 0.05  # int8 weights, fp32 activations
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.95
    sequences = _generate(quantized, batch, num_beams=2)
    assert sequences.shape == (3, 7) and torch.equal(sequences[:, 0], torch.full((3,), model.config.decoder_start_token_id))


@pytest.mark.parametrize("backend", [False, True])
def test_lora_on_attention_projections_trains_saves_and_loads(tmp_path, backend, monkeypatch):
    from peft import LoraConfig, PeftModel, get_peft_model

    model, batch = make_model().train(), random_batch()
    base_state = {name: p.detach().clone() for name, p in model.named_parameters()}
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                            task_type="SEQ_2_SEQ_LM"))
    if backend:
        monkeypatch.setattr(cpu_gemm, "MIN_FLOPS", 0)
        enable_fast_cpu(lora, gemm="onednn" if cpu_gemm.onednn_available() else "torch")
    attention_blocks = model.config.encoder_layers + 2 * model.config.decoder_layers
    adapted = [name for name, m in lora.named_modules() if name.endswith(("q_proj", "v_proj")) and hasattr(m, "lora_A")]
    assert len(adapted) == 2 * attention_blocks
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = lora(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0]
    base_after = {name.replace("base_model.model.", "").replace(".base_layer", ""): p
                  for name, p in lora.named_parameters() if "lora_" not in name}
    assert all(torch.equal(base_after[name], tensor) for name, tensor in base_state.items())  # only adapters learn
    lora.save_pretrained(tmp_path)
    lora.eval()
    with torch.no_grad():
        expected = lora(**batch).logits
    loaded = PeftModel.from_pretrained(make_model(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=1e-5, atol=1e-5)
    assert _generate(loaded, batch, num_beams=2).shape == (3, 7)


@pytest.mark.parametrize("backend", [False, True])
def test_device_map_auto_loads_offloads_whole_layers_and_translates(tmp_path, backend, monkeypatch):
    model, batch = make_model(num_experts_per_tok=2), random_batch()
    model.save_pretrained(tmp_path / "model")
    with torch.no_grad():
        expected = model(**batch).logits
    budget = {"cpu": sum(p.numel() * 4 for p in model.parameters()) // 2, "disk": 10**9}  # half of it must go to disk
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "model", device_map="auto", max_memory=budget,
                                                   offload_folder=str(tmp_path / "offload"))
    assert set(loaded.hf_device_map.values()) == {"cpu", "disk"}
    if backend:
        monkeypatch.setattr(cpu_gemm, "MIN_FLOPS", 0)
        enable_fast_cpu(loaded, gemm="onednn" if cpu_gemm.onednn_available() else "torch")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(_generate(loaded, batch), _generate(model, batch))


def test_no_split_modules_keep_every_encoder_and_decoder_layer_on_one_device():
    model = make_model()
    budget = {"cpu": sum(p.numel() * 4 for p in model.parameters()) // 2, "disk": 10**9}
    inside_a_layer = re.compile(r"\.layers\.\d+\.")
    device_map = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=model._no_split_modules)
    assert set(device_map.values()) == {"cpu", "disk"}
    assert not [key for key in device_map if inside_a_layer.search(key)], device_map
    unconstrained = infer_auto_device_map(model, max_memory=budget)  # what the declaration prevents
    assert [key for key in unconstrained if inside_a_layer.search(key)]
    assert set(model._no_split_modules) == {"MoEMTEncoderLayer", "MoEMTDecoderLayer"}
