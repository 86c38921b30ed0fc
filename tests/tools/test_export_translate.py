"""Export: a training output becomes a self-contained folder that the stock API loads and translates with."""

import json

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

from hf_moe_mt.cli import main as cli_main
from hf_moe_mt.tools.export import export_model, parameter_counts
from hf_moe_mt.tools.translate import corpus_bleu, load_translator, translate

REMOTE_CODE_FILES = ("configuration_moe_mt.py", "generation_moe_mt.py", "modeling_moe_mt.py", "moe.py",
                     "moe_kernels.py", "pipeline_moe_mt.py", "tokenization_moe_mt.py")


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("export") / "model"
    result = export_model(run_dir / "model", output, run_dir / "tokenizer", metrics={"bleu_de_en": 1.5})
    return result


def test_export_writes_weights_code_tokenizer_generation_config_and_card(exported):
    folder = exported.output_dir
    for name in ("model.safetensors", "config.json", "tokenizer.json", "generation_config.json", "README.md",
                 *REMOTE_CODE_FILES):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForSeq2SeqLM"] == "modeling_moe_mt.MoEMTForConditionalGeneration"
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["num_beams"] == 4 and generation["decoder_start_token_id"] == config["eos_token_id"]
    # the loop guard a small model needs: each word-piece 3-gram at most twice (no_repeat_ngram_size forbids a second)
    assert generation["max_ngram_repeats"] == 2 and generation["ngram_repeat_size"] == 3
    assert "no_repeat_ngram_size" not in generation
    card = (folder / "README.md").read_text()
    assert "pipeline_tag: translation" in card and "bleu_de_en | 1.5" in card
    assert f"{exported.num_parameters:,}" in card and "- de" in card
    assert not list(folder.parent.glob(".model.*")), "staging directory left behind"


def test_a_bad_loop_guard_is_refused_before_anything_is_written(run_dir, tmp_path):
    with pytest.raises(ValueError, match="max_repeats=-1 must be a positive integer"):
        export_model(run_dir / "model", tmp_path / "bad", run_dir / "tokenizer", max_ngram_repeats=-1)
    assert not (tmp_path / "bad").exists()


def test_exported_model_has_identical_weights_and_logits(run_dir, exported):
    source = AutoModelForSeq2SeqLM.from_pretrained(run_dir / "model").eval()
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(exported.output_dir).eval()
    ids = torch.tensor([[5, 17, 30, 2]])
    with torch.no_grad():
        assert torch.equal(source(input_ids=ids, decoder_input_ids=ids).logits,
                           reloaded(input_ids=ids, decoder_input_ids=ids).logits)


def test_parameter_counts_count_k_over_e_of_the_experts(run_dir):
    model = AutoModelForSeq2SeqLM.from_pretrained(run_dir / "model")
    total, activated = parameter_counts(model)
    expert = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    assert total == sum(p.numel() for p in model.parameters())
    assert activated == total - expert + expert // 4  # top-1 of 4 experts


def test_translation_pipeline_on_exported_folder_returns_one_string_per_line(exported):
    translator = load_translator(exported.output_dir, "de", "en", batch_size=2)
    hypotheses = translate(translator, ["Guten Morgen.", "Das Haus ist alt und groß."], num_beams=2,
                           max_new_tokens=8)
    assert len(hypotheses) == 2 and all(isinstance(h, str) for h in hypotheses)
    assert corpus_bleu(["the house is old"], ["the house is old"]).score == pytest.approx(100.0)


