"""transformers' own common model tests (ModelTesterMixin, GenerationTesterMixin, ConfigTester) on MoE-MT.

Written like transformers' `tests/models/m2m_100/test_modeling_m2m_100.py` and NLLB-MoE's tester, and run by
`../shared/peer-tests/run-transformers-common.sh` as `tests/models/under_test/test_modeling_under_test.py`
inside a copy of transformers' test tree (hence the relative imports). `tests/conformance/test_peer_suite.py`
runs it from the default suite; it is not collected on its own.
"""

import copy
import tempfile
import unittest

from transformers import is_torch_available
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES
from transformers.testing_utils import require_torch, torch_device

from ...generation.test_utils import GenerationTesterMixin
from ...test_configuration_common import ConfigTester
from ...test_modeling_common import ModelTesterMixin, ids_tensor
from ...test_pipeline_mixin import PipelineTesterMixin

if is_torch_available():
    import torch

    from hf_moe_mt import MoEMTConfig, MoEMTForConditionalGeneration, MoEMTModel
    from hf_moe_mt.modeling_moe_mt import MoEMTDecoder, MoEMTEncoder

# Every test the suite skips (test-name pattern → why). Each is skipped by transformers' own NLLB-MoE or Switch
# tester too, for the same reason unless the entry says otherwise; `test_peer_suite.py` fails on a skip not listed.
EXPECTED_SKIPS = {
    # hardware and optional packages this machine lacks (NLLB-MoE and Switch: the same)
    r"test_(eager_matches_fa\d_generate|flash_attn.*|flash_attention.*)": "needs flash-attention (and a GPU)",
    r"test_flash_attn_kernels(_mps)?_inference_equivalence|test_kernels_can_load_without_crashing":
        "needs the `kernels` library, or an Apple GPU (MPS)",
    r"test_(can_load_with_device_context_manager|can_load_with_global_device_set|cpu_offload|disk_offload_bin|"
    r"disk_offload_safetensors|flex_attention_with_grads|resize_embeddings_untied_with_deepspeed|"
    r"resize_tokens_embeddings_with_deepspeed|sdpa_can_compile_dynamic|sdpa_can_dispatch_on_flash)":
        "needs a GPU",
    r"test_(model_parallel_beam_search|model_parallelism|resize_embeddings_untied_with_deepspeed_multi_gpu|"
    r"resize_tokens_embeddings_with_deepspeed_multi_gpu)": "needs several GPUs",
    r"test_generate_with_quant_cache": "needs optimum-quanto",
    # marked @slow in transformers (NLLB-MoE and Switch: the same without RUN_SLOW=1)
    r"test_(torch|onnx|executorch)_export_\w+|test_eager_matches_sdpa_generate|test_torch_compile_for_training":
        "test is slow (runs with RUN_SLOW=1)",
    # pipeline tests load transformers' tiny Hub checkpoint of the architecture (offline: none), or cover other
    # tasks (NLLB-MoE: every pipeline test skipped by its tester; Switch: cannot load its tiny checkpoint)
    r"test_pipeline_\w+": "no tiny Hub checkpoint of this architecture, task not in pipeline_model_mapping, or "
                          "needs timm / av / pytesseract",
    # what the architecture does not have (NLLB-MoE and Switch: the same)
    r"test_(model_rope_\w+|vision_axial_rope)": "no rotary position embeddings",
    r"test_resize_position_vector_embeddings": "sinusoidal positions: no position-embedding matrix to resize",
    r"test_sliding_window_mask": "no sliding-window attention",
    r"test_(attn_implementation_composite_models|can_set_attention_dynamically_composite_model|"
    r"internal_model_config_and_subconfig_are_same|sdpa_can_dispatch_composite_models)":
        "not a composite model (one config, no sub-configs); the SDPA one says 'does not support SDPA' for every "
        "non-composite model",
    r"test_(left_padding_compatibility|causal_lm_loss_honors_shift_labels|generate_continue_from_inputs_embeds)":
        "decoder-only models only",
    r"test_(forward_with_logits_to_keep|generate_methods_with_logits_to_keep)": "no `logits_to_keep` argument",
    r"test_generate_with_and_without_position_ids": "positions come from the attention mask, no `position_ids`",
    r"test_generate_with_mtp": "no multi-token-prediction heads",
    r"test_recurrent_layers_mask_padding_on_continued_forward": "no recurrent layers",
    r"test_tp_plan_matches_params": "no tensor-parallel plan (expert parallelism is applied from outside)",
    r"test_(reverse_loading_mapping|can_load_from_already_mapped_keys)": "no checkpoint key conversion mapping",
    r"test_can_capture_specific_layers_hidden_states":
        "the test indexes hidden states by `num_hidden_layers` (the encoder's), not per stack",
    r"test_load_save_without_tied_weights": "encoder, decoder and shared embeddings are always tied",
    r"test_moe_models_record_router_logits":
        "checks only models whose experts use transformers' `@use_experts_implementation`",
    r"test_eager_matches_batched_and_grouped_inference_\w+":
        "experts are not dispatched through transformers' experts interface (Switch: the same; NLLB-MoE: no SDPA)",
    # reached later than NLLB-MoE and Switch, which stop at an earlier check (they lack the capability)
    r"test_(generate_with_static_cache|generate_from_inputs_embeds_with_static_cache)":
        "the static cache runs here, but these two skip every encoder-decoder model (M2M100 too); NLLB-MoE and "
        "Switch skip them earlier, having no static cache; static-cache decoding is covered by "
        "test_generate_compile_model_forward_fullgraph, test_generate_compilation_all_outputs and "
        "test_static_cache_no_recompile_with_smaller_length",
    r"test_(eager|sdpa)_padding_matches_padding_free_with_position_ids":
        "packed (padding-free) inputs are tested for decoder-only models only; NLLB-MoE and Switch skip earlier "
        "(no attention-backend support)",
}

