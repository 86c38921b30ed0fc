"""backends/precision: `training.bf16: auto` is decided by a measured bf16/fp32 time ratio, cached per machine and
read back without measuring again; explicit values pass through; anything else fails with one line."""

import json
import math

import pytest

from hf_moe_mt.backends import precision
from hf_moe_mt.training.config import load_train_config


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_MOE_MT_CACHE", str(tmp_path))
    return tmp_path / precision.CACHE_FILE


def measured(monkeypatch, ratio: float, measurement: str = "measure_time_ratio") -> list:
    """`precision.<measurement>` replaced by one returning `ratio`; the list records each call."""
    calls = []
    monkeypatch.setattr(precision, measurement, lambda: calls.append(ratio) or ratio)
    return calls


@pytest.mark.parametrize("ratio, expected", [(0.5, True), (precision.MAX_TIME_RATIO, True), (0.9, False),
                                             (4.0, False)])
def test_bf16_is_chosen_only_where_it_measured_clearly_faster(cache, monkeypatch, ratio, expected):
    calls = measured(monkeypatch, ratio)
    choice = precision.cpu_bf16_choice()
    assert (choice.use_bf16, choice.time_ratio, choice.source) == (expected, ratio, "probe")
    again = precision.cpu_bf16_choice()
    assert (again.use_bf16, again.source) == (expected, "cache") and len(calls) == 1
    assert list(json.loads(cache.read_text()).values())[0]["time_ratio"] == ratio
    assert precision.cpu_bf16_choice(again=True).source == "probe" and len(calls) == 2


def test_auto_in_the_training_config_becomes_the_measured_answer(cache, monkeypatch):
    measured(monkeypatch, 0.5)
    config = load_train_config(None, ["training.output_dir=unused", "training.bf16=auto", "training.report_to=[]"])
    assert config.training["bf16"] == "auto"  # decided when the arguments are built, for the run's device
    assert config.training_arguments().bf16 is True
    measured(monkeypatch, 2.0)
    assert config.training_arguments().bf16 is True  # cached for this machine
    assert precision.cpu_bf16_choice(again=True).use_bf16 is False
    assert config.training_arguments().bf16 is False


def test_explicit_values_pass_and_others_fail_with_one_line():
    assert precision.resolve_bf16(True, on_cuda=False) is True
    assert precision.resolve_bf16(False, on_cuda=False) is False
    with pytest.raises(ValueError, match="true, false or auto"):
        precision.resolve_bf16("yes", on_cuda=False)
    config = load_train_config(None, ["training.output_dir=unused", "training.bf16=yes", "training.report_to=[]"])
    with pytest.raises(ValueError, match="true, false or auto, got 'yes'"):
        config.training_arguments()


def test_the_real_measurement_is_a_positive_ratio():
    ratio = precision.measure_time_ratio()
    assert math.isfinite(ratio) and ratio > 0


@pytest.fixture
def attention_cache(cache):
    return cache.with_name(precision.ATTENTION_CACHE_FILE)


def measured_attention(monkeypatch, ratio: float) -> list:
    return measured(monkeypatch, ratio, "measure_attention_time_ratio")


@pytest.mark.parametrize("ratio, expected", [(5.0, "eager"), (1.2, "eager"), (1.0, "sdpa"), (0.6, "sdpa")])
def test_eager_attention_is_chosen_only_where_sdpa_measured_clearly_slower(attention_cache, monkeypatch, ratio,
                                                                           expected):
    calls = measured_attention(monkeypatch, ratio)
    choice = precision.cpu_bf16_attention_choice()
    assert (choice.implementation, choice.time_ratio, choice.source) == (expected, ratio, "probe")
    assert precision.cpu_bf16_attention_choice().source == "cache" and len(calls) == 1
    assert list(json.loads(attention_cache.read_text()).values())[0]["implementation"] == expected


def test_the_real_attention_measurement_is_a_positive_ratio():
    ratio = precision.measure_attention_time_ratio()
    assert math.isfinite(ratio) and ratio > 0


def _training_args(bf16: bool):
    import types

    import torch

    return types.SimpleNamespace(device=torch.device("cpu"), bf16=bf16)


def test_a_cpu_bf16_run_trains_with_the_measured_attention_unless_the_config_names_one(attention_cache, monkeypatch):
    from hf_moe_mt.training.run import choose_cpu_bf16_attention
    from tests.modeling.conftest import make_model

    config = load_train_config(None, ["training.output_dir=unused", "training.report_to=[]"])
    model = make_model()
    assert model.config._attn_implementation == "sdpa"
    measured_attention(monkeypatch, 1.0)
    assert "sdpa attention" in choose_cpu_bf16_attention(model, config, _training_args(bf16=True))
    assert model.config._attn_implementation == "sdpa"
    measured_attention(monkeypatch, 3.0)
    precision.cpu_bf16_attention_choice(again=True)
    assert choose_cpu_bf16_attention(model, config, _training_args(bf16=False)) is None  # fp32: SDPA stays
    assert model.config._attn_implementation == "sdpa"
    assert "eager attention" in choose_cpu_bf16_attention(model, config, _training_args(bf16=True))
    assert model.config._attn_implementation == "eager"
    assert all(layer.self_attn.config._attn_implementation == "eager" for layer in model.model.decoder.layers)
    named = load_train_config(None, ["training.output_dir=unused", "training.report_to=[]",
                                     "model.config.attn_implementation=sdpa"])
    model = make_model(attn_implementation="sdpa")
    assert choose_cpu_bf16_attention(model, named, _training_args(bf16=True)) is None
    assert model.config._attn_implementation == "sdpa"
