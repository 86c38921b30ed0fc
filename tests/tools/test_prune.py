"""`hf-moe-mt prune`: usage counted on real data (padding excluded), exactly the most-used experts kept, router
rows and expert weights sliced together, per-language models, a loadable export folder."""

import json

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

from hf_moe_mt.cli import main as cli_main
from hf_moe_mt.tools.analyze import ExpertUsage, count_expert_usage
from hf_moe_mt.tools.evaluate import load_direction_pairs
from hf_moe_mt.tools.experts import moe_layers
from hf_moe_mt.tools.prune import parse_keep, prune, random_experts, rank_experts
from hf_moe_mt.tools.translate import load_translator, translate

# Each MoE layer's router is replaced by one whose t-th real token of a call picks PATTERN[layer][t % len].
PATTERN = {"encoder.1": [2, 2, 2, 1, 1, 3], "decoder.1": [0, 3, 3, 0, 0, 0, 1]}


def constructed_router(pattern, calls):
    def forward(hidden_states):  # [T, D] real tokens only → [T, E] logits, one-hot ×10 on the pattern's expert
        calls.append(hidden_states.shape[0])
        experts = torch.tensor([pattern[t % len(pattern)] for t in range(hidden_states.shape[0])], dtype=torch.long)
        return torch.nn.functional.one_hot(experts, 4).float() * 10.0
    return forward


@pytest.fixture(scope="module")
def constructed_usage(exported_dir, run_dir):
    """Usage counted on train pairs (batches of 3 sentences of different lengths: padded) with the constructed
    routers, the real-token counts the routers saw, and the pairs."""
    model = AutoModelForSeq2SeqLM.from_pretrained(exported_dir).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported_dir)
    calls = {layer: [] for layer in PATTERN}
    for layer, prefix in moe_layers(model.config).items():
        gate = model.get_submodule(prefix).gate
        gate.forward = constructed_router(PATTERN[layer], calls[layer])
    pairs, _ = load_direction_pairs(run_dir / "corpus", "train", None, 5, tokenizer.language_codes)
    usage = count_expert_usage(model, tokenizer, pairs, batch_size=3, progress=False)
    tokenizer.src_lang = "de"
    padded = tokenizer(pairs[("de", "en")][0][:3], padding=True, return_tensors="pt")["attention_mask"]
    assert not bool(padded.all()), "the batches must contain padding for this test to mean anything"
    return usage, calls


def expected_counts(pattern, calls) -> list[int]:
    counts = [0] * 4
    for num_tokens in calls:
        for t in range(num_tokens):
            counts[pattern[t % len(pattern)]] += 1
    return counts


def test_usage_counts_every_real_token_once_per_layer_and_no_padding(constructed_usage):
    usage, calls = constructed_usage
    totals = usage.layer_counts()
    for layer, pattern in PATTERN.items():
        assert totals[layer].tolist() == expected_counts(pattern, calls[layer])
    # the batches are padded: the counts equal the attention-mask sums, so padding was never routed
    assert int(totals["encoder.1"].sum()) == sum(t["encoder"] for t in usage.tokens.values())
    assert int(totals["decoder.1"].sum()) == sum(t["decoder"] for t in usage.tokens.values())


def test_rank_experts_keeps_the_most_used_ties_to_the_lower_id():
    counts = {"encoder.1": torch.tensor([5, 9, 9, 0]), "decoder.1": torch.tensor([0, 0, 0, 7])}
    assert rank_experts(counts, 1) == {"encoder.1": [1], "decoder.1": [3]}
    assert rank_experts(counts, 2) == {"encoder.1": [1, 2], "decoder.1": [0, 3]}
    assert rank_experts(counts, 3) == {"encoder.1": [0, 1, 2], "decoder.1": [0, 1, 3]}


@pytest.mark.parametrize("text, keep", [("0.5", 2), ("50%", 2), ("1.0", 4), ("1", 1), ("3", 3), ("0.1", 1)])
def test_parse_keep_fraction_or_count(text, keep):
    assert parse_keep(text, num_experts=4, top_k=1) == keep


@pytest.mark.parametrize("text, message", [("0", "keep between 1 and 4"), ("5", "keep between 1 and 4"),
                                           ("half", "is not a fraction")])
def test_parse_keep_refuses_impossible_values(text, message):
    with pytest.raises(ValueError, match=message):
        parse_keep(text, num_experts=4, top_k=1)
    with pytest.raises(ValueError, match="keep between 2 and 4"):
        parse_keep("1", num_experts=4, top_k=2)


