"""`hf-moe-mt merge` (Aggregation of Experts) and `hf-moe-mt upcycle` (dense → MoE)."""

import json

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, M2M100Config, M2M100ForConditionalGeneration

from hf_moe_mt import MoEMTConfig, MoEMTForConditionalGeneration, dropless_routing
from hf_moe_mt.cli import main as cli_main
from hf_moe_mt.tools.experts import moe_layers
from hf_moe_mt.tools.merge import merge
from hf_moe_mt.tools.upcycle import upcycle

INPUT_IDS = torch.tensor([[5, 17, 30, 40, 2], [6, 8, 9, 2, 1]])
DECODER_IDS = torch.tensor([[2, 5, 7, 9, 11], [2, 6, 6, 1, 1]])


def logits(model, **extra):
    """Teacher-forced logits at the real decoder positions, every MoE layer dropless."""
    model.eval()
    mask, decoder_mask = (INPUT_IDS != 1).long(), (DECODER_IDS != 1).long()
    with torch.no_grad(), dropless_routing(model):
        out = model(input_ids=INPUT_IDS, attention_mask=mask, decoder_input_ids=DECODER_IDS,
                    decoder_attention_mask=decoder_mask).logits
    return out[decoder_mask.bool()]


def shape(tokenizer, **overrides):
    return dict(vocab_size=len(tokenizer), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
                dropout=0.0, init_std=0.1, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id, **overrides)


@pytest.fixture(scope="module")
def tokenizer(run_dir):
    return AutoTokenizer.from_pretrained(run_dir / "tokenizer")


def save(model, tokenizer, folder):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- merge

@pytest.fixture(scope="module")
def two_models(tokenizer, tmp_path_factory):
    """A and B: identical non-expert weights, different experts and routers (as after expert-only training)."""
    root = tmp_path_factory.mktemp("aoe")
    torch.manual_seed(1)
    a = MoEMTForConditionalGeneration(MoEMTConfig(**shape(tokenizer, num_experts=4, expert_ffn_dim=48)))
    b = MoEMTForConditionalGeneration(MoEMTConfig(**shape(tokenizer, num_experts=2, expert_ffn_dim=48)))
    state = b.state_dict()
    for name, tensor in a.state_dict().items():
        if ".mlp.gate." not in name and ".mlp.experts." not in name:
            state[name] = tensor.clone()
    b.load_state_dict(state)
    return save(a, tokenizer, root / "a"), save(b, tokenizer, root / "b")


def restrict_router(model, first: int, last: int):
    """Mask every expert outside [first, last) in every router (the merged model 'restricted to A's half')."""
    for prefix in moe_layers(model.config).values():
        gate = model.get_submodule(prefix).gate
        original = gate.forward

        def forward(hidden_states, original=original):
            out = original(hidden_states).clone()
            out[:, :first] = float("-inf")
            out[:, last:] = float("-inf")
            return out
        gate.forward = forward


def test_merged_model_has_the_sum_of_experts_in_input_order(two_models, tmp_path):
    a_dir, b_dir = two_models
    report = merge([a_dir, b_dir], tmp_path / "ab")
    merged = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "ab")
    a, b = (AutoModelForSeq2SeqLM.from_pretrained(d) for d in (a_dir, b_dir))
    assert merged.config.num_experts == 6 and report["expert_offsets"] == [0, 4]
    for prefix in moe_layers(merged.config).values():
        for name in ("gate.weight", "experts.up_proj", "experts.down_proj_bias"):
            key = f"{prefix}.{name}"
            assert torch.equal(merged.state_dict()[key], torch.cat([a.state_dict()[key], b.state_dict()[key]]))
    info = json.loads((tmp_path / "ab" / "training_info.json").read_text())
    assert info["derivation"][-1]["tool"] == "merge" and info["derivation"][-1]["inputs"] == [str(a_dir), str(b_dir)]


def test_merged_model_restricted_to_one_inputs_experts_reproduces_its_logits(two_models, tmp_path):
    a_dir, b_dir = two_models
    merge([a_dir, b_dir], tmp_path / "ab")
    merged = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "ab")
    restrict_router(merged, 0, 4)
    expected_a = logits(AutoModelForSeq2SeqLM.from_pretrained(a_dir))
    torch.testing.assert_close(logits(merged), expected_a, rtol=0, atol=1e-5)
    merged_b = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "ab")
    restrict_router(merged_b, 4, 6)
    torch.testing.assert_close(logits(merged_b), logits(AutoModelForSeq2SeqLM.from_pretrained(b_dir)), rtol=0, atol=1e-5)
    assert not torch.allclose(logits(AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "ab")), expected_a, atol=1e-3)


