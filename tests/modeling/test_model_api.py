"""The transformers API around the model: optional outputs, tuples, embeddings resizing, positions, padding."""

import pytest
import torch

from hf_moe_mt import MoEMTModel

from .conftest import make_model, random_batch


def test_hidden_states_and_attentions_on_request():
    model = make_model(attn_implementation="eager")
    batch = random_batch()
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True, output_attentions=True)
    assert len(out.encoder_hidden_states) == len(out.decoder_hidden_states) == 3  # embeddings + 2 layers
    assert out.encoder_hidden_states[0].shape == (3, 9, 32) and out.decoder_hidden_states[-1].shape == (3, 7, 32)
    assert out.encoder_attentions[0].shape == (3, 4, 9, 9)
    assert out.decoder_attentions[0].shape == (3, 4, 7, 7) and out.cross_attentions[0].shape == (3, 4, 7, 9)
    assert torch.all(out.encoder_attentions[0][1, :, :, 7:] == 0)  # padding gets no attention
    assert out.encoder_router_logits is None and out.encoder_router_info is None


def test_eager_attention_equals_sdpa():
    batch = random_batch()
    with torch.no_grad():
        eager = make_model(attn_implementation="eager")(**batch).logits
        sdpa = make_model(attn_implementation="sdpa")(**batch).logits
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-5)