def test_bfloat16_translation_loads_bf16_weights_and_matches_float32_greedy_start(exported):
    texts = ["Guten Morgen.", "Das Haus ist alt und groß."]
    fp32 = load_translator(exported.output_dir, "de", "en", batch_size=2)
    bf16 = load_translator(exported.output_dir, "de", "en", batch_size=2, dtype="bfloat16")
    dtypes = {name: p.dtype for name, p in bf16.model.named_parameters()}
    assert {d for n, d in dtypes.items() if not n.endswith("mlp.gate.weight")} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if n.endswith("mlp.gate.weight")} == {torch.float32}  # router stays fp32
    hypotheses = translate(bf16, texts, num_beams=2, max_new_tokens=8)
    assert len(hypotheses) == 2 and all(isinstance(h, str) for h in hypotheses)
    # The first greedy token of each sentence is robust to bf16 rounding on this model.
    first = [translate(t, texts, num_beams=1, max_new_tokens=1) for t in (fp32, bf16)]
    assert first[0] == first[1]
    with pytest.raises(ValueError, match="use one of float32, bfloat16, auto"):
        load_translator(exported.output_dir, "de", "en", dtype="float16")


@pytest.mark.parametrize("bf16_faster, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_translates_in_bf16_only_where_this_machine_measured_it_faster(exported, monkeypatch,
                                                                                  bf16_faster, expected):
    from hf_moe_mt.backends import precision
    from hf_moe_mt.tools.translate import dtype_name, resolve_dtype

    asked = []
    monkeypatch.setattr(precision, "cpu_bf16_choice", lambda again=False: asked.append(1) or precision.Bf16Choice(
        bf16_faster, 0.4 if bf16_faster else 2.0, "cache"))
    translator = load_translator(exported.output_dir, "de", "en", batch_size=2, dtype="auto")
    assert translator.model.dtype == expected and len(asked) == 1
    assert dtype_name(translator.model) == {torch.bfloat16: "bfloat16", torch.float32: "float32"}[expected]
    assert resolve_dtype("float32") == "float32" and resolve_dtype("bfloat16") == "bfloat16"
    assert resolve_dtype("auto", device=-1) == ("bfloat16" if bf16_faster else "float32")  # -1: the pipeline's CPU
    assert len(asked) == 2  # explicit dtypes never ask the probe


def test_translate_rejects_unknown_language_with_the_available_ones(exported):
    with pytest.raises(ValueError, match="available: .*de"):
        load_translator(exported.output_dir, "xx", "en")


def test_export_refuses_to_overwrite_and_names_the_flag(run_dir, exported):
    with pytest.raises(ValueError, match="--overwrite"):
        export_model(run_dir / "model", exported.output_dir, run_dir / "tokenizer")


def test_export_cli_reports_missing_tokenizer_in_one_line(run_dir, tmp_path, capsys):
    code = cli_main(["export", "--checkpoint", str(run_dir / "model"), "--output", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and error.startswith("hf-moe-mt export: error: no tokenizer.json")
    assert not (tmp_path / "out").exists()


def test_translate_cli_prints_translations_and_bleu(exported, tmp_path, capsys):
    source = tmp_path / "src.de"
    source.write_text("Guten Morgen.\nDanke.\n")
    code = cli_main(["translate", "--model", str(exported.output_dir), "--src", "de", "--tgt", "en",
                     "--input", str(source), "--references", str(source), "--num-beams", "1",
                     "--max-new-tokens", "6"])
    captured = capsys.readouterr()
    assert code == 0 and len(captured.out.strip().splitlines()) == 2
    assert captured.err.strip().splitlines()[-1].startswith("BLEU = ")


REMOTE_PIPELINE_SCRIPT = """
import sys
sys.modules["hf_moe_mt"] = None  # the package may be pip-installed (CI): make any import of it fail
from transformers import pipeline
translator = pipeline("translation", model=sys.argv[1], trust_remote_code=True, src_lang="de", tgt_lang="en")
assert type(translator).__module__.startswith("transformers_modules"), type(translator).__module__
print(translator(["Guten Morgen.", "Danke."], num_beams=1, max_new_tokens=6)[1]["translation_text"])
"""


def test_exported_folder_translates_through_remote_code_without_the_package(exported, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    run = subprocess.run([sys.executable, "-c", REMOTE_PIPELINE_SCRIPT, str(exported.output_dir)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    local = translate(load_translator(exported.output_dir, "de", "en"), ["Danke."], num_beams=1, max_new_tokens=6)
    assert run.stdout.strip().splitlines()[-1] == local[0].strip()