# The common tests pick a class's role (base model, seq2seq LM) from transformers' static auto tables, which
# `AutoModel.register` does not fill; an in-tree model is listed there.
MODEL_MAPPING_NAMES.setdefault("moe_mt", "MoEMTModel")
MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.setdefault("moe_mt", "MoEMTForConditionalGeneration")


def prepare_moe_mt_inputs_dict(config, input_ids, decoder_input_ids, attention_mask=None, decoder_attention_mask=None):
    if attention_mask is None:
        attention_mask = input_ids.ne(config.pad_token_id)
    if decoder_attention_mask is None:
        decoder_attention_mask = decoder_input_ids.ne(config.pad_token_id)
    return {
        "input_ids": input_ids,
        "decoder_input_ids": decoder_input_ids,
        "attention_mask": attention_mask,
        "decoder_attention_mask": decoder_attention_mask,
    }


class MoEMTModelTester:
    """NLLB-MoE's tester sizes: MoE in every 2nd encoder layer and every decoder layer, 4 experts, top-1.

    `min_capacity=100` is NLLB-MoE's `expert_capacity=100`: no (token, expert) pair is dropped in these tiny
    batches, so a sentence gives the same output alone and inside a batch (what the batching and padding
    tests compare); generation is dropless anyway.
    """

    def __init__(
        self,
        parent,
        batch_size=13,
        seq_length=7,
        is_training=True,
        use_labels=False,
        vocab_size=99,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=4,
        hidden_act="relu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        max_position_embeddings=50,
        eos_token_id=2,
        pad_token_id=1,
        bos_token_id=0,
        num_experts=4,
        encoder_sparse_step=2,
        decoder_sparse_step=1,
        min_capacity=100,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.use_labels = use_labels
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.max_position_embeddings = max_position_embeddings
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.num_experts = num_experts
        self.encoder_sparse_step = encoder_sparse_step
        self.decoder_sparse_step = decoder_sparse_step
        self.min_capacity = min_capacity

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        input_ids[:, -1] = self.eos_token_id  # Eos Token
        decoder_input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        # no pad token in the middle of a sequence (as in M2M100's and NLLB-MoE's testers)
        input_ids = input_ids.clamp(self.pad_token_id + 1)
        decoder_input_ids = decoder_input_ids.clamp(self.pad_token_id + 1)
        config = self.get_config()
        return config, prepare_moe_mt_inputs_dict(config, input_ids, decoder_input_ids)

    def get_config(self):
        return MoEMTConfig(
            vocab_size=self.vocab_size,
            d_model=self.hidden_size,
            encoder_layers=self.num_hidden_layers,
            decoder_layers=self.num_hidden_layers,
            encoder_attention_heads=self.num_attention_heads,
            decoder_attention_heads=self.num_attention_heads,
            encoder_ffn_dim=self.intermediate_size,
            decoder_ffn_dim=self.intermediate_size,
            expert_ffn_dim=self.intermediate_size,
            activation_function=self.hidden_act,
            dropout=self.hidden_dropout_prob,
            attention_dropout=self.attention_probs_dropout_prob,
            max_position_embeddings=self.max_position_embeddings,
            eos_token_id=self.eos_token_id,
            bos_token_id=self.bos_token_id,
            pad_token_id=self.pad_token_id,
            num_experts=self.num_experts,
            encoder_sparse_step=self.encoder_sparse_step,
            decoder_sparse_step=self.decoder_sparse_step,
            min_capacity=self.min_capacity,
        )

    def prepare_config_and_inputs_for_common(self):
        return self.prepare_config_and_inputs()

    def create_and_check_decoder_model_past_large_inputs(self, config, inputs_dict):
        model = MoEMTModel(config=config).get_decoder().to(torch_device).eval()
        input_ids = inputs_dict["input_ids"]
        attention_mask = inputs_dict["attention_mask"]

        # first forward pass
        outputs = model(input_ids, attention_mask=attention_mask, use_cache=True)
        output, past_key_values = outputs.to_tuple()

        # three more tokens, some of them padding
        next_tokens = ids_tensor((self.batch_size, 3), config.vocab_size)
        next_attn_mask = ids_tensor((self.batch_size, 3), 2)
        next_input_ids = torch.cat([input_ids, next_tokens], dim=-1)
        next_attention_mask = torch.cat([attention_mask, next_attn_mask], dim=-1)

        output_from_no_past = model(next_input_ids, attention_mask=next_attention_mask)["last_hidden_state"]
        output_from_past = model(next_tokens, attention_mask=next_attention_mask, past_key_values=past_key_values)[
            "last_hidden_state"
        ]

        # select random slice
        random_slice_idx = ids_tensor((1,), output_from_past.shape[-1]).item()
        output_from_no_past_slice = output_from_no_past[:, -3:, random_slice_idx].detach()
        output_from_past_slice = output_from_past[:, :, random_slice_idx].detach()
        self.parent.assertTrue(output_from_past_slice.shape[1] == next_tokens.shape[1])
        self.parent.assertTrue(torch.allclose(output_from_past_slice, output_from_no_past_slice, atol=1e-3))

    def check_encoder_decoder_model_standalone(self, config, inputs_dict):
        model = MoEMTModel(config=config).to(torch_device).eval()
        outputs = model(**inputs_dict)
        encoder_last_hidden_state = outputs.encoder_last_hidden_state
        last_hidden_state = outputs.last_hidden_state

        with tempfile.TemporaryDirectory() as tmpdirname:
            encoder = model.get_encoder()
            encoder.save_pretrained(tmpdirname)
            encoder = MoEMTEncoder.from_pretrained(tmpdirname).to(torch_device)
        encoder_last_hidden_state_2 = encoder(inputs_dict["input_ids"], attention_mask=inputs_dict["attention_mask"])[
            0
        ]
        self.parent.assertTrue((encoder_last_hidden_state_2 - encoder_last_hidden_state).abs().max().item() < 1e-3)

        with tempfile.TemporaryDirectory() as tmpdirname:
            decoder = model.get_decoder()
            decoder.save_pretrained(tmpdirname)
            decoder = MoEMTDecoder.from_pretrained(tmpdirname).to(torch_device)
        last_hidden_state_2 = decoder(
            input_ids=inputs_dict["decoder_input_ids"],
            attention_mask=inputs_dict["decoder_attention_mask"],
            encoder_hidden_states=encoder_last_hidden_state,
            encoder_attention_mask=inputs_dict["attention_mask"],
        )[0]
        self.parent.assertTrue((last_hidden_state_2 - last_hidden_state).abs().max().item() < 1e-3)


@require_torch
class MoEMTModelTest(ModelTesterMixin, GenerationTesterMixin, PipelineTesterMixin, unittest.TestCase):
    all_model_classes = (MoEMTModel, MoEMTForConditionalGeneration) if is_torch_available() else ()
    pipeline_model_mapping = {"feature-extraction": MoEMTModel} if is_torch_available() else {}
    is_encoder_decoder = True
    test_missing_keys = True
    # the check runs for models whose configuration file carries a copyright year >= 2023; ours has no such line
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        self.model_tester = MoEMTModelTester(self)
        self.config_tester = ConfigTester(self, config_class=MoEMTConfig)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_save_load_strict(self):
        config, inputs_dict = self.model_tester.prepare_config_and_inputs()
        for model_class in self.all_model_classes:
            model = model_class(config)
            with tempfile.TemporaryDirectory() as tmpdirname:
                model.save_pretrained(tmpdirname)
                model2, info = model_class.from_pretrained(tmpdirname, output_loading_info=True)
            self.assertEqual(info["missing_keys"], set())

    def test_decoder_model_past_with_large_inputs(self):
        # As NLLB-MoE's tester: a dense decoder. With MoE layers, float rounding of the other shapes (cached vs
        # full sequence) can flip a near-tied top-1 choice, and the comparison at atol 1e-3 fails on an honest model.
        config, inputs_dict = self.model_tester.prepare_config_and_inputs()
        config.decoder_sparse_step = 0
        self.model_tester.create_and_check_decoder_model_past_large_inputs(config, inputs_dict)

    def test_encoder_decoder_model_standalone(self):
        config_and_inputs = self.model_tester.prepare_config_and_inputs_for_common()
        self.model_tester.check_encoder_decoder_model_standalone(*config_and_inputs)

    def test_inputs_embeds(self):
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config).to(torch_device).eval()
            inputs = copy.deepcopy(self._prepare_for_class(inputs_dict, model_class))
            encoder_input_ids = inputs.pop("input_ids")
            decoder_input_ids = inputs.pop("decoder_input_ids", encoder_input_ids)
            wte = model.get_input_embeddings()
            inputs["inputs_embeds"] = wte(encoder_input_ids)
            inputs["decoder_inputs_embeds"] = wte(decoder_input_ids)
            with torch.no_grad():
                model(**inputs)[0]

    def test_get_loss(self):
        config, input_dict = self.model_tester.prepare_config_and_inputs()
        input_dict["output_router_logits"] = True
        input_dict["labels"] = input_dict["input_ids"]
        model = MoEMTForConditionalGeneration(config).eval().to(torch_device)
        out = model(**input_dict)
        self.assertIsNotNone(out.loss)
        self.assertIsNotNone(out["encoder_router_logits"])
        self.assertIsNotNone(out["decoder_router_logits"])

    @unittest.skip(
        reason="This architecture has tied weights by default and there is no way to remove it, check: https://github.com/huggingface/transformers/pull/31771#issuecomment-2210915245"
    )
    def test_load_save_without_tied_weights(self):
        pass