def test_merge_averages_shared_weights_or_takes_the_first(two_models, tokenizer, tmp_path):
    a_dir, _ = two_models
    torch.manual_seed(2)
    c = MoEMTForConditionalGeneration(MoEMTConfig(**shape(tokenizer, num_experts=4, expert_ffn_dim=48)))
    c_dir = save(c, tokenizer, tmp_path / "c")
    merge([a_dir, c_dir], tmp_path / "avg")
    merge([a_dir, c_dir], tmp_path / "first", shared="first")
    a = AutoModelForSeq2SeqLM.from_pretrained(a_dir).state_dict()
    key = "model.encoder.layers.0.self_attn.q_proj.weight"
    averaged = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "avg").state_dict()[key]
    torch.testing.assert_close(averaged, (a[key] + c.state_dict()[key]) / 2)
    assert torch.equal(AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "first").state_dict()[key], a[key])


def test_merge_refuses_incompatible_inputs_in_one_line(two_models, tokenizer, run_dir, tmp_path, capsys):
    a_dir, _ = two_models
    wide = save(MoEMTForConditionalGeneration(MoEMTConfig(**{**shape(tokenizer, num_experts=4, expert_ffn_dim=48),
                                                             "d_model": 64})), tokenizer, tmp_path / "wide")
    top2 = save(MoEMTForConditionalGeneration(MoEMTConfig(**shape(tokenizer, num_experts=4, expert_ffn_dim=48,
                                                                  num_experts_per_tok=2))), tokenizer, tmp_path / "k2")
    cases = (([str(a_dir), str(wide)], "d_model is 64 there and 32 in"),
             ([str(a_dir), str(top2)], "num_experts_per_tok is 2 there"),
             ([str(a_dir)], "at least two input models"),
             ([str(a_dir), str(run_dir / "corpus")], "has no config.json"))
    for inputs, message in cases:
        assert cli_main(["merge", *inputs, str(tmp_path / "out")]) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith("hf-moe-mt merge: error: ") and message in line, line
    assert not (tmp_path / "out").exists()


def test_merge_refuses_models_with_different_tokenizers(two_models, tmp_path):
    import shutil

    a_dir, b_dir = two_models
    b_copy = tmp_path / "b"
    shutil.copytree(b_dir, b_copy)  # the same model with two token ids swapped in its tokenizer
    vocab = json.loads((b_copy / "tokenizer.json").read_text())
    first, second = sorted(vocab["model"]["vocab"], key=vocab["model"]["vocab"].get)[10:12]
    vocab["model"]["vocab"][first], vocab["model"]["vocab"][second] = (vocab["model"]["vocab"][second],
                                                                       vocab["model"]["vocab"][first])
    (b_copy / "tokenizer.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match="their tokenizers differ"):
        merge([a_dir, b_copy], tmp_path / "out")


# --------------------------------------------------------------------------- upcycle

@pytest.fixture(scope="module")
def dense_dir(tokenizer, tmp_path_factory):
    torch.manual_seed(3)
    config = MoEMTConfig(**shape(tokenizer, encoder_sparse_step=0, decoder_sparse_step=0, expert_ffn_dim=64))
    return save(MoEMTForConditionalGeneration(config), tokenizer, tmp_path_factory.mktemp("dense") / "dense")


@pytest.fixture(scope="module")
def m2m100_dir(tokenizer, tmp_path_factory):
    """transformers' M2M100 built from its config (the architecture of M2M100 and dense NLLB-200)."""
    torch.manual_seed(4)
    model = M2M100ForConditionalGeneration(M2M100Config(**shape(tokenizer), encoder_layerdrop=0.0,
                                                        decoder_layerdrop=0.0))
    return save(model, tokenizer, tmp_path_factory.mktemp("m2m") / "m2m100")


@pytest.mark.parametrize("source", ["dense_dir", "m2m100_dir"])
def test_upcycled_model_equals_the_dense_model_at_initialisation(source, request, tmp_path):
    source_dir = request.getfixturevalue(source)
    report = upcycle(source_dir, tmp_path / "moe", num_experts=4)
    upcycled = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "moe")
    dense = AutoModelForSeq2SeqLM.from_pretrained(source_dir)
    assert type(upcycled) is MoEMTForConditionalGeneration and upcycled.config.num_experts == 4
    assert report["layers"] == ["encoder.1", "decoder.1"] and upcycled.config.num_experts_per_tok == 2
    expected = logits(dense)
    assert expected.abs().mean() > 0.1  # a model whose logits mean something
    torch.testing.assert_close(logits(upcycled), expected, rtol=0, atol=1e-5)
    # The same search for both: an upcycled M2M100 gets this package's generation defaults (the n-gram guard).
    search = {"input_ids": INPUT_IDS[:1], "num_beams": 2, "max_new_tokens": 6, "forced_bos_token_id": 5,
              "no_repeat_ngram_size": 0}
    generated = [dense.eval().generate(**search), upcycled.eval().generate(**search, max_ngram_repeats=0)]
    assert torch.equal(*generated)
    assert AutoTokenizer.from_pretrained(tmp_path / "moe").get_vocab() == AutoTokenizer.from_pretrained(
        source_dir).get_vocab()  # tokenizer carried over


