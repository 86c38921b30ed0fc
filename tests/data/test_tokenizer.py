"""MoEMTTokenizer: round trips in five scripts, language tokens, src/tgt layout, translation inputs,
AutoTokenizer loading with and without hf_moe_mt imported."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from hf_moe_mt import MoEMTTokenizer
from hf_moe_mt.data.tokenizer_training import BYTE_TOKENS, SPECIAL_TOKENS, balanced_sentences, train_tokenizer

from .conftest import FIXTURE_LANGUAGES, TINY_VOCAB

# Sentences NOT in the training fixtures (several characters are unseen: byte fallback must spell them)
SAMPLES = {
    "latin": "Größere Äpfel, naïve café — déjà vu!  Two  spaces\tand a tab.",
    "cyrillic": "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "arabic": "نص حكيم له سر قاطع وذو شأن عظيم مكتوب على ثوب أخضر.",
    "devanagari": "ऋषियों को सताने वाले दुष्ट राक्षसों के राजा रावण का सर्वनाश करने वाले विष्णु।",
    "cjk": "天地玄黄，宇宙洪荒。日月盈昃，辰宿列张。ｶﾀｶﾅ と ひらがな。",
}


@pytest.mark.parametrize("script", sorted(SAMPLES))
def test_round_trip_after_normalisation(tokenizer, script):
    text = SAMPLES[script]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids  # byte fallback: nothing is unknown
    normalized = tokenizer.backend_tokenizer.normalizer.normalize_str(text)
    assert tokenizer.decode(ids) == normalized
    with_specials = tokenizer(text)["input_ids"]
    assert tokenizer.decode(with_specials, skip_special_tokens=True) == normalized


def test_normalisation_is_nfkc_with_single_spaces(tokenizer):
    normalize = tokenizer.backend_tokenizer.normalizer.normalize_str
    assert normalize("  a\t\tb  ｶﾀｶﾅ ﬁ ") == "a b カタカナ fi"


def test_unseen_characters_use_byte_pieces(tokenizer):
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("🦜", add_special_tokens=False)["input_ids"])
    assert tokens[-4:] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x9C>"]


def test_special_and_language_tokens_are_single_ids(tokenizer):
    assert tokenizer.language_codes == sorted(["en", *FIXTURE_LANGUAGES])
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2, 3)
    ids = tokenizer.lang_code_to_id
    assert sorted(ids.values()) == list(range(5, 5 + len(ids)))  # right after the specials, distinct
    for code, token_id in ids.items():
        assert tokenizer(f"__{code}__", add_special_tokens=False)["input_ids"] == [token_id]
        assert tokenizer.get_lang_id(code) == tokenizer.get_lang_id(f"__{code}__") == token_id
        assert f"__{code}__" in tokenizer.all_special_tokens
    assert tokenizer.convert_tokens_to_ids(list(BYTE_TOKENS[:2])) == [5 + len(ids), 6 + len(ids)]
    assert len(tokenizer) == TINY_VOCAB


def test_source_and_target_layout(tokenizer):
    tokenizer.src_lang, tokenizer.tgt_lang = "de", "fr"
    batch = tokenizer(["Guten Morgen!"], text_target=["Bonjour !"])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert ids[0] == tokenizer.get_lang_id("de") and ids[-1] == tokenizer.eos_token_id
    assert labels[0] == tokenizer.get_lang_id("fr") and labels[-1] == tokenizer.eos_token_id
    assert ids[1:-1] == tokenizer("Guten Morgen!", add_special_tokens=False)["input_ids"]
    assert tokenizer("Hallo")["input_ids"][0] == tokenizer.get_lang_id("de")  # back in source mode
    tokenizer.tgt_lang = None  # denoising: the target keeps the source language
    assert tokenizer(text_target="Hallo")["input_ids"][0] == tokenizer.get_lang_id("de")


def test_translation_inputs_force_the_target_language(tokenizer):
    inputs = tokenizer._build_translation_inputs(["Где находится вокзал?"], "pt", src_lang="ru", tgt_lang="zh")
    assert inputs["forced_bos_token_id"] == tokenizer.get_lang_id("zh")
    assert inputs["input_ids"][0, 0].item() == tokenizer.get_lang_id("ru") and inputs["input_ids"][0, -1].item() == 2
    assert tokenizer.src_lang == "ru"
    with pytest.raises(ValueError, match="needs both `src_lang` and `tgt_lang`"):
        tokenizer._build_translation_inputs(["x"], "pt", src_lang="ru", tgt_lang=None)
    with pytest.raises(ValueError, match="unknown language 'xx'; this tokenizer knows ar, de, en"):
        tokenizer._build_translation_inputs(["x"], "pt", src_lang="xx", tgt_lang="en")
    with pytest.raises(ValueError, match="unknown language 'pt'"):
        tokenizer.tgt_lang = "pt"
    with pytest.raises(ValueError, match="unknown language 'pt'"):
        AutoTokenizer.from_pretrained(tokenizer.name_or_path, src_lang="pt")


def test_translation_inputs_drive_generate(tokenizer):
    """The translation path end to end: inputs + forced_bos_token_id -> generate starts with eos, then the
    target language token (a tiny untrained MoE model)."""
    from hf_moe_mt import MoEMTConfig, MoEMTForConditionalGeneration

    config = MoEMTConfig(vocab_size=len(tokenizer), d_model=16, encoder_layers=2, decoder_layers=2,
                         encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                         decoder_ffn_dim=32, expert_ffn_dim=32, num_experts=4)
    model = MoEMTForConditionalGeneration(config).eval()
    inputs = tokenizer._build_translation_inputs(["Der Fluss fließt."], "pt", src_lang="de", tgt_lang="hi")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert output[0, :2].tolist() == [tokenizer.eos_token_id, tokenizer.get_lang_id("hi")]


def test_saved_files_load_through_auto_tokenizer(tokenizer_dir, tokenizer):
    assert sorted(os.listdir(tokenizer_dir)) == ["tokenization_moe_mt.py", "tokenizer.json", "tokenizer_config.json"]
    config = json.load(open(os.path.join(tokenizer_dir, "tokenizer_config.json")))
    assert config["tokenizer_class"] == "MoEMTTokenizer"
    assert config["auto_map"]["AutoTokenizer"][0] == "tokenization_moe_mt.MoEMTTokenizer"
    loaded = AutoTokenizer.from_pretrained(tokenizer_dir, src_lang="ar", tgt_lang="en")
    assert type(loaded) is MoEMTTokenizer and loaded.src_lang == "ar"
    text = SAMPLES["arabic"]
    tokenizer.src_lang = "ar"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_loads_as_remote_code_without_hf_moe_mt(tokenizer_dir):
    script = (
        "import sys; from transformers import AutoTokenizer;"
        f"tok = AutoTokenizer.from_pretrained({tokenizer_dir!r}, trust_remote_code=True, src_lang='hi');"
        "assert 'hf_moe_mt' not in sys.modules, 'hf_moe_mt was imported';"
        "out = tok._build_translation_inputs(['नमस्ते'], None, src_lang='hi', tgt_lang='en');"
        "print(type(tok).__name__, out['input_ids'][0][0], out['forced_bos_token_id'])"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", "HF_MODULES_CACHE": os.path.join(tokenizer_dir, "..", "modules")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd="/", env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert result.stdout.split() == ["MoEMTTokenizer", str(loaded.get_lang_id("hi")), str(loaded.get_lang_id("en"))]


def test_training_text_is_temperature_balanced():
    texts = {"big": [f"b{i}" for i in range(1000)], "small": [f"s{i}" for i in range(10)]}
    sentences = balanced_sentences(texts, max_sentences=4000, temperature=5.0, seed=0)
    small = sum(sentence.startswith("s") for sentence in sentences)
    expected = 10**0.2 / (10**0.2 + 1000**0.2)  # 0.285: 10 sentences up-sampled ~114x
    assert len(sentences) == 4000 and abs(small / 4000 - expected) < 0.02
    assert {s for s in sentences if s.startswith("s")} == set(texts["small"])  # every small sentence used


def test_training_is_deterministic(fixture_corpus, tokenizer):
    again = train_tokenizer(fixture_corpus, vocab_size=TINY_VOCAB, model_type="bpe")
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    assert json.loads(again.backend_tokenizer.to_str())["model"] == model and model["byte_fallback"]
    unigram = train_tokenizer(fixture_corpus, vocab_size=TINY_VOCAB, model_type="unigram")
    text = SAMPLES["cjk"]
    assert unigram.decode(unigram(text, add_special_tokens=False)["input_ids"]) == unigram.backend_tokenizer.normalizer.normalize_str(text)
    with pytest.raises(ValueError, match="--vocab-size 300 is too small"):
        train_tokenizer(fixture_corpus, vocab_size=300)
