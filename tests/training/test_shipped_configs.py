"""Every training config the package ships loads, names only real fields, and builds a valid model config."""

from pathlib import Path

import pytest

import hf_moe_mt
from hf_moe_mt import MoEMTConfig
from hf_moe_mt.training.config import load_train_config

CONFIG_DIR = Path(hf_moe_mt.__file__).parent / "configs"
SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def test_the_configs_are_shipped():
    assert {"base.yaml", "bible-small.yaml", "quickstart.yaml", "tiny.yaml"} <= {path.name for path in SHIPPED}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: path.name)
def test_config_loads_and_its_model_config_is_valid(path):
    config = load_train_config(str(path))
    model = MoEMTConfig(vocab_size=1000, **config.model.config)
    assert model.d_model % model.encoder_attention_heads == 0
    assert config.training["output_dir"]


def test_bible_small_is_the_multitask_multilingual_setup_the_experiments_need():
    config = load_train_config(str(CONFIG_DIR / "bible-small.yaml"))
    assert len(config.data.corpus_build["languages"]) >= 4
    assert config.data.both_directions and config.data.denoising_ratio > 0
    assert config.model.config["num_experts_per_tok"] == 1 and config.model.config["router_use_rts"]
