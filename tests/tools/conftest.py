"""A tiny trained-tokenizer + tiny model saved like a training run would save it."""

import pytest
import torch

from hf_moe_mt import MoEMTConfig, MoEMTForConditionalGeneration
from hf_moe_mt.data import build_corpus, load_corpus, save_tokenizer, train_tokenizer
from tests.data.conftest import TINY_VOCAB, fixture_config


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    """`run/model` (save_pretrained, no tokenizer) and `run/tokenizer`, as after `hf-moe-mt train`."""
    root = tmp_path_factory.mktemp("run")
    build_corpus(fixture_config(root / "corpus"))
    tokenizer = train_tokenizer(load_corpus(str(root / "corpus")), vocab_size=TINY_VOCAB, model_type="bpe")
    save_tokenizer(tokenizer, str(root / "tokenizer"))
    torch.manual_seed(0)
    config = MoEMTConfig(vocab_size=len(tokenizer), d_model=32, encoder_layers=2, decoder_layers=2,
                         encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                         decoder_ffn_dim=64, expert_ffn_dim=48, num_experts=4, max_position_embeddings=128,
                         dropout=0.0, init_std=0.1, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         decoder_start_token_id=tokenizer.eos_token_id)
    MoEMTForConditionalGeneration(config).save_pretrained(root / "model")
    return root


@pytest.fixture(scope="session")
def exported_dir(run_dir, tmp_path_factory):
    """`run_dir`'s model exported (weights + tokenizer + card), as `hf-moe-mt export` writes it."""
    from hf_moe_mt.tools.export import export_model

    return export_model(run_dir / "model", tmp_path_factory.mktemp("exported") / "model", run_dir / "tokenizer").output_dir