def test_prune_keeps_exactly_the_most_used_experts_and_the_model_runs(constructed_usage, exported_dir, tmp_path):
    usage, calls = constructed_usage
    report = prune(exported_dir, tmp_path / "pruned", "2", usage=usage, progress=False)
    expected = {layer: sorted(sorted(range(4), key=lambda e: (-expected_counts(p, calls[layer])[e], e))[:2])
                for layer, p in PATTERN.items()}
    assert expected == {"encoder.1": [1, 2], "decoder.1": [0, 3]}  # the patterns' two most used experts
    assert report["models"]["all"]["kept"] == expected
    original = AutoModelForSeq2SeqLM.from_pretrained(exported_dir)
    pruned = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "pruned")
    assert pruned.config.num_experts == 2
    source, target = original.state_dict(), pruned.state_dict()
    for layer, prefix in moe_layers(original.config).items():
        ids = torch.tensor(expected[layer])
        for name in ("gate.weight", "experts.up_proj", "experts.up_proj_bias", "experts.down_proj",
                     "experts.down_proj_bias"):
            assert torch.equal(target[f"{prefix}.{name}"], source[f"{prefix}.{name}"][ids]), (layer, name)
    for name, tensor in target.items():  # everything else is untouched
        if ".mlp.gate." not in name and ".mlp.experts." not in name:
            assert torch.equal(tensor, source[name]), name
    info = json.loads((tmp_path / "pruned" / "training_info.json").read_text())
    assert info["derivation"][-1]["tool"] == "prune" and info["derivation"][-1]["kept"] == expected
    hypotheses = translate(load_translator(tmp_path / "pruned", "de", "en"), ["Guten Morgen."], num_beams=2,
                           max_new_tokens=6)
    assert len(hypotheses) == 1 and isinstance(hypotheses[0], str)
    assert pruned.num_parameters() < original.num_parameters()


def test_prune_keeping_every_expert_reproduces_the_logits(exported_dir, run_dir, tmp_path):
    prune(exported_dir, tmp_path / "all", "1.0", corpus=run_dir / "corpus", progress=False)
    ids = torch.tensor([[5, 17, 30, 2]])
    with torch.no_grad():
        a = AutoModelForSeq2SeqLM.from_pretrained(exported_dir).eval()(input_ids=ids, decoder_input_ids=ids).logits
        b = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "all").eval()(input_ids=ids, decoder_input_ids=ids).logits
    assert torch.equal(a, b)


def test_random_pruning_is_seeded_per_layer():
    first = random_experts(["encoder.1", "decoder.1"], 8, 3, seed=0)
    assert first == random_experts(["encoder.1", "decoder.1"], 8, 3, seed=0)
    assert first != random_experts(["encoder.1", "decoder.1"], 8, 3, seed=1)
    assert all(len(ids) == 3 and ids == sorted(set(ids)) for ids in first.values())


def test_per_language_pruning_writes_one_model_per_target_language(exported_dir, tmp_path):
    counts = {  # de-en and fr-en decode English with experts 0/1; en-de decodes German with expert 3
        "de-en": {"encoder.1": [0, 0, 9, 1], "decoder.1": [7, 1, 0, 0]},
        "fr-en": {"encoder.1": [0, 5, 0, 0], "decoder.1": [0, 8, 0, 0]},
        "en-de": {"encoder.1": [6, 0, 0, 0], "decoder.1": [0, 0, 1, 9]},
    }
    tokens = {d: {"encoder": 10, "decoder": 8} for d in counts}
    usage = ExpertUsage(["encoder.1", "decoder.1"], 4, counts, tokens)
    report = prune(exported_dir, tmp_path / "per", "2", usage=usage, per_language=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "per").iterdir()) == ["de", "en", "pruning.json"]
    assert report["models"]["en"]["directions"] == ["de-en", "fr-en"]
    assert report["models"]["en"]["kept"] == {"encoder.1": [1, 2], "decoder.1": [0, 1]}
    assert report["models"]["de"]["kept"] == {"encoder.1": [0, 1], "decoder.1": [2, 3]}
    assert json.loads((tmp_path / "per" / "pruning.json").read_text())["models"]["de"]["directions"] == ["en-de"]
    assert AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "per" / "de").config.num_experts == 2


def test_prune_cli_errors_are_one_line_and_write_nothing(exported_dir, run_dir, tmp_path, capsys):
    out = str(tmp_path / "p")
    cases = ((["--keep", "0.5"], "needs --corpus DIR"),
             (["--keep", "9", "--by", "random"], "keep between 1 and 4"),
             (["--keep", "2", "--by", "random", "--per-language"], "drop --by random"),
             (["--keep", "2", "--usage", str(tmp_path / "nope.json")], "does not exist"))
    for extra, message in cases:
        assert cli_main(["prune", str(exported_dir), out, *extra]) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith("hf-moe-mt prune: error: ") and message in line, line
    assert not (tmp_path / "p").exists()
    assert cli_main(["prune", str(exported_dir), out, "--keep", "2", "--by", "random"]) == 0
    assert json.loads(capsys.readouterr().out)["keep"] == 2