def test_registered_attention_backend_serves_every_attention():
    """An attention function registered with transformers' AttentionInterface (plus the mask format it wants) is
    what every self- and cross-attention calls, with the model's standard [B, H, S, Dh] arguments."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    calls = []

    def counting_sdpa(module, query, key, value, attention_mask, **kwargs):
        calls.append((module.is_causal, query.shape[1:], key.shape[1:]))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("test_counting_sdpa", counting_sdpa)
    AttentionMaskInterface.register("test_counting_sdpa", sdpa_mask)
    batch = random_batch()
    with torch.no_grad():
        expected = make_model(attn_implementation="sdpa")(**batch).logits
        logits = make_model(attn_implementation="test_counting_sdpa")(**batch).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    heads, head_dim = 4, 8
    assert sorted(calls) == sorted([(False, (heads, 9, head_dim), (heads, 9, head_dim))] * 2  # encoder self
                                   + [(True, (heads, 7, head_dim), (heads, 7, head_dim))] * 2  # decoder self
                                   + [(False, (heads, 7, head_dim), (heads, 9, head_dim))] * 2)  # cross


def test_return_dict_false_gives_tuple_led_by_loss(tiny_model):
    batch = random_batch()
    with torch.no_grad():
        as_tuple = tiny_model(**batch, return_dict=False)
        as_dict = tiny_model(**batch)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], as_dict.loss) and torch.equal(as_tuple[1], as_dict.logits)


def test_base_model_returns_decoder_states_and_router_outputs_on_request(tiny_config):
    model = MoEMTModel(tiny_config).eval()
    batch = random_batch()
    inputs = (batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        out = model(*inputs, decoder_input_ids=batch["labels"].clamp_min(3))
        routed = model(*inputs, decoder_input_ids=batch["labels"].clamp_min(3), output_router_logits=True)
    assert out.last_hidden_state.shape == (3, 7, 32) and len(out.to_tuple()) == 3  # states, cache, encoder states
    assert out.aux_loss is None and out.encoder_router_logits is None and out.decoder_router_info is None
    torch.testing.assert_close(routed.last_hidden_state, out.last_hidden_state, rtol=0, atol=0)
    assert routed.aux_loss.ndim == 0 and len(routed.encoder_router_logits) == len(routed.decoder_router_info) == 1


@pytest.mark.parametrize("labels", [False, True])
def test_router_outputs_only_on_request_or_with_labels(tiny_model, labels):
    """Without labels or `output_router_logits` the output has a dense model's fields; labels add the router
    losses that are part of the loss (not the logits); `output_router_logits` adds everything."""
    batch = random_batch()
    if not labels:
        batch.pop("labels")
        batch["decoder_input_ids"] = torch.full((3, 4), 5)
    with torch.no_grad():
        out = tiny_model(**batch)
        routed = tiny_model(**batch, output_router_logits=True)
    assert (out.aux_loss is not None) == labels and (out.z_loss is not None) == labels
    assert out.encoder_router_logits is None and out.encoder_router_info is None and out.decoder_router_info is None
    # (loss,) logits, cache, encoder states (+ aux, z and both per stack)
    assert len(out.to_tuple()) == (4 + 6 if labels else 3)
    assert len(routed.encoder_router_logits) == len(routed.decoder_router_logits) == 1
    torch.testing.assert_close(routed.logits, out.logits, rtol=0, atol=0)
    if labels:
        torch.testing.assert_close(routed.loss, out.loss, rtol=0, atol=0)
        torch.testing.assert_close(routed.aux_loss, out.aux_loss, rtol=0, atol=0)


def test_resize_token_embeddings_keeps_sharing_and_old_rows(tiny_model):
    old = tiny_model.model.shared.weight.detach().clone()
    tiny_model.resize_token_embeddings(120)
    shared = tiny_model.model.shared
    assert shared.weight.shape == (120, 32) and tiny_model.config.vocab_size == 120
    assert tiny_model.model.encoder.embed_tokens is shared and tiny_model.model.decoder.embed_tokens is shared
    assert tiny_model.lm_head.weight is shared.weight and shared.embed_scale == 32 ** 0.5
    assert torch.equal(shared.weight[:96], old)
    batch = random_batch()
    batch["labels"][0, 0] = 110
    with torch.no_grad():
        assert tiny_model(**batch).logits.shape == (3, 7, 120)


def test_left_and_right_padding_give_the_same_encoding():
    model = make_model()
    batch = random_batch()
    right_ids, right_mask = batch["input_ids"], batch["attention_mask"]
    lengths = right_mask.sum(1)
    left_ids, left_mask = torch.full_like(right_ids, 1), torch.zeros_like(right_mask)
    for row, length in enumerate(lengths.tolist()):
        left_ids[row, -length:], left_mask[row, -length:] = right_ids[row, :length], 1
    with torch.no_grad():
        right = model.get_encoder()(input_ids=right_ids, attention_mask=right_mask).last_hidden_state
        left = model.get_encoder()(input_ids=left_ids, attention_mask=left_mask).last_hidden_state
    for row, length in enumerate(lengths.tolist()):
        torch.testing.assert_close(right[row, :length], left[row, -length:], atol=1e-5, rtol=1e-5)


def test_decoder_padding_is_not_routed():
    model = make_model()
    batch = random_batch()
    decoder_mask = (batch["labels"] != -100).long()
    with torch.no_grad():
        out = model(**batch, decoder_attention_mask=decoder_mask, output_router_logits=True)
    assert torch.all(out.decoder_router_logits[0][decoder_mask == 0] == 0)
    assert torch.all(out.decoder_router_logits[0][decoder_mask == 1] != 0)


def test_learned_positions_train_and_round_trip(tmp_path):
    model = make_model(position_embedding_type="learned")
    positions = model.model.encoder.embed_positions
    assert isinstance(positions.weight, torch.nn.Parameter) and positions.weight.shape == (64, 32)
    model.train()
    model(**random_batch()).loss.backward()
    assert positions.weight.grad.abs().sum() > 0
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    assert torch.equal(loaded.model.encoder.embed_positions.weight, positions.weight)


def test_too_long_input_raises_one_line_error(tiny_model):
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=64") as error:
        tiny_model(input_ids=torch.full((1, 65), 5), decoder_input_ids=torch.full((1, 2), 5))
    assert "\n" not in str(error.value)


def test_model_in_training_mode_routes_with_rts_and_capacity():
    model = make_model(capacity_factor=0.5, min_capacity=0).train()
    assert model.config.router_use_rts
    out = model(**random_batch(), output_router_logits=True)
    assert all(0 < float(info.dropped_fraction) < 1 for info in out.encoder_router_info)


def test_router_outputs_survive_transformers_exporter_casts(tiny_model):
    """transformers' exporters cast every tensor of a model output in place (dtype, device), RouterInfo's too."""
    from transformers.exporters.utils import cast_leaf_tensors

    with torch.no_grad():
        out = tiny_model(**random_batch(), output_router_logits=True)
    cast = cast_leaf_tensors(out, torch.bfloat16, torch.device("cpu"))
    info = cast.encoder_router_info[0]
    assert info.router_logits.dtype == info.aux_loss.dtype == torch.bfloat16
    assert info.tokens_per_expert.dtype == torch.int64  # integer tensors keep their dtype