def test_upcycled_top1_layer_scales_the_dense_ffn_by_the_router_probability(dense_dir, tmp_path):
    upcycle(dense_dir, tmp_path / "k1", num_experts=4, top_k=1)
    moe = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "k1").model.encoder.layers[1].mlp.eval()
    ffn = AutoModelForSeq2SeqLM.from_pretrained(dense_dir).model.encoder.layers[1].mlp.eval()
    x = torch.randn(7, 32)
    with torch.no_grad():
        out, _ = moe(x)
        probability = torch.softmax(moe.gate(x), dim=-1).max(dim=-1).values
        torch.testing.assert_close(out, probability.unsqueeze(1) * ffn(x), rtol=0, atol=1e-6)


def test_upcycle_copies_the_ffn_into_every_expert_with_optional_noise(dense_dir, tmp_path):
    upcycle(dense_dir, tmp_path / "exact", num_experts=3, sparse_step=1, seed=5)
    upcycle(dense_dir, tmp_path / "noisy", num_experts=3, sparse_step=1, expert_noise=0.01, seed=5)
    dense = AutoModelForSeq2SeqLM.from_pretrained(dense_dir).state_dict()
    exact = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "exact")
    noisy = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "noisy").state_dict()
    assert list(moe_layers(exact.config)) == ["encoder.0", "encoder.1", "decoder.0", "decoder.1"]
    for prefix in moe_layers(exact.config).values():
        for e in range(3):
            assert torch.equal(exact.state_dict()[f"{prefix}.experts.up_proj"][e], dense[f"{prefix}.up_proj.weight"])
            assert torch.equal(exact.state_dict()[f"{prefix}.experts.down_proj_bias"][e], dense[f"{prefix}.down_proj.bias"])
        difference = noisy[f"{prefix}.experts.up_proj"] - dense[f"{prefix}.up_proj.weight"]
        assert 0.001 < difference.std() / dense[f"{prefix}.up_proj.weight"].std() < 0.1
        assert torch.equal(noisy[f"{prefix}.gate.weight"], exact.state_dict()[f"{prefix}.gate.weight"])  # same seed


def test_upcycle_refuses_marian_sparse_and_unknown_models_in_one_line(dense_dir, exported_dir, tmp_path, capsys):
    marian = tmp_path / "marian"
    marian.mkdir()
    (marian / "config.json").write_text(json.dumps({"model_type": "marian"}))
    bart = tmp_path / "bart"
    bart.mkdir()
    (bart / "config.json").write_text(json.dumps({"model_type": "bart"}))
    cases = ((marian, "post-LayerNorm"), (bart, "holds a 'bart' model"), (exported_dir, "already has MoE layers"),
             (tmp_path / "missing", "not a model folder"))
    for source, message in cases:
        assert cli_main(["upcycle", str(source), str(tmp_path / "out"), "--num-experts", "4", "--tokenizer",
                         str(dense_dir)]) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith("hf-moe-mt upcycle: error: ") and message in line, line
    assert cli_main(["upcycle", str(dense_dir), str(tmp_path / "out"), "--num-experts", "4", "--sparse-step", "5"]) == 2
    assert "make no layer sparse" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
