"""Reference equivalences: the dense model is transformers' M2M100 (pre-LN) with renamed weights; a one-expert
MoE layer is a dense FFN; experts add parameters but not FLOPs per token."""

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import M2M100Config, M2M100ForConditionalGeneration

from hf_moe_mt import MoEMTForConditionalGeneration

from .conftest import TINY_CONFIG, make_model, random_batch

M2M_NAMES = {"mlp_layer_norm": "final_layer_norm", "mlp.up_proj": "fc1", "mlp.down_proj": "fc2"}


def _m2m100_with_weights_of(model: MoEMTForConditionalGeneration) -> M2M100ForConditionalGeneration:
    config = M2M100Config(
        vocab_size=TINY_CONFIG["vocab_size"], d_model=TINY_CONFIG["d_model"],
        encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=TINY_CONFIG["encoder_ffn_dim"], decoder_ffn_dim=TINY_CONFIG["decoder_ffn_dim"],
        max_position_embeddings=TINY_CONFIG["max_position_embeddings"], dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, encoder_layerdrop=0.0, decoder_layerdrop=0.0, activation_function="relu",
        scale_embedding=True, pad_token_id=1,
    )
    reference = M2M100ForConditionalGeneration(config).eval()
    state = {}
    for name, tensor in model.state_dict().items():
        for ours, theirs in M2M_NAMES.items():
            name = name.replace(f".{ours}.", f".{theirs}.")
        state[name] = tensor
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"}
    return reference


def test_dense_model_equals_m2m100_reference():
    model = make_model(encoder_sparse_step=0, decoder_sparse_step=0)
    reference = _m2m100_with_weights_of(model)
    batch = random_batch()
    decoder_input_ids = batch["labels"].clamp_min(3)
    with torch.no_grad():
        ours = model(batch["input_ids"], batch["attention_mask"], decoder_input_ids=decoder_input_ids).logits
        theirs = reference(batch["input_ids"], batch["attention_mask"], decoder_input_ids=decoder_input_ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_one_expert_moe_equals_dense_model():
    moe = make_model(num_experts=1, expert_ffn_dim=64, encoder_sparse_step=1, decoder_sparse_step=1)
    dense = make_model(encoder_sparse_step=0, decoder_sparse_step=0)
    state = {}
    for name, tensor in moe.state_dict().items():
        if name.endswith("mlp.gate.weight"):
            continue  # a softmax over one expert is 1 whatever the router says
        for suffix, dense_suffix in (("experts.up_proj", "up_proj.weight"), ("experts.up_proj_bias", "up_proj.bias"),
                                     ("experts.down_proj", "down_proj.weight"),
                                     ("experts.down_proj_bias", "down_proj.bias")):
            if name.endswith(suffix):
                name, tensor = name[: -len(suffix)] + dense_suffix, tensor[0]
        state[name] = tensor
    dense.load_state_dict(state)
    batch = random_batch()
    for mode in ("eval", "train"):  # train: capacity 1.0 and RTS, which one expert never exceeds
        getattr(moe, mode)(), getattr(dense, mode)()
        with torch.no_grad():
            torch.testing.assert_close(moe(**batch).logits, dense(**batch).logits, atol=1e-5, rtol=1e-5)


def _flops_and_params(num_experts: int) -> tuple[int, int]:
    model = make_model(num_experts=num_experts)
    one_token = torch.tensor([[5]])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=one_token, decoder_input_ids=one_token)
    return counter.get_total_flops(), sum(p.numel() for p in model.parameters())


def test_experts_grow_parameters_not_flops_per_token():
    d, f = TINY_CONFIG["d_model"], TINY_CONFIG["expert_ffn_dim"]
    num_moe_layers = 2  # one per stack in the tiny config
    flops_1, params_1 = _flops_and_params(1)
    for num_experts in (4, 16):
        flops, params = _flops_and_params(num_experts)
        extra_experts = num_experts - 1
        # Each extra expert adds its two matrices + biases and a router row, in every MoE layer ...
        assert params - params_1 == num_moe_layers * extra_experts * (2 * d * f + f + d + d)
        # ... but a token still runs through one expert; only the router's [D, E] product grows.
        assert flops - flops_1 == num_moe_layers * 2 * d * extra_experts
