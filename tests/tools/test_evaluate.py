"""`hf-moe-mt evaluate`: scores equal sacrebleu's own CLI, every direction around the pivot, atomic output;
empty inputs never reach the model (translate path and the registered pipeline)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_moe_mt.cli import main as cli_main
from hf_moe_mt.tools.evaluate import evaluate_model, parse_directions
from hf_moe_mt.tools.scoring import corpus_bleu, score_translations
from hf_moe_mt.tools.translate import load_translator, translate

SACREBLEU = str(Path(sys.executable).with_name("sacrebleu"))


def sacrebleu_cli(reference: Path, hypothesis: Path, pair: str) -> tuple[float, float]:
    """(BLEU, chrF) printed by the sacrebleu command for the files, with 6 decimals."""
    run = subprocess.run([SACREBLEU, str(reference), "-i", str(hypothesis), "-m", "bleu", "chrf", "-l", pair,
                          "-b", "-w", "6"], capture_output=True, text=True, check=True)
    bleu, chrf = json.loads(run.stdout)
    return bleu, chrf


@pytest.fixture(scope="module")
def evaluation(exported_dir, run_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("evaluation") / "eval"
    report = evaluate_model(exported_dir, run_dir / "corpus", num_beams=1, max_new_tokens=8, batch_size=3,
                            output_dir=output, progress=False)
    return report, output


FIXED_REFERENCES = ["The weather is nice today.", "Where is the train station?", "My brother lives in a small village.",
                    "We are reading a book together."]
FIXED_HYPOTHESES = ["The weather is nice today!", "Where is the station?", "My brother lives in a village.",
                    "We read a book together."]


@pytest.mark.parametrize("target, references, hypotheses", [
    ("en", FIXED_REFERENCES, FIXED_HYPOTHESES),
    ("zh", ["火车站在哪里？", "河流向大海。"], ["火车站在哪？", "河流到大海。"]),  # sacrebleu's zh tokenizer
])
def test_scores_equal_the_sacrebleu_command_on_fixed_files(tmp_path, target, references, hypotheses):
    (tmp_path / "ref").write_text("\n".join(references) + "\n")
    (tmp_path / "hyp").write_text("\n".join(hypotheses) + "\n")
    scores = score_translations(hypotheses, references, target)
    bleu, chrf = sacrebleu_cli(tmp_path / "ref", tmp_path / "hyp", f"de-{target}")
    assert 10 < scores["bleu"] < 100 and 10 < scores["chrf"] < 100  # a partial match, not a degenerate 0 or 100
    assert round(scores["bleu"], 6) == pytest.approx(bleu, abs=1e-6)
    assert round(scores["chrf"], 6) == pytest.approx(chrf, abs=1e-6)
    assert f"tok:{'zh' if target == 'zh' else '13a'}" in scores["bleu_signature"]


def test_evaluate_scores_equal_the_sacrebleu_command_on_the_files_it_writes(evaluation):
    report, output = evaluation
    for name in ("ar-en", "en-zh", "de-en"):
        translations = output / "translations"
        bleu, chrf = sacrebleu_cli(translations / f"{name}.ref", translations / f"{name}.hyp", name)
        result = report["directions"][name]
        assert round(result["bleu"], 6) == pytest.approx(bleu, abs=1e-6), name
        assert round(result["chrf"], 6) == pytest.approx(chrf, abs=1e-6), name
    assert report["directions"]["ar-en"]["chrf"] > 0  # the random model still shares characters with English
    assert json.loads((output / "evaluation.json").read_text()) == report


def test_evaluate_defaults_to_every_direction_both_ways_around_the_pivot(evaluation, run_dir):
    report, output = evaluation
    from hf_moe_mt.data import load_corpus

    test = load_corpus(str(run_dir / "corpus"))["test"]
    languages = set(test["src_lang"])
    expected = {f"{x}-en" for x in languages} | {f"en-{x}" for x in languages}
    assert set(report["directions"]) == expected
    assert report["averages"]["x-en"]["directions"] == sorted(f"{x}-en" for x in languages)
    average = sum(report["directions"][d]["bleu"] for d in report["averages"]["en-x"]["directions"]) / len(languages)
    assert report["averages"]["en-x"]["bleu"] == pytest.approx(average)
    for name, result in report["directions"].items():
        src, tgt = name.split("-")
        count = sum(1 for s in test["src_lang"] if s in (src, tgt))
        assert result["sentences"] == count and result["sentences_per_second"] > 0
        references = (output / "translations" / f"{name}.ref").read_text().splitlines()
        column = [row["tgt_text"] if src != "en" else row["src_text"] for row in test
                  if row["src_lang"] in (src, tgt)]
        assert references == column, name
    table = (output / "evaluation.md").read_text()
    assert "| de-en |" in table and "x-en average" in table
    assert (output / "evaluation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(output.parent.glob(".eval.*")), "staging directory left behind"


def test_evaluate_respects_directions_and_max_sentences(exported_dir, run_dir):
    report = evaluate_model(exported_dir, run_dir / "corpus", directions=parse_directions("de-en,en-fr"),
                            max_sentences=1, num_beams=1, max_new_tokens=4, progress=False)
    assert list(report["directions"]) == ["de-en", "en-fr"]
    assert all(result["sentences"] == 1 for result in report["directions"].values())


def test_evaluate_cli_errors_are_one_line(exported_dir, run_dir, tmp_path, capsys):
    base = ["evaluate", str(exported_dir), "--corpus", str(run_dir / "corpus"), "--output", str(tmp_path / "e")]
    for extra, message in ((["--directions", "de-xx"], "direction(s) de-xx have no pairs in this split"),
                           (["--directions", "deen"], "is not SRC-TGT"),
                           (["--split", "nope"], "the corpus has no 'nope' pairs")):
        assert cli_main([*base, *extra]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[-1].startswith("hf-moe-mt evaluate: error: ") and message in lines[-1], lines[-1]
    assert not (tmp_path / "e").exists()


def test_evaluate_cli_prints_the_table_and_writes_the_folder(exported_dir, run_dir, tmp_path, capsys):
    code = cli_main(["evaluate", str(exported_dir), "--corpus", str(run_dir / "corpus"), "--directions", "de-en",
                     "--num-beams", "1", "--max-new-tokens", "4", "--output", str(tmp_path / "e")])
    assert code == 0 and "| de-en |" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["evaluation.json", "evaluation.md",
                                                                  "evaluation.png", "translations"]
    assert cli_main(["evaluate", str(exported_dir), "--corpus", str(run_dir / "corpus"), "--output",
                     str(tmp_path / "e")]) == 2
    assert "--overwrite" in capsys.readouterr().err


# --------------------------------------------------------------------------- empty inputs, batching order

@pytest.fixture(scope="module")
def translator(exported_dir):
    return load_translator(exported_dir, "de", "en", batch_size=4)


class CountingGenerate:
    """Wraps model.generate to record the batch size of every call."""

    def __init__(self, model):
        self.model, self.original, self.batches = model, model.generate, []

    def __call__(self, *args, **kwargs):
        self.batches.append(int(kwargs["input_ids"].shape[0]))
        self.max_new_tokens = kwargs.get("max_new_tokens")
        return self.original(*args, **kwargs)


@pytest.fixture
def counting(translator, monkeypatch):
    counter = CountingGenerate(translator.model)
    monkeypatch.setattr(translator.model, "generate", counter)
    return counter


def test_translate_gives_empty_output_for_empty_input_without_the_model(translator, counting):
    texts = ["", "Guten Morgen.", "   ", "\t\n", "Danke."]
    hypotheses = translate(translator, texts, num_beams=1, max_new_tokens=6, batch_size=8)
    assert hypotheses[0] == hypotheses[2] == hypotheses[3] == ""
    assert counting.batches == [2]  # only the two real sentences went through generate
    assert translate(translator, ["", " "], num_beams=1, max_new_tokens=6) == ["", ""]
    assert counting.batches == [2]


def test_pipeline_gives_empty_output_for_empty_input_without_the_model(translator, counting):
    assert translator("", num_beams=1, max_new_tokens=6) == [{"translation_text": ""}]
    assert translator("  ", num_beams=2, num_return_sequences=2, max_new_tokens=6) == [
        {"translation_text": ""}, {"translation_text": ""}]
    assert counting.batches == []
    mixed = translator(["", "Guten Morgen.", " ", "Danke."], num_beams=1, max_new_tokens=6, batch_size=4)
    assert counting.batches == [2]
    assert mixed[0]["translation_text"] == mixed[2]["translation_text"] == ""
    alone = [translator(text, num_beams=1, max_new_tokens=6)[0]["translation_text"]
             for text in ("Guten Morgen.", "Danke.")]
    assert [mixed[1]["translation_text"], mixed[3]["translation_text"]] == alone


def test_generation_length_follows_the_longest_source_when_the_config_says_so(translator, counting, monkeypatch):
    config = translator.model.generation_config
    monkeypatch.setattr(config, "max_new_tokens", 40, raising=False)
    translator("Guten Morgen.", num_beams=1)
    assert counting.max_new_tokens is None  # no max_length_a/b: the model's own max_new_tokens applies
    monkeypatch.setattr(config, "max_length_a", 1.5, raising=False)
    monkeypatch.setattr(config, "max_length_b", 2, raising=False)
    source_tokens = len(translator.tokenizer("Guten Morgen, lieber Freund.")["input_ids"])  # with __de__ and </s>
    translator(["Guten Morgen, lieber Freund.", "Danke."], num_beams=1, batch_size=2)
    assert counting.max_new_tokens == int(1.5 * source_tokens + 2) < 40
    translator("Guten Morgen.", num_beams=1, max_new_tokens=3)
    assert counting.max_new_tokens == 3  # the caller's choice wins
    monkeypatch.setattr(config, "max_length_b", 100, raising=False)
    translator("Guten Morgen.", num_beams=1)
    assert counting.max_new_tokens == 40  # never beyond max_new_tokens


def test_translate_sorts_by_length_and_restores_input_order(translator, counting):
    texts = ["Danke.", "Das Haus ist alt und groß und steht am Fluss.", "Guten Morgen.", "Wo ist der Bahnhof?"]
    batched = translate(translator, texts, num_beams=2, max_new_tokens=4, batch_size=2)
    assert counting.batches == [2, 2]
    one_by_one = [translate(translator, [text], num_beams=2, max_new_tokens=4)[0] for text in texts]
    assert batched == one_by_one  # dropless generation: a sentence translates the same in any batch


def test_corpus_bleu_checks_alignment():
    assert corpus_bleu(["the house is old"], ["the house is old"]).score == pytest.approx(100.0)
    with pytest.raises(ValueError, match="align line by line"):
        corpus_bleu(["a", "b"], ["a"])


def test_bleu_into_japanese_without_mecab_names_the_extra():
    import importlib.util

    if importlib.util.find_spec("MeCab") is not None:
        pytest.skip("sacrebleu's Japanese tokenizer is installed")
    with pytest.raises(ValueError, match=r"pip install 'sacrebleu\[ja\]'"):
        corpus_bleu(["猫"], ["猫"], "ja")


def test_teacher_forced_loss_is_the_models_own_cross_entropy(exported_dir, run_dir):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from hf_moe_mt.tools.evaluate import encode_pairs, load_direction_pairs, teacher_forced_loss

    model = AutoModelForSeq2SeqLM.from_pretrained(exported_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported_dir)
    pairs, _ = load_direction_pairs(run_dir / "corpus", "train", [("de", "en")], 5, tokenizer.language_codes)
    result = teacher_forced_loss(model, tokenizer, pairs, batch_size=5)  # one padded batch
    batch = encode_pairs(tokenizer, "de", "en", *pairs[("de", "en")], 128, model.config)
    with torch.no_grad():
        out = model(**batch)  # label_smoothing 0: loss = mean CE + coef·aux + coef·z
    config = model.config
    expected = out.loss - config.router_aux_loss_coef * out.aux_loss - config.router_z_loss_coef * out.z_loss
    assert result["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert result["tokens"] == int((batch["labels"] != -100).sum()) and result["directions"]["de-en"] == result["loss"]


def test_a_decoding_loop_is_counted_and_an_ordinary_sentence_is_not():
    from hf_moe_mt.tools.scoring import looping_fraction, max_ngram_repeats

    loop = "and the children of the children of the children of the children of the hand."
    assert max_ngram_repeats(loop) == 4 and max_ngram_repeats("In the third year of the reign of Jehoiakim") == 1
    assert max_ngram_repeats("the son of the son of David") == 2  # a genealogy repeats, but not in a loop
    assert looping_fraction([loop, "God said", "the son of the son of David"]) == 1 / 3
    assert looping_fraction([]) == 0.0 and max_ngram_repeats("two words") == 0
