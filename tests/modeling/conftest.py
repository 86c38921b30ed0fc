"""Tiny MoE-MT configs and models shared by the modeling tests (fast on 2 CPU cores)."""

import pytest
import torch

from hf_moe_mt import MoEMTConfig, MoEMTForConditionalGeneration

# 2+2 layers with MoE in layer 1 of each stack (sparse_step 2), 4 experts, top-1: every code path, ~60k params.
TINY_CONFIG = dict(
    vocab_size=96,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    expert_ffn_dim=48,
    num_experts=4,
    max_position_embeddings=64,
    dropout=0.0,
    init_std=0.1,  # larger than training's 0.02 so a random model's generations are not all one token
)


def make_config(**overrides) -> MoEMTConfig:
    return MoEMTConfig(**{**TINY_CONFIG, **overrides})


def make_model(**overrides) -> MoEMTForConditionalGeneration:
    torch.manual_seed(0)
    return MoEMTForConditionalGeneration(make_config(**overrides)).eval()


def random_batch(batch_size: int = 3, src_len: int = 9, tgt_len: int = 7, vocab_size: int = 96, seed: int = 0):
    """Source ids with right padding of different lengths, attention mask and labels (-100 at padding)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab_size, (batch_size, src_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row in range(1, batch_size):
        attention_mask[row, src_len - 2 * row:] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, TINY_CONFIG.get("pad_token_id", 1))
    labels = torch.randint(3, vocab_size, (batch_size, tgt_len), generator=generator)
    labels[-1, -2:] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def loss_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training forward and backward from seed 0 (the same jitter and dropout draws in every call)."""
    torch.manual_seed(0)
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    """Tiny GEMMs run faster on one thread, and do not stall when other jobs share the 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_config() -> MoEMTConfig:
    return make_config()


@pytest.fixture
def tiny_model() -> MoEMTForConditionalGeneration:
    return make_model()
