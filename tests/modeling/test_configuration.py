"""MoEMTConfig: the sparse-layer rule, one-line validation errors, Auto* registration."""

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

from hf_moe_mt import MoEMTConfig, MoEMTForConditionalGeneration, MoEMTModel

from .conftest import TINY_CONFIG, make_config, make_model


def test_sparse_layers_step_2_every_other_layer_starting_at_1():
    config = MoEMTConfig(encoder_layers=6, decoder_layers=5)
    assert config.sparse_layers("encoder") == [1, 3, 5]
    assert config.sparse_layers("decoder") == [1, 3]
    assert [config.is_sparse_layer("encoder", i) for i in range(4)] == [False, True, False, True]


def test_sparse_layers_step_0_dense_and_step_1_all():
    config = MoEMTConfig(encoder_sparse_step=0, decoder_sparse_step=1, encoder_layers=3, decoder_layers=3)
    assert config.sparse_layers("encoder") == []
    assert config.sparse_layers("decoder") == [0, 1, 2]


def test_model_layers_follow_the_config_rule():
    model = MoEMTModel(make_config(encoder_layers=4, decoder_layers=3, decoder_sparse_step=3))
    for stack, layers in (("encoder", model.encoder.layers), ("decoder", model.decoder.layers)):
        sparse = [i for i, layer in enumerate(layers) if hasattr(layer.mlp, "gate")]
        assert sparse == model.config.sparse_layers(stack)
    assert model.config.sparse_layers("decoder") == [2]


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"d_model": 30}, "d_model=30 is not divisible by encoder_attention_heads=4"),
        ({"decoder_attention_heads": 5}, "decoder_attention_heads=5"),
        ({"num_experts": 6, "expert_parallel_size": 4}, "not divisible by expert_parallel_size=4"),
        ({"num_experts_per_tok": 3}, "num_experts_per_tok=3 is not supported"),
        ({"num_experts": 1, "num_experts_per_tok": 2}, "num_experts=1 must be >= num_experts_per_tok=2"),
        ({"encoder_sparse_step": -1}, "encoder_sparse_step=-1"),
        ({"capacity_factor": 0.0}, "capacity_factor=0.0 must be > 0"),
        ({"label_smoothing": 1.0}, "label_smoothing=1.0 must be in [0, 1)"),
        ({"dropout": -0.1}, "dropout=-0.1 must be in [0, 1)"),
        ({"activation_function": "tanh"}, "activation_function='tanh' is not supported"),
        ({"position_embedding_type": "rope"}, "position_embedding_type='rope'"),
        ({"vocab_size": 0}, "vocab_size=0 must be a positive integer"),
        ({"expert_ffn_dim": "big"}, "expert_ffn_dim='big' must be a positive integer"),
        ({"pad_token_id": None}, "pad_token_id=None must be set"),
        ({"router_aux_loss_coef": -1.0}, "router_aux_loss_coef=-1.0 must be >= 0"),
    ],
)
def test_invalid_config_raises_one_line_value_error(overrides, fragment):
    with pytest.raises(ValueError) as error:
        make_config(**overrides)
    message = str(error.value)
    assert fragment in message
    assert "\n" not in message


def test_config_round_trips_through_json(tmp_path, tiny_config):
    tiny_config.save_pretrained(tmp_path)
    loaded = MoEMTConfig.from_pretrained(tmp_path)
    for key, value in TINY_CONFIG.items():
        assert getattr(loaded, key) == value
    assert loaded.router_aux_loss_coef == 0.01 and loaded.model_type == "moe_mt"


def test_auto_classes_resolve_moe_mt(tiny_config):
    assert isinstance(AutoConfig.for_model("moe_mt", **TINY_CONFIG), MoEMTConfig)
    assert type(AutoModel.from_config(tiny_config)) is MoEMTModel
    assert type(AutoModelForSeq2SeqLM.from_config(tiny_config)) is MoEMTForConditionalGeneration


def test_embedding_init_std_sets_the_token_table_alone():
    default, scaled = make_model(), make_model(embedding_init_std=0.5)
    table = scaled.model.shared.weight
    assert abs(table.std().item() - 0.5) < 0.05 and not table[scaled.config.pad_token_id].any()
    assert abs(default.model.shared.weight.std().item() - default.config.init_std) < 0.005
    assert scaled.lm_head.weight is table or torch.equal(scaled.lm_head.weight, table)  # tied
    q_proj = scaled.model.encoder.layers[0].self_attn.q_proj.weight
    assert abs(q_proj.std().item() - scaled.config.init_std) < 0.005
    with pytest.raises(ValueError, match="embedding_init_std"):
        make_config(embedding_init_std=0.0)
