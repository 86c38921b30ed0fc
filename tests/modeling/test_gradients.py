"""Gradients: every parameter that should learn gets a gradient; experts exactly when they received tokens;
gradient checkpointing changes nothing (routing randomness included)."""

import pytest
import torch

from hf_moe_mt import SparseMoE

from .conftest import make_model, random_batch

EXPERT_PARAMS = ("up_proj", "up_proj_bias", "down_proj", "down_proj_bias")


def _sparse_layers(model):
    """(SparseMoE module, its RouterInfo index) in the order the model reports router info: encoder, decoder."""
    encoder = [layer.mlp for layer in model.model.encoder.layers if layer.is_sparse]
    decoder = [layer.mlp for layer in model.model.decoder.layers if layer.is_sparse]
    return encoder, decoder


@pytest.mark.parametrize("top_k", [1, 2])
def test_gradients_reach_dense_router_and_exactly_the_used_experts(top_k):
    # 8 experts and a 5-token source / 4-token target: some experts must stay unused in every MoE layer.
    model = make_model(num_experts=8, num_experts_per_tok=top_k, router_z_loss_coef=0.01).train()
    batch = random_batch(batch_size=1, src_len=5, tgt_len=4)
    batch["labels"] = batch["labels"].clamp_min(3)  # every target position contributes to the loss
    out = model(**batch, output_router_logits=True)
    out.loss.backward()
    encoder_moe, decoder_moe = _sparse_layers(model)
    infos = list(zip(encoder_moe, out.encoder_router_info)) + list(zip(decoder_moe, out.decoder_router_info))
    used_and_unused = set()
    for moe, info in infos:
        for e, count in enumerate(info.tokens_per_expert.tolist()):
            used_and_unused.add(count > 0)
            for name in EXPERT_PARAMS:
                grad = getattr(moe.experts, name).grad
                received = grad is not None and bool(grad[e].abs().sum() > 0)
                assert received == (count > 0), (name, e, count)
    assert used_and_unused == {True, False}
    expert_params = {id(getattr(moe.experts, n)) for moe, _ in infos for n in EXPERT_PARAMS}
    for name, param in model.named_parameters():
        if id(param) not in expert_params:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_router_gets_gradient_from_aux_loss_alone():
    model = make_model().train()
    out = model(**random_batch(), output_router_logits=True)
    (out.aux_loss).backward()
    for moe in (m for m in model.modules() if isinstance(m, SparseMoE)):
        assert moe.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_identical_gradients(use_reentrant):
    """Training mode with RTS, capacity dropping and dropout: the recompute must replay the same routing, and
    the router losses keep their gradient also under reentrant checkpointing (which runs each layer under
    no_grad and reconnects only the tensors the layer returns)."""
    grads = []
    for checkpointing in (False, True):
        model = make_model(dropout=0.1, capacity_factor=0.5, min_capacity=0, router_jitter_noise=0.1,
                           router_aux_loss_coef=0.5, router_z_loss_coef=0.1).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
        torch.manual_seed(1)
        out = model(**random_batch(), output_router_logits=True)
        out.loss.backward()
        assert any(float(info.dropped_fraction) > 0 for info in out.encoder_router_info + out.decoder_router_info)
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_router_losses_keep_their_gradient_under_checkpointing(use_reentrant):
    """The aux and z losses alone (no cross-entropy) give every router the same gradient with checkpointing."""
    grads = []
    for checkpointing in (False, True):
        model = make_model(router_use_rts=False).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
        out = model(**random_batch(), output_router_logits=True)
        (out.aux_loss + out.z_loss).backward()
        grads.append([moe.gate.weight.grad.clone() for moe in model.modules() if isinstance(moe, SparseMoE)])
    assert all(grad.abs().sum() > 0 for grad in grads[1])
    for grad, expected in zip(grads[1], grads[0]):
        torch.testing.assert_close(grad, expected, atol=1e-7, rtol=1e-5)
